"""`deberta-ds plan`: DeepSpeed's own ZeRO-3 estimator for the 1.5B model, and sane choices."""
import json
import os
import subprocess
import sys

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(*args):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--config", "configs/pretrain_xxlarge.json",
                             "--json", *args], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_uses_deepspeeds_zero3_estimate_for_the_1p5b_model():
    result = plan("--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gb", "80")
    assert result["parameters"] == 1_567_041_636 + 786_432  # MLM head + EMD position table
    _, expected, _ = estimate_zero3_model_states_mem_needs(result["parameters"], 128100 * 1536, 8, 2,
                                                           cpu_offload=False, cpu_offload_params=False)
    zero3 = [r for r in result["rows"] if r["mode"] == "zero3"]
    assert abs(zero3[0]["model_states_gb"] * 1024 ** 3 - expected) < 1e-3 * expected
    # bigger micro-batches need more memory; recomputation needs less
    totals = [r["total_gb"] for r in zero3 if not r["activation_checkpointing"]]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert all(r["fits"] for r in zero3 if r["micro_batch"] == 1)


def test_small_gpus_do_not_fit_large_micro_batches_and_stages_must_divide_gpus():
    result = plan("--nodes", "1", "--gpus-per-node", "6", "--gpu-memory-gb", "16", "--pipeline-stages", "4")
    assert not any(r["mode"] == "pipeline" for r in result["rows"])  # 4 stages do not divide 6 GPUs
    assert not all(r["fits"] for r in result["rows"])


def test_rtd_counts_generator_and_discriminator_and_plans_the_zero3_mode_only():
    import torch

    from model.rtd import RTDModel
    from pipeline.train.config import RunConfig
    run = RunConfig.from_file("configs/pretrain_v3_large.json", [])
    with torch.device("meta"):
        both = RTDModel(run.model_config(), run.generator_config(), run.embedding_sharing)
    rtd = plan("--set", "objective=rtd", "--config", "configs/pretrain_v3_large.json")
    assert rtd["parameters"] == sum(p.numel() for p in both.parameters())
    assert {r["mode"] for r in rtd["rows"]} == {"zero3"}
    mlm = plan("--set", "objective=mlm", "--config", "configs/pretrain_v3_large.json", "--pipeline-stages", "8")
    assert mlm["parameters"] < rtd["parameters"] and {r["mode"] for r in mlm["rows"]} == {"zero3", "pipeline"}
