"""`deberta-ds pretrain --deepspeed auto` for real: torchrun, 2 gloo ranks on the CPU, the tiny model. The
planner picks ZeRO-1 in fp32 (the tiny model fits anywhere) and the run trains as the explicit ZeRO-3 config
does: the engine changes, the losses do not."""
import math

from tests.helpers.launch import NO_DROPOUT, cli, explain, losses, pretrain


def test_auto_runs_the_planned_config_on_two_cpu_ranks(tiny_shards, tmp_path):
    sets = NO_DROPOUT + ["max_steps=3", "save_interval=3", "log_interval=1"]
    auto = pretrain(tiny_shards, tmp_path / "auto", nproc=2, ds="auto", sets=sets)
    assert auto.returncode == 0, explain(auto)
    said = [line for line in auto.stdout.splitlines() if line.startswith("deepspeed auto:")]
    assert len(said) == 1, auto.stdout  # rank 0 says it, once
    assert said[0].startswith("deepspeed auto: ZeRO-1, micro-batch 4, no recomputation, fp32 on 2 x CPU")
    assert "fp32, ZeRO 1, global batch 8" in auto.stderr  # the start banner: what the engine started with
    zero3 = pretrain(tiny_shards, tmp_path / "zero3", nproc=2, sets=sets)
    assert zero3.returncode == 0, explain(zero3)
    planned, explicit = losses(tmp_path / "auto"), losses(tmp_path / "zero3")
    assert sorted(planned) == [1, 2, 3] and all(math.isfinite(v) for v in planned.values())
    for step in planned:
        assert abs(planned[step] - explicit[step]) <= 1e-5, f"step {step}: {planned[step]} vs {explicit[step]}"
    # a resumed run plans among the ZeRO stages that can load its checkpoint (DeepSpeed cannot load a ZeRO-3
    # checkpoint under ZeRO-1/2, nor the reverse)
    for run_dir, expected in (("zero3", "ZeRO-3"), ("auto", "ZeRO-1")):
        check = cli("pretrain", "--check-only", "--nodes", "1", "--ranks-per-node", "2", "--config", "tiny_cpu",
                    "--deepspeed", "auto", "--data-dir", str(tiny_shards), "--output-dir", str(tmp_path / run_dir))
        assert check.returncode == 0, explain(check)
        among = "ZeRO-3" if run_dir == "zero3" else "ZeRO-1/2"
        assert f"deepspeed auto: {expected}, micro-batch 4" in check.stdout
        assert f"among {among}, which can load checkpoint global_step3" in check.stdout
