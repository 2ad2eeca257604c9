"""A pretraining run cannot be pointed at the wrong thing (2 gloo ranks, the tiny model): it resumes only on its
own data, one run holds its directory, a damaged newest checkpoint falls back to the one before it with the
losses of an uninterrupted run, and a save that cannot write keeps the previous checkpoint."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import NO_DROPOUT, ROOT, TINY_RUN, ZERO3, cli, explain, free_port, losses, pretrain, run_env

SETS = NO_DROPOUT + ["max_steps=4", "save_interval=2"]


def no_traceback_of_ours(stderr):
    """torchrun prints its own traceback when a rank exits non-zero; the ranks print one line, none of ours."""
    return not any('File "' in line and "/pipeline/" in line for line in stderr.splitlines())


@pytest.fixture(scope="module")
def four_steps(tiny_shards, tmp_path_factory):
    """The reference: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("protect") / "run"
    result = pretrain(tiny_shards, out, sets=SETS)
    assert result.returncode == 0, explain(result)
    return out


def copy_at_step_2(four_steps, tmp_path, keep_4=True):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    if not keep_4:
        shutil.rmtree(run / "checkpoints" / "global_step4")
    return run


@pytest.fixture(scope="module")
def other_tokenizer_shards(tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("other_tokenizer")
    first = sorted((tiny_shards.parent / "corpus").iterdir())[0]
    for args in (["tokenizer", "train", "--input", str(first), "--output", str(work / "spm"), "--vocab-size", "900"],
                 ["preprocess", "--input", str(first), "--tokenizer", str(work / "spm.model"), "--output-dir",
                  str(work / "shards"), "--max-seq-len", "128", "--no-progress"]):
        result = cli(*args)
        assert result.returncode == 0, explain(result)
    return work / "shards"


def test_a_resume_on_other_shards_is_refused_and_accepted_only_when_asked(four_steps, valid_shards, tmp_path):
    run = copy_at_step_2(four_steps, tmp_path, keep_4=False)
    sets = NO_DROPOUT + ["max_steps=5", "save_interval=5"]
    refused = pretrain(valid_shards, run, nproc=1, sets=sets)
    assert refused.returncode == 1
    assert "trained on other data than --data-dir/--valid-data-dir give (shards_sha256: checkpoint" in refused.stderr
    assert "add --accept-data-change" in refused.stderr and no_traceback_of_ours(refused.stderr)
    accepted = pretrain(valid_shards, run, nproc=1, sets=sets, args=["--accept-data-change"])
    assert accepted.returncode == 0, explain(accepted)
    assert "data change accepted at step 2" in accepted.stderr
    meta = json.loads((run / "checkpoints" / "global_step5" / "deberta_ds.json").read_text())
    assert meta["data_history"][0]["until_step"] == 2 and meta["data"]["num_samples"] != meta["data_history"][0]["num_samples"]
    again = pretrain(valid_shards, run, nproc=1, sets=NO_DROPOUT + ["max_steps=6", "save_interval=6"])
    assert again.returncode == 0, explain(again)    # the run's data now are these: no flag needed


def test_another_validation_set_accepted_on_resume_leaves_the_training_order_as_it_was(four_steps, tiny_shards,
                                                                                       valid_shards, tmp_path):
    """Only the held-out shards change: refused without the flag, and with it the training cursor is kept, so
    the losses are those of the uninterrupted run (a training-data change would restart the shards' order)."""
    run = copy_at_step_2(four_steps, tmp_path, keep_4=False)
    with_valid = pretrain(tiny_shards, run, sets=SETS + ["max_steps=3"], args=["--valid-data-dir", str(valid_shards)])
    assert with_valid.returncode == 0, explain(with_valid)
    other_valid = ["--valid-data-dir", str(tiny_shards)]
    refused = pretrain(tiny_shards, run, sets=SETS, args=other_valid)
    assert refused.returncode == 1 and "(valid_shards_sha256: checkpoint" in refused.stderr, explain(refused)
    accepted = pretrain(tiny_shards, run, sets=SETS, args=other_valid + ["--accept-data-change"])
    assert accepted.returncode == 0, explain(accepted)
    assert "data change accepted" not in accepted.stderr
    reference, got = losses(four_steps), losses(run)
    assert [got[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]


def test_a_resume_on_a_shard_changed_with_its_block_hashes_is_refused(four_steps, tiny_shards, tmp_path):
    """A token of a shard changed and the manifest's block hash edited to match: every check of the loader
    passes and shards_sha256 (the whole files' hashes) is as recorded; blocks_sha256 is not."""
    import hashlib
    run = copy_at_step_2(four_steps, tmp_path, keep_4=False)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest_path = sorted(p for p in shards.glob("task-*.json"))[0]
    manifest = json.loads(manifest_path.read_text())
    bin_path = shards / manifest["bin"]["file"]
    data = bytearray(bin_path.read_bytes())
    data[4 * 5:4 * 6] = (7).to_bytes(4, "little")
    bin_path.write_bytes(bytes(data))
    manifest["bin"]["block_sha256"][0] = hashlib.sha256(data[:manifest["bin"]["block_bytes"]]).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    refused = pretrain(shards, run, nproc=1, sets=SETS)
    assert refused.returncode == 1, explain(refused)
    assert "trained on other data than --data-dir/--valid-data-dir give (blocks_sha256: checkpoint" in refused.stderr
    assert no_traceback_of_ours(refused.stderr)


def test_a_resume_with_another_tokenizer_is_always_refused(four_steps, other_tokenizer_shards, tmp_path):
    run = copy_at_step_2(four_steps, tmp_path)
    for args in ([], ["--accept-data-change"]):
        result = pretrain(other_tokenizer_shards, run, nproc=1, sets=SETS + ["max_steps=6"], args=args)
        assert result.returncode == 1 and "trained with tokenizer sha256" in result.stderr, explain(result)
        assert "the model's embeddings belong to the checkpoint's tokenizer" in result.stderr


@pytest.mark.parametrize("harm, problem", [
    ("truncate", "zero_pp_rank_1_mp_rank_00_optim_states.pt: 5000 bytes"),
    ("rng", "rng_rank1.pt: missing"),
    ("meta", "deberta_ds.json: cannot read"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_with_the_same_losses(four_steps, tiny_shards,
                                                                                      tmp_path, harm, problem):
    run = copy_at_step_2(four_steps, tmp_path)
    newest = run / "checkpoints" / "global_step4"
    if harm == "truncate":
        optim = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        optim.write_bytes(optim.read_bytes()[:5000])
    elif harm == "rng":
        (newest / "rng_rank1.pt").unlink()
    else:
        (newest / "deberta_ds.json").write_text("{ not json")
    resumed = pretrain(tiny_shards, run, sets=SETS + ["max_steps=5"])
    assert resumed.returncode == 0, explain(resumed)
    lines = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and problem in lines[0] and lines[0].endswith("resuming from global_step2"), lines
    assert "resumed from global_step2 at step 2" in resumed.stderr
    reference, got = losses(four_steps), losses(run)
    assert [got[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]


def test_no_complete_checkpoint_left_is_refused_not_restarted(four_steps, tiny_shards, tmp_path):
    run = copy_at_step_2(four_steps, tmp_path)
    for tag in ("global_step2", "global_step4"):
        (run / "checkpoints" / tag / "rng_rank0.pt").unlink()
    result = pretrain(tiny_shards, run, sets=SETS)
    assert result.returncode == 1 and "no complete checkpoint to resume from" in result.stderr, explain(result)


def test_a_save_that_cannot_write_names_the_file_and_keeps_the_previous_checkpoint(four_steps, tiny_shards, tmp_path):
    """Every file of the run limited to 200 kB (the optimizer shards are 1 MB): the save at step 4 fails on both
    ranks with a real EFBIG; one line names the file, the partial tag goes, step 2 stays, and the run resumes."""
    run = copy_at_step_2(four_steps, tmp_path, keep_4=False)
    failed = pretrain(tiny_shards, run, sets=SETS, file_limit=200_000)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error")]
    assert errors and all("optim_states.pt: File too large; the previous checkpoint global_step2 is kept" in e
                          for e in errors), failed.stderr[-3000:]
    assert no_traceback_of_ours(failed.stderr)
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.startswith("global")) == ["global_step2"]
    resumed = pretrain(tiny_shards, run, sets=SETS)
    assert resumed.returncode == 0, explain(resumed)
    assert losses(run)[4] == losses(four_steps)[4]


def test_a_save_that_fails_on_one_rank_only_stops_every_rank_with_its_message(four_steps, tiny_shards, tmp_path):
    """Rank 1 alone cannot write beyond 200 kB (DEBERTA_DS_FAULT fsize): its optimizer shard fails inside
    DeepSpeed's save_checkpoint, whose barriers both ranks must still reach; both stop with rank 1's message
    (no hang: the helper's timeout would fail the test), and step 2 stays."""
    run = copy_at_step_2(four_steps, tmp_path, keep_4=False)
    failed = pretrain(tiny_shards, run, sets=SETS, extra_env={"DEBERTA_DS_FAULT": "fsize:1=200000"}, timeout=300)
    assert failed.returncode != 0
    # the two ranks' lines may run together in the captured stderr: find each one by its prefix
    errors = re.findall(r"error \(rank (\d)\): saving checkpoint \S+ failed: (\S+): File too large; the previous "
                        r"checkpoint global_step2 is kept", failed.stderr)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], failed.stderr[-3000:]
    assert all(path.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for _, path in errors)  # rank 1's file
    assert no_traceback_of_ours(failed.stderr)
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.startswith("global")) == ["global_step2"]


def test_a_second_run_on_the_same_directory_is_refused_with_the_holders_identity(tiny_shards, tmp_path):
    env = run_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())})
    cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", "--config", TINY_RUN, "--deepspeed", ZERO3, "--data-dir",
           str(tiny_shards), "--output-dir", str(tmp_path), "--set", "max_steps=100000", "--set", "save_interval=100000",
           "--set", "log_interval=1"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.5)
    second = pretrain(tiny_shards, tmp_path, nproc=1, sets=["max_steps=2"])
    first.send_signal(signal.SIGUSR1)
    first.communicate(timeout=240)
    assert first.returncode == 75
    assert second.returncode == 1, explain(second)
    assert f"in use by another pretraining run (host {os.uname().nodename}, pid {first.pid}" in second.stderr
    assert not (tmp_path / "deberta-ds.lock").exists()      # released by the run that held it
    # a lock left by a run that was killed (its pid is gone) is taken over
    (tmp_path / "deberta-ds.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": first.pid,
                                                          "started": "earlier"}))
    taken = pretrain(tiny_shards, tmp_path, nproc=1, sets=["max_steps=2"])
    assert taken.returncode == 0, explain(taken)
    assert "took over the lock of a pretraining run that is gone" in taken.stderr
