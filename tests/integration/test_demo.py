"""`make demo` (`python -m scripts.demo`) end to end, shortened (40 pretraining steps, 1 fine-tuning epoch), for both
objectives: every step a real `deberta-ds` command, the summary read from what they wrote."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT


def run_demo(out, objective):
    env = dict(os.environ, DEMO_OUT=str(out), DEMO_OBJECTIVE=objective, DEMO_PRETRAIN_STEPS="40",
               DEMO_FINETUNE_EPOCHS="1")
    return subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("objective", ["mlm", "rtd"])
def test_demo_runs_every_step(tmp_path, objective):
    out = tmp_path / "demo"
    result = run_demo(out, objective)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("== what the demo produced")[1]
    assert "pretraining 40 steps" in summary
    assert "verify: transformers vs deberta-ds" in summary
    with open(out / "submission" / "BoolQ.jsonl") as f:
        assert len(f.readlines()) == 100
    with open(out / "finetune" / "metrics.json") as f:
        accuracy = json.load(f)["best"]["val"]["accuracy"]
    assert f"best val accuracy {accuracy:.2f}" in summary
    if objective == "rtd":
        assert (out / "release" / "pytorch_model.generator.bin").exists()
        for what in ("generator MLM loss", "discriminator RTD loss", "share of tokens replaced",
                     "discriminator accuracy"):
            assert what in summary
    else:
        assert not (out / "release" / "pytorch_model.generator.bin").exists()
        assert "MLM+EMD loss" in summary


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_demo(tmp_path, "mlm")
    assert result.returncode == 1 and "holds files the demo did not make" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
