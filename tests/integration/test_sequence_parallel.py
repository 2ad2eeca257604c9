"""Sequence parallelism (sequence_parallel_size, DeepSpeed Ulysses) for real: 2 gloo ranks on the CPU holding
half of every sequence each, against one process holding whole sequences."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.launch import NO_DROPOUT, ROOT, explain, free_port, losses, pretrain, run_env

SP2 = ["sequence_parallel_size=2"]
TOL = 1e-5


def assert_close(a, b, steps):
    for step in steps:
        assert abs(a[step] - b[step]) <= TOL, f"step {step}: {a[step]} vs {b[step]}"


def test_split_model_has_the_loss_and_gradients_of_the_whole_one():
    """The tiny MLM model (conv, EMD, padding) and the RTD model, split over 2 ranks: the same loss, and the
    group's summed gradients are 2 x the unsplit model's, for every parameter (tests/helpers/
    sequence_parallel_check.py)."""
    script = os.path.join(ROOT, "tests", "helpers", "sequence_parallel_check.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), script, "math", "eager", "blockwise"]
    result = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)
    found = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert sorted(found) == ["mlm blockwise", "mlm eager", "mlm math", "rtd blockwise", "rtd eager", "rtd math"]
    for case, (loss_diff, grad_diff, largest) in found.items():
        assert loss_diff <= TOL and grad_diff <= TOL, (case, loss_diff, grad_diff)
        assert largest > 1e-3, case  # the gradients compared are not all zero


@pytest.fixture(scope="module")
def sp_two(tiny_shards, tmp_path_factory):
    """2 ranks, one sequence group (SP=2, data-parallel 1), no dropout: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("sp2")
    result = pretrain(tiny_shards, out, nproc=2, sets=NO_DROPOUT + SP2 + ["max_steps=4", "save_interval=2"])
    assert result.returncode == 0, explain(result)
    assert "sequence parallel 2" in result.stderr
    return out


def test_sp2_equals_one_process_without_sp(sp_two, tiny_shards, tmp_path):
    result = pretrain(tiny_shards, tmp_path, nproc=1, sets=NO_DROPOUT + ["max_steps=4"])
    assert result.returncode == 0, explain(result)
    split, whole = losses(sp_two), losses(tmp_path)
    assert_close(split, whole, range(1, 5))
    assert split[4] < split[1]  # it learns


def test_sp2_sigkill_then_resume_is_bitwise_exact(sp_two, tiny_shards, tmp_path):
    sets = NO_DROPOUT + SP2 + ["max_steps=4", "save_interval=2"]
    killed = pretrain(tiny_shards, tmp_path, nproc=2, sets=sets, extra_env={"DEBERTA_DS_FAULT": "kill:3"})
    assert killed.returncode != 0
    assert sorted(os.listdir(tmp_path / "checkpoints"))[0] == "global_step2"
    resumed = pretrain(tiny_shards, tmp_path, nproc=2, sets=sets)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from global_step2 at step 2" in resumed.stderr
    a, b = losses(sp_two), losses(tmp_path)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


def test_sp2_checkpoint_resumes_on_one_rank_without_sp(sp_two, tiny_shards, tmp_path):
    """SP=2 -> SP=1: the engine's states were partitioned over 2 ranks; the run goes through DeepSpeed's
    universal checkpoint by itself and continues with the losses of the SP=2 run."""
    run = tmp_path / "run"
    shutil.copytree(sp_two, run)
    shutil.rmtree(run / "checkpoints" / "global_step4")
    result = pretrain(tiny_shards, run, nproc=1, sets=NO_DROPOUT + ["max_steps=4", "save_interval=2"])
    assert result.returncode == 0, explain(result)
    assert "resumed from global_step2_universal at step 2" in result.stderr
    assert_close(losses(sp_two), losses(run), [3, 4])


def test_rtd_sp2_equals_one_process_without_sp(tiny_shards, tmp_path):
    """Objective rtd (decoupled: two engines, each over split encoders; the generator's samples are the group's
    first rank's), the split run recomputing its layers in backward (activation_checkpointing: the all-to-alls
    run again inside backward)."""
    sets = NO_DROPOUT + ["objective=rtd", "max_steps=2", "log_interval=1"]
    split = pretrain(tiny_shards, tmp_path / "sp2", nproc=2, sets=sets + SP2 + ["activation_checkpointing=true"])
    whole = pretrain(tiny_shards, tmp_path / "sp1", nproc=1, sets=sets)
    for result in (split, whole):
        assert result.returncode == 0, explain(result)
    for key in ("loss", "rtd_loss", "mlm_loss"):
        assert_close(losses(tmp_path / "sp2", key), losses(tmp_path / "sp1", key), [1, 2])


def readme_long_input_commands():
    """The commands of README's code block that runs sequence_parallel_size=2, one string each."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = f.read().split("```")[1::2]
    block = next(b for b in blocks if "sequence_parallel_size=2" in b)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_4096_token_run_with_sp2_converts_to_a_release_transformers_loads(tiny_shards, tmp_path):
    """README's commands as written (the demo's corpus and tokenizer: the fixture's), run from a directory where
    demo_out/ is that: preprocess at 4096, pretrain with SP=2 on 2 ranks, convert with --verify; then
    transformers runs the release on 4096 tokens."""
    import shlex
    work = tiny_shards.parent
    (tmp_path / "demo_out").mkdir()
    for name in ("corpus", "spm.model"):
        os.symlink(work / name, tmp_path / "demo_out" / name)
    launchers = {"deberta-ds": [sys.executable, "-m", "pipeline.cli"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port())]}
    for command in readme_long_input_commands():
        argv = shlex.split(command)
        result = subprocess.run(launchers[argv[0]] + argv[1:], cwd=tmp_path, env=run_env(), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{explain(result)}"
    release = tmp_path / "long" / "release"
    check = ("import sys, torch, transformers; m = transformers.AutoModelForMaskedLM.from_pretrained(sys.argv[1]); "
             "ids = torch.randint(5, 1000, (1, 4096)); print(tuple(m(ids).logits.shape), "
             "m.config.max_position_embeddings)")
    result = subprocess.run([sys.executable, "-c", check, str(release)], env=run_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, explain(result)
    assert result.stdout.split()[-4:] == ["(1,", "4096,", "1100)", "4096"], result.stdout
