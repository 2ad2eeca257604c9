"""What a resumed pretraining run may change (pipeline/train/resume.py), on 2 gloo ranks with the tiny model:
the schedule's settings are applied, announced and recorded; settings the data order, batch or optimizer state
depend on are refused in one line saying how to change them; another ZeRO stage loads through DeepSpeed's
universal format."""
import json
import shutil

import pytest

from tests.helpers.pretrain import NO_DROPOUT, explain, losses, pretrain

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


def test_another_zero_stage_resumes_through_the_universal_format(two_steps, tiny_shards, tmp_path):
    run = copy_of(two_steps, tmp_path)
    result = pretrain(tiny_shards, run, sets=FIRST + ["max_steps=4"], ds_sets=["zero_optimization.stage=2"])
    assert result.returncode == 0, explain(result)
    assert "resumed from global_step2_universal at step 2" in result.stderr
    meta = json.loads((run / "checkpoints" / "global_step4" / "deberta_ds.json").read_text())
    assert meta["zero_stage"] == 2 and sorted(losses(run)) == [1, 2, 3, 4]
