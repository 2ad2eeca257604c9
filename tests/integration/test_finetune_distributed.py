"""`deberta-ds finetune` on 2 ranks (torchrun, gloo on the CPU) with ZeRO-2 and ZeRO-3, against one process
with the same global batch (2 ranks x micro-batch 4 vs 1 rank x 4 x 2 accumulation steps)."""
import json
import os
import subprocess

import pytest
import torch

from model import DebertaForMaskedLM, preset
from pipeline.release import load_release, save_release
from tests.helpers.launch import ROOT, cli_command, explain, free_port, run_env, single_rank, torchrun_command
from tests.helpers.superglue import write_cb_like

# dropout 0 everywhere and SiFT with a small λ: the runs differ only in how the global batch is split, and
# in SiFT's random initial perturbation (each rank draws its own noise), whose effect λ keeps negligible
OPTIONS = ["--lr", "3e-3", "--batch-size", "8", "--epochs", "4", "--warmup-steps", "2", "--cls-drop-out", "0",
           "--max-seq-len", "32", "--sift", "on", "--sift-lambda", "0.01"]
ZERO2 = os.path.join(ROOT, "ds_configs", "finetune_cpu.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "finetune_cpu_zero3.json")


@pytest.fixture(scope="module")
def release(tmp_path_factory, spm_path):  # noqa: F811
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("release") / "tiny")
    config = preset("tiny", vocab_size=640, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    save_release(DebertaForMaskedLM(config), path, spm_path=spm_path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("superglue"))
    write_cb_like(os.path.join(root, "CB", "train.jsonl"), 64, seed=1)
    write_cb_like(os.path.join(root, "CB", "val.jsonl"), 32, seed=2)
    return root


def run_finetune(release, data, out, nproc, ds, *extra, env_extra=None):
    args = ["finetune", "--task", "CB", "--release", release, "--data-dir", data, "--output-dir", str(out),
            "--deepspeed", ds, *OPTIONS, *extra]
    if nproc > 1:
        command, env = torchrun_command(nproc, "pipeline.cli", *args), run_env(env_extra)
    else:
        command, env = cli_command(*args), run_env(single_rank(env_extra))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ranks_finetune(release, data, out, ds, env_extra, nproc=2):
    """nproc ranks started directly (RANK/WORLD_SIZE in the environment, as srun starts its tasks), so
    that each rank's own exit code is seen (torchrun reports 1 for any failing rank).
    Returns [(exit code, stdout, stderr)] by rank."""
    command = cli_command("finetune", "--task", "CB", "--release", release, "--data-dir", data, "--output-dir",
                          str(out), "--deepspeed", ds, *OPTIONS)
    port = str(free_port())
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=run_env(dict(env_extra, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))
             for r in range(nproc)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append((proc.returncode, stdout, stderr))
    return results


def finetune(release, data, out, nproc, ds, *extra):
    result = run_finetune(release, data, out, nproc, ds, *extra)
    assert result.returncode == 0, explain(result)
    return result, json.load(open(os.path.join(out, "metrics.json")))


@pytest.fixture(scope="module")
def one_process(release, data, tmp_path_factory):
    # micro-batch 4: the batch of 8 is two accumulation steps, as the 2-rank runs' two micro-batches
    return finetune(release, data, tmp_path_factory.mktemp("one"), 1, ZERO2, "--micro-batch-size", "4")


@pytest.fixture(scope="module")
def two_ranks_zero2(release, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_zero2") / "out"
    return out, finetune(release, data, out, 2, ZERO2)


@pytest.mark.parametrize("ds", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_two_ranks_train_like_one_process(ds, release, data, one_process, two_ranks_zero2, tmp_path):
    import transformers

    if ds == ZERO2:
        out, (result, metrics) = two_ranks_zero2
    else:
        out = tmp_path / "out"
        result, metrics = finetune(release, data, out, 2, ds)
    _, reference = one_process
    assert metrics["world_size"] == 2 and reference["world_size"] == 1
    assert result.stdout.count("| epoch | step | train_loss") == 1 and result.stdout.count("best: epoch") == 1
    # Same data, same weights: only the order of fp32 sums differs (gloo's all-reduce mean over 2 ranks vs
    # 2 accumulated micro-batches), about 1e-8 relative in the losses after 24 Adam steps (measured with 3 epochs). The
    # adversarial loss also carries rank 1's own SiFT noise (measured: 4e-6 relative; λ=0.01 keeps it out of
    # training). Logits 1e-7 apart give the same argmax unless two classes tie to 1e-7, so the val metrics,
    # multiples of 1/32 here, are equal: anything above 1e-6 would be a different prediction.
    for ours, theirs in zip(metrics["epochs"], reference["epochs"]):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert ours["adv_loss"] == pytest.approx(theirs["adv_loss"], rel=1e-4)
        assert ours["val"]["score"] == pytest.approx(theirs["val"]["score"], abs=1e-6), (ours, theirs)
    # it learned the task (chance: about 1/3). Measured with length-grouped batches: 0.26, 0.62, 0.76, 0.87 over
    # the 4 epochs; plain shuffling reached 0.94 in epoch 2 on this seed (64 examples, one seed: noise)
    assert metrics["best"]["score"] >= 0.8
    assert sorted(os.listdir(out)) == ["best", "deberta-ds.output.json", "metrics.json", "metrics.jsonl",
                                       "tensorboard"]  # by rank 0, no leftovers
    best = str(out / "best")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(best).eval()
    ours = load_release(best, task="classification", num_labels=3)
    ids = torch.randint(4, 640, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)


def test_a_signal_checkpoints_and_the_run_again_continues_exactly(release, data, two_ranks_zero2, tmp_path):
    """SIGUSR1 (on rank 0, after optimizer step 5 of 32: mid epoch 1; then after step 16: the end of epoch
    2, after its evaluation): each time both ranks save and exit 75, and the same command continues.
    The epochs' records and the best release equal an uninterrupted run's bitwise: the optimizer, the
    schedule, the data position and each rank's RNG (SiFT's noise) come back."""
    reference_dir, (_, reference) = two_ranks_zero2
    out = tmp_path / "out"
    for expected_step in (5, 16):
        ranks = ranks_finetune(release, data, out, ZERO2, {"DEBERTA_DS_FAULT": "signal:5,16"})
        assert [code for code, _, _ in ranks] == [75, 75], ranks[0][2][-3000:] + ranks[1][2][-3000:]
        assert f"stopping on SIGUSR1 after step {expected_step}: checkpoint saved" in ranks[0][2]
        assert os.listdir(out / "checkpoints" / f"global_step{expected_step}")
    result, metrics = finetune(release, data, out, 2, ZERO2)
    assert "resumed from" in result.stderr and "optimizer step 16" in result.stderr
    drop = lambda records: [{k: v for k, v in r.items() if k not in ("elapsed_s", "train_s")} for r in records]  # noqa: E731
    assert drop(metrics["epochs"]) == drop(reference["epochs"])
    assert metrics["best"]["epoch"] == reference["best"]["epoch"]
    ours, theirs = (load_release(str(d / "best"), task="classification", num_labels=3).state_dict()
                    for d in (out, reference_dir))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # the checkpoint went with the finished run
    assert sorted(os.listdir(out)) == ["best", "deberta-ds.output.json", "metrics.json", "metrics.jsonl",
                                       "tensorboard"]


def test_a_checkpoint_from_other_settings_is_refused(release, data, tmp_path):
    out = tmp_path / "out"
    stopped = run_finetune(release, data, out, 1, ZERO2, "--micro-batch-size", "4",
                           env_extra={"DEBERTA_DS_FAULT": "signal:2"})
    assert stopped.returncode == 75, explain(stopped)
    other = run_finetune(release, data, out, 1, ZERO2, "--micro-batch-size", "4", "--lr", "1e-3")
    assert other.returncode == 1
    assert "holds the output of a fine-tuning run of other inputs or settings (settings.lr: recorded" in other.stderr, \
        explain(other)
