"""What a resumed pretraining run may change (pipeline/train/resume.py), on 2 gloo ranks with the tiny model:
the schedule's settings are applied, announced and recorded; settings the data order, batch or optimizer state
depend on are refused in one line saying how to change them, and so are another ZeRO stage or precision."""
import json
import shutil

import pytest

from tests.helpers.launch import NO_DROPOUT, explain, losses, pretrain

FIRST = NO_DROPOUT + ["max_steps=2", "save_interval=2", "warmup_steps=1", "log_interval=1", "lr=1e-3"]


@pytest.fixture(scope="module")
def two_steps(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("changes") / "run"
    result = pretrain(tiny_shards, out, sets=FIRST)
    assert result.returncode == 0, explain(result)
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def lr_at(run, step):
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["lr"] for line in f if '"lr"' in line and json.loads(line)["step"] == step][-1]


def test_a_new_lr_and_max_steps_on_resume_are_applied_announced_and_recorded(two_steps, tiny_shards, tmp_path):
    run = copy_of(two_steps, tmp_path)
    result = pretrain(tiny_shards, run, sets=NO_DROPOUT + ["max_steps=6", "save_interval=2", "warmup_steps=1",
                                                           "log_interval=1", "lr=5e-4"])
    assert result.returncode == 0, explain(result)
    assert "resumed with changed settings at step 2: lr 0.001 -> 0.0005, max_steps 2 -> 6" in result.stderr
    # after update 3 the schedule has taken 3 steps: factor (6 - 3) / (6 - 1) of the new peak, not the old one
    assert lr_at(run, 3) == pytest.approx(5e-4 * 3 / 5)
    meta = json.loads((run / "checkpoints" / "global_step6" / "deberta_ds.json").read_text())
    assert meta["changes"] == [{"step": 2, "lr": [1e-3, 5e-4], "max_steps": [2, 6]}]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_a_setting_the_run_depends_on_is_refused_on_resume_with_the_way_to_change_it(two_steps, tiny_shards,
                                                                                   tmp_path):
    run = copy_of(two_steps, tmp_path)
    result = pretrain(tiny_shards, run, sets=FIRST + ["max_steps=4", "seed=7"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line and "seed" in line]
    assert errors and "seed: checkpoint 1234 vs run 7 cannot change when a run resumes" in errors[0], explain(result)
    assert "init_from_release" in errors[0]
    assert "Traceback" not in "\n".join(line for line in result.stderr.splitlines() if "/pipeline/" in line)


def test_another_zero_stage_or_precision_is_refused_with_the_way_to_change_it(two_steps, tiny_shards, tmp_path):
    """ZeRO-3 writes other files than ZeRO-1/2, and DeepSpeed's loader (its universal format too) cannot read them
    under another stage: before, this died in an AssertionError inside DeepSpeed."""
    run = copy_of(two_steps, tmp_path)
    for ds_sets, what in ((["zero_optimization.stage=2"], "ZeRO stage 3 (this run: 2)"),
                          (["bf16.enabled=true"], "precision fp32 (this run: bf16)")):
        result = pretrain(tiny_shards, run, sets=FIRST + ["max_steps=4"], ds_sets=ds_sets)
        assert result.returncode == 1, explain(result)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert errors and f"written with {what}" in errors[0] and "init_from_release" in errors[0], explain(result)
    assert sorted(losses(run)) == [1, 2]                                  # nothing trained, nothing written
