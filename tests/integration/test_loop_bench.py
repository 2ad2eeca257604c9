"""`python -m bench.loop --quick` runs end to end: its bare side and `deberta-ds pretrain` give a row per mode, and
the bare side trains the trainer's model on the trainer's batches (the same first loss), so the ratio compares
like with like. Two modes (ZeRO-3 with leaf layers, objective rtd) keep it near a minute; each runs one torchrun."""
import json
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, explain, run_env


def test_quick_loop_bench_prints_each_mode_with_the_trainers_first_loss(tiny_shards, tmp_path):
    report = tmp_path / "loop.json"
    result = subprocess.run([sys.executable, "-m", "bench.loop", "--quick", "--modes", "zero3,rtd", "--data-dir",
                             str(tiny_shards), "--work", str(tmp_path), "--json", str(report)],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, explain(result)
    rows = json.loads(report.read_text())["modes"]
    assert list(rows) == ["zero3", "rtd"]
    table = [line.split("|")[0].strip() for line in result.stdout.splitlines() if "|" in line]
    assert table == ["mode", "zero3", "rtd"], result.stdout
    for mode, row in rows.items():
        assert row["bare_s"] > 0 and row["loop_s"] > 0 and row["ratio"] == pytest.approx(row["loop_s"] / row["bare_s"])
        # dropout on: the same weights, batches, masks and random streams on both sides
        assert row["first_loss_bare"] == pytest.approx(row["first_loss_loop"], rel=1e-6), mode
    assert not list(tmp_path.glob("run-*")), "the run directories are removed once read"
