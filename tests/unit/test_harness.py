"""The harness the tests, the benches and the demo share: every bench starts as `python -m bench.NAME` from the
root (no path set by hand) and refuses a bad option in one line; the summary of bench/gpu_checks.sh reads what
the parts left, failed and cut-short parts included; the synthetic SuperGLUE tasks are learnable (a keyword
decides each label); the option types the benches use."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_summary
from pipeline.cli_types import fraction, names_from
from tests.helpers.launch import ROOT, one_line_error, run_env
from tests.helpers.superglue import CB_KEYWORDS, write_tasks

BENCHES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "bench"))
                 if name.endswith(".py") and name not in ("__init__.py", "runs.py"))


def bench(*args, cwd=ROOT):
    env = run_env()
    env.pop("PYTHONPATH")  # as a user runs it: the root is on the path because `-m` runs from it
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_runs_as_a_module_from_the_root(name):
    result = bench(f"bench.{name}", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m bench.{name}")


def test_a_bad_bench_option_is_one_line():
    one_line_error(bench("bench.padding", "--micro-batch-size", "0"), "--micro-batch-size", "at least 1",
                   exit_code=2)
    one_line_error(bench("bench.finetune_compare", "--tasks", "CB,Nope"), "--tasks", "Nope", exit_code=2)


def test_no_bench_sets_its_own_path():
    for name in os.listdir(os.path.join(ROOT, "bench")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "bench", name), encoding="utf-8") as f:
                assert "sys.path" not in f.read(), name


def test_the_gpu_summary_shows_every_part_with_what_it_left(tmp_path):
    out = tmp_path / "gpu_out"
    (out / "pretrain_xxlarge").mkdir(parents=True)
    (out / "parts.tsv").write_text("tests\t1\t95\nstep\t0\t40\npretrain\t124\t120\nattention_512\t0\t30\n")
    (out / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="test_a"/><testcase name="test_b">'
        '<failure message="assert 2e-3 &lt;= 1e-4"/></testcase></testsuite></testsuites>')
    (out / "train_step.json").write_text(json.dumps(
        {"results": {"train_bf16": {"ours_emd": {"tokens_per_s": 30000.0, "mfu": 0.41, "peak_gb": 60.0}}}}))
    (out / "pretrain_xxlarge" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "tokens_per_s": t, "mfu": m}) + "\n"
                for s, t, m in ((4, 100.0, 0.1), (8, 2000.0, 0.3), (12, 2200.0, 0.32))))
    (out / "attention_512.json").write_text(json.dumps([
        {"length": 512, "batch": 16, "path": "sdpa", "fwd_bwd_ms": 9.0, "fwd_ms": 3.0, "peak_gib": 2.0,
         "difference": "reference"},
        {"length": 512, "batch": 16, "path": "fused", "fwd_bwd_ms": 6.0, "fwd_ms": 2.0, "peak_gib": 0.5,
         "difference": 0.004}]))
    rows = {line.split("|")[1].strip(): line for line in gpu_summary.table(str(out)).splitlines()[2:]}
    assert "1 of 2 passed; failed: test_b; the first: assert 2e-3 <= 1e-4" in rows["tests"]
    assert "failed (exit 1), 95 s" in rows["tests"]
    assert "30000 tokens/s, MFU 41.0%" in rows["step"] and "ok, 40 s" in rows["step"]
    # the first logged interval (warm-up) is left out of the median; a part cut at its limit says so
    assert "2100 tokens/s, MFU 31.0% (median of 2 intervals)" in rows["pretrain"] and "time limit" in rows["pretrain"]
    assert "sdpa 9.0 ms" in rows["attention_512"] and "fused 6.0 ms, 0.5 GiB, diff 4.0e-03" in rows["attention_512"]
    assert rows["attention_long"].endswith("| - | not run |") and rows["data"].endswith("| - | not run |")


def test_the_synthetic_tasks_are_learnable(tmp_path):
    lines = write_tasks(str(tmp_path), ["CB", "ReCoRD"], train=20, val=5, seed=1)
    assert len(lines) > 4000  # the tasks' text and the plain text the tokenizer also learns from
    with open(tmp_path / "CB" / "train.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 20
    for record in records:  # the hypothesis holds its label's keyword and no other label's
        words = record["hypothesis"].split()
        assert [label for label, word in CB_KEYWORDS.items() if word in words] == [record["label"]]
    with open(tmp_path / "ReCoRD" / "val.jsonl", encoding="utf-8") as f:
        record = json.loads(f.readline())
    answer = record["qas"][0]["answers"][0]
    assert record["passage"]["text"][answer["start"]:answer["end"] + 1] == answer["text"]


def test_the_bench_option_types():
    assert fraction("0") == 0.0 and fraction("0.15") == 0.15
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            fraction(bad)
    tasks = names_from(("BoolQ", "CB"))
    assert tasks("CB, BoolQ") == ["CB", "BoolQ"]
    with pytest.raises(argparse.ArgumentTypeError, match="Nope: choose from BoolQ,CB"):
        tasks("CB,Nope")
    with pytest.raises(argparse.ArgumentTypeError):
        tasks(",")
