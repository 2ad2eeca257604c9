"""Distributed pretraining for real: torchrun, 2 gloo ranks on the CPU, the tiny model on shards of the
embedded corpus. Losses are compared step by step from each run's metrics.jsonl."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import NO_DROPOUT, PIPE, ROOT, TINY_RUN, ZERO3, explain, free_port, losses, pretrain, run_env
from tests.helpers.pretrain import eval_sets

TOL = 1e-5


def assert_close(a, b, steps, tol=TOL):
    for step in steps:
        assert abs(a[step] - b[step]) <= tol, f"step {step}: {a[step]} vs {b[step]}"


@pytest.fixture(scope="module")
def zero3_two_ranks(tiny_shards, valid_shards, tmp_path_factory):
    """The 2-rank ZeRO-3 baseline (no dropout): 4 steps, checkpoints at 2 and 4, held-out evaluations at
    2 and 4."""
    out = tmp_path_factory.mktemp("zero3_2")
    result = pretrain(tiny_shards, out, nproc=2, sets=NO_DROPOUT + ["max_steps=4", "save_interval=2"]
                      + eval_sets(valid_shards))
    assert result.returncode == 0, explain(result)
    (out / "pretrain.stderr").write_text(result.stderr)
    return out


def test_zero3_on_two_ranks_equals_one_process(zero3_two_ranks, tiny_shards, valid_shards, tmp_path):
    # same global batch (8): 2 ranks x micro 4, or 1 rank x micro 4 x 2 accumulation steps
    result = pretrain(tiny_shards, tmp_path, nproc=1, sets=NO_DROPOUT + ["max_steps=4"] + eval_sets(valid_shards))
    assert result.returncode == 0, explain(result)
    two, one = losses(zero3_two_ranks), losses(tmp_path)
    assert_close(two, one, range(1, 5))
    assert two[4] < two[1]  # it learns
    # the held-out loss: the same samples and masks whatever the number of ranks
    val_two, val_one = losses(zero3_two_ranks, "val_loss"), losses(tmp_path, "val_loss")
    assert sorted(val_two) == sorted(val_one) == [2, 4]
    assert_close(val_two, val_one, [2, 4])
    assert val_two[4] < val_two[2]
    assert "validation: 8 of" in result.stderr


def test_evaluation_leaves_training_as_it_was(tiny_shards, valid_shards, tmp_path):
    """With dropout on: an evaluation after every step must leave the model in training mode, with no
    gradient and no random draw of its own, so the training losses equal a run without it."""
    plain = pretrain(tiny_shards, tmp_path / "plain", nproc=1, sets=["max_steps=3"])
    evaluated = pretrain(tiny_shards, tmp_path / "eval", nproc=1, sets=["max_steps=3"] + eval_sets(valid_shards, 1))
    assert plain.returncode == 0 and evaluated.returncode == 0, explain(evaluated)
    assert losses(tmp_path / "plain") == losses(tmp_path / "eval")
    records = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl", encoding="utf-8")]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert all(0 <= r["val_mlm_accuracy"] < 1 and r["eval_time_s"] > 0 for r in evals)


def test_validation_set_that_cannot_serve_is_refused(tiny_shards, valid_shards, tmp_path):
    result = pretrain(tiny_shards, tmp_path / "big", nproc=1, sets=["max_steps=2"]
                      + eval_sets(valid_shards, steps=100000))
    assert result.returncode == 1
    assert "validation samples, fewer than eval_steps x global_batch_size = 100000 x 8" in result.stderr
    missing = pretrain(tiny_shards, tmp_path / "missing", nproc=1, sets=["max_steps=2"]
                       + eval_sets(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "validation directory" in missing.stderr
    assert not (tmp_path / "big" / "checkpoints" / "global_step2").exists()


def test_zero3_checkpoint_has_universal_info_and_resumes_on_one_rank(zero3_two_ranks, tiny_shards, tmp_path):
    """2 ranks -> 1 rank: the run converts its checkpoint to DeepSpeed's universal format by itself
    (no --inject_missing_state) and continues with the same losses as the 2-rank run."""
    run = tmp_path / "run"
    shutil.copytree(zero3_two_ranks, run)
    shutil.rmtree(run / "checkpoints" / "global_step4")  # resume from step 2
    result = pretrain(tiny_shards, run, nproc=1, sets=NO_DROPOUT + ["max_steps=4", "save_interval=2"])
    assert result.returncode == 0, explain(result)
    assert "resumed from global_step2_universal at step 2" in result.stderr
    assert_close(losses(zero3_two_ranks), losses(run), [3, 4])


def test_zero3_leaf_layers_change_nothing_but_the_hooks(zero3_two_ranks, tiny_shards, tmp_path):
    """The baseline gathers encoder layers whole (DeepSpeed leaf modules, the default): of the tiny model's
    2 layers only the first, as the EMD runs the last one twice. Per-module gathering gives the same losses."""
    assert "ZeRO 3 (1 of 2 encoder layers gathered whole)" in (zero3_two_ranks / "pretrain.stderr").read_text()
    result = pretrain(tiny_shards, tmp_path, nproc=2, sets=NO_DROPOUT + ["max_steps=4", "zero3_leaf_layers=false"])
    assert result.returncode == 0, explain(result)
    assert "ZeRO 3, global batch" in result.stderr
    assert_close(losses(zero3_two_ranks), losses(tmp_path), range(1, 5))


def test_leaf_layers_are_those_a_forward_runs_once():
    from model import DebertaForMaskedLM, preset
    from pipeline.train.zero3 import leaf_layers
    config = preset("tiny", num_hidden_layers=3)
    with_emd, without = DebertaForMaskedLM(config, emd=True), DebertaForMaskedLM(config, emd=False)
    assert leaf_layers(with_emd) == list(with_emd.deberta.encoder.layer[:2])
    assert leaf_layers(without) == list(without.deberta.encoder.layer)


def test_pipeline_two_stages_equal_one_stage(tiny_shards, valid_shards, tmp_path):
    common = NO_DROPOUT + ["mode=pipeline", "max_steps=3", "save_interval=3"] + eval_sets(valid_shards)
    one = pretrain(tiny_shards, tmp_path / "one", nproc=1, ds=PIPE, sets=common + ["pipeline_stages=1"])
    assert one.returncode == 0, explain(one)
    two = pretrain(tiny_shards, tmp_path / "two", nproc=2, ds=PIPE, sets=common + ["pipeline_stages=2"])
    assert two.returncode == 0, explain(two)
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "two"), range(1, 4))
    assert_close(losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss"), [2, 3])
    files = os.listdir(tmp_path / "two" / "checkpoints" / "global_step3")
    assert any(f.startswith("layer_") for f in files)  # the pipeline engine's per-layer files


def test_activation_checkpointing_changes_nothing_but_memory(zero3_two_ranks, tiny_shards, tmp_path):
    result = pretrain(tiny_shards, tmp_path / "z", nproc=2, sets=NO_DROPOUT + ["max_steps=2",
                                                                               "activation_checkpointing=true"])
    assert result.returncode == 0, explain(result)
    assert_close(losses(zero3_two_ranks), losses(tmp_path / "z"), [1, 2])
    common = NO_DROPOUT + ["mode=pipeline", "max_steps=2", "pipeline_stages=2"]
    plain = pretrain(tiny_shards, tmp_path / "p", nproc=2, ds=PIPE, sets=common)
    ckpt = pretrain(tiny_shards, tmp_path / "pc", nproc=2, ds=PIPE, sets=common + ["activation_checkpointing=true"])
    assert plain.returncode == 0 and ckpt.returncode == 0, explain(ckpt)
    assert_close(losses(tmp_path / "p"), losses(tmp_path / "pc"), [1, 2])


def test_sigkill_then_resume_is_bitwise_exact(tiny_shards, tmp_path):
    """With dropout on: a run killed (SIGKILL) after the step-3 checkpoint and resumed gives exactly the
    losses of an uninterrupted run (model, optimizer, LR schedule, data cursor and RNG all restored)."""
    sets = ["max_steps=6", "save_interval=3"]
    whole = pretrain(tiny_shards, tmp_path / "whole", nproc=2, sets=sets)
    assert whole.returncode == 0, explain(whole)
    killed = pretrain(tiny_shards, tmp_path / "cut", nproc=2, sets=sets,
                      extra_env={"DEBERTA_DS_FAULT": "kill:4"})
    assert killed.returncode != 0
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints"))[0] == "global_step3"
    resumed = pretrain(tiny_shards, tmp_path / "cut", nproc=2, sets=sets)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from global_step3 at step 3" in resumed.stderr
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_sigusr1_saves_and_exits_75_then_resumes(tiny_shards, tmp_path):
    env = run_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())})
    cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", "--config", TINY_RUN, "--deepspeed", ZERO3,
           "--data-dir", str(tiny_shards), "--output-dir", str(tmp_path), "--set", "max_steps=100000",
           "--set", "save_interval=100000", "--set", "log_interval=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert "stopping on SIGUSR1" in err
    saved = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("global_step")]
    assert len(saved) == 1
    step = int(saved[0][len("global_step"):])
    again = pretrain(tiny_shards, tmp_path, nproc=1, sets=[f"max_steps={step + 2}"])
    assert again.returncode == 0, explain(again)
    assert f"resumed from global_step{step} at step {step}" in again.stderr
    assert max(losses(tmp_path)) == step + 2


def test_bf16_zero3_trains_and_keeps_the_last_k_checkpoints(tiny_shards, tmp_path):
    result = pretrain(tiny_shards, tmp_path, nproc=2, sets=["max_steps=3", "save_interval=1", "keep_last=2"],
                      ds_sets=["bf16.enabled=true"])
    assert result.returncode == 0, explain(result)
    found = losses(tmp_path)
    assert all(0 < found[s] < 20 for s in (1, 2, 3))
    kept = sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("global_step"))
    assert kept == ["global_step2", "global_step3"]


def test_model_config_that_differs_from_the_checkpoint_is_refused(zero3_two_ranks, tiny_shards, tmp_path):
    shutil.copytree(zero3_two_ranks, tmp_path / "run")
    result = pretrain(tiny_shards, tmp_path / "run", nproc=1,
                      sets=NO_DROPOUT + ["max_steps=6", "model_overrides.intermediate_size=96"])
    assert result.returncode != 0
    assert "the model config differs from the checkpoint's (intermediate_size: checkpoint 128 vs run 96)" in result.stderr


@pytest.mark.parametrize("sets, ds_sets, ds, message", [
    (["mode=pipeline", "pipeline_stages=1"], [], ZERO3, "ZeRO stage 3 with mode 'pipeline'"),
    ([], ["train_batch_size=16"], ZERO3, "train_batch_size is 16 but the run config gives 8"),
    (["global_batch_size=6"], [], ZERO3, "global_batch_size 6 is not a multiple of micro_batch_size 4"),
    (["modle=tiny"], [], ZERO3, "unknown setting 'modle'"),
    ([], [], ZERO3 + ".missing", "DeepSpeed config not found"),
])
def test_bad_configs_fail_before_training(tiny_shards, tmp_path, sets, ds_sets, ds, message):
    result = pretrain(tiny_shards, tmp_path, nproc=1, sets=sets, ds_sets=ds_sets, ds=ds)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_directory_is_a_clear_error(tmp_path):
    result = pretrain(tmp_path / "nowhere", tmp_path / "out", nproc=1)
    assert result.returncode != 0
    assert "does not exist (give --data-dir)" in result.stderr


def test_non_finite_loss_stops_the_run_with_a_message(tiny_shards, tmp_path):
    """fp32/bf16: the first non-finite loss stops the run (exit 3) before anything is saved; under fp16
    DeepSpeed skips such steps and the run stops after max_nonfinite_steps in a row."""
    result = pretrain(tiny_shards, tmp_path, nproc=1, sets=["max_steps=10", "lr=1e30", "warmup_steps=0"])
    assert result.returncode != 0
    assert "non-finite or skipped step(s) in a row at step 2 (fp32); stopping without saving" in result.stderr
    assert "exitcode  : 3" in result.stderr  # torchrun reports the rank's own exit code
    assert not any(d.startswith("global_step") for d in os.listdir(tmp_path / "checkpoints"))
