"""`deberta-ds plan` and `--deepspeed auto`: DeepSpeed's own estimators for the 1.5B model under ZeRO-1, 2 and 3,
the rule that picks the fastest configuration that fits, and the DeepSpeed config auto builds from it."""
import argparse
import contextlib
import io
import json
import os

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pipeline.run.ds_config import load_ds_config
from pipeline.errors import ConfigError
from pipeline.train import auto_ds
from pipeline.train import plan as planner
from pipeline.train.config import RunConfig
from tests.helpers.launch import cli, explain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 1024 ** 3
PARAMS_1P5B = 1_567_041_636 + 786_432  # MLM head + EMD position table
LARGEST_1P5B = 128100 * 1536  # the word table


def plan(*args, config="configs/pretrain_xxlarge.json"):
    """`deberta-ds plan --json ...` in this process (its parser and run; the CLI itself: test_plan_cli_...)."""
    parser = argparse.ArgumentParser()
    planner.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert planner.run(parser.parse_args(["--config", os.path.join(ROOT, config), "--json", *args])) == 0
    return json.loads(out.getvalue())


def expected_states(stage, gpus_per_node, nodes):
    """Per-GPU model states of the 1.5B model from DeepSpeed's estimators alone (ZeRO-1: ZeRO-2's with the
    16-bit gradients whole, 2 bytes/param instead of 2/N)."""
    gpus = gpus_per_node * nodes
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(PARAMS_1P5B, LARGEST_1P5B, gpus_per_node, nodes,
                                                     cpu_offload=False, cpu_offload_params=False)[1]
    zero2 = estimate_zero2_model_states_mem_needs(PARAMS_1P5B, gpus_per_node, nodes, cpu_offload=False)[1]
    return zero2 + (2 * PARAMS_1P5B - int(2 * PARAMS_1P5B / gpus) if stage == 1 else 0)


def expected_choice(gpus_per_node, nodes, memory_gb, micro_cap=16, seq=512):
    """The rule applied by hand to the estimators' states and the activation formula: (stage, micro, recompute)."""
    config = RunConfig.from_file("xxlarge").model_config()
    share = 2048 // (gpus_per_node * nodes)
    options = []
    for stage in (1, 2, 3):
        for micro in [m for m in range(1, micro_cap + 1) if share % m == 0]:
            for recompute in (False, True):
                need = expected_states(stage, gpus_per_node, nodes) + \
                    planner.activation_bytes(config, micro, seq, 49, recompute)
                if need <= 0.9 * memory_gb * GB:
                    options.append((stage, recompute, -micro))
    stage, recompute, micro = min(options)
    return stage, -micro, recompute


def test_plan_uses_deepspeeds_estimates_for_each_zero_stage():
    result = plan("--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gb", "80")
    assert result["parameters"] == PARAMS_1P5B
    for stage in (1, 2, 3):
        rows = [r for r in result["rows"] if r["mode"] == "zero3" and r["zero_stage"] == stage]
        expected = expected_states(stage, 8, 2)
        assert abs(rows[0]["model_states_gb"] * GB - expected) < 1e-6 * expected
        # bigger micro-batches need more memory; recomputation needs less
        totals = [r["total_gb"] for r in rows if not r["activation_checkpointing"]]
        assert totals == sorted(totals) and totals[0] < totals[-1]
        assert all(a["total_gb"] > b["total_gb"] for a, b in zip(rows[::2], rows[1::2]))
    # each stage up holds less: ZeRO-2 partitions the gradients, ZeRO-3 the weights too
    states = [next(r for r in result["rows"] if r["zero_stage"] == s)["model_states_gb"] for s in (1, 2, 3)]
    assert states == sorted(states, reverse=True)


def test_the_1p5b_recipe_on_80gb_gpus_is_zero1_without_recomputation():
    result = plan("--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gb", "80")
    choice = result["choice"]
    assert (choice["zero_stage"], choice["micro_batch"], choice["activation_checkpointing"]) == \
        expected_choice(8, 8, 80) == (1, 16, False)  # the shipped recipe's run config and zero1_bf16
    assert [r for r in result["rows"] if r["chosen"]] == [choice]
    # the rule, checked on the table: nothing that fits ranks before the choice
    assert all(planner.rule_key(r) >= planner.rule_key(choice) for r in result["rows"]
               if r["fits"] and r["mode"] == "zero3")
    recipe = RunConfig.from_file("xxlarge")
    assert (recipe.micro_batch_size, recipe.activation_checkpointing) == (16, False)


def test_plan_cli_prints_the_table_and_marks_the_choice():
    result = cli("plan", "--config", "xxlarge", "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gb", "80")
    assert result.returncode == 0, explain(result)
    chosen = [line for line in result.stdout.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].split()[:5] == ["zero3", "1", "1", "16", "no"]
    assert "rule: the lowest ZeRO stage that fits, then no recomputation" in result.stdout
    assert "chosen (mode zero3): ZeRO-1, micro-batch 16, no recomputation (57.9 GiB of 80)" in result.stdout


@pytest.mark.parametrize("gpus, memory_gb", [(8, 16), (4, 16), (2, 16), (8, 40)])
def test_smaller_gpus_get_the_choice_the_estimators_give(gpus, memory_gb):
    result = plan("--nodes", "1", "--gpus-per-node", str(gpus), "--gpu-memory-gb", str(memory_gb))
    choice = result["choice"]
    assert (choice["zero_stage"], choice["micro_batch"], choice["activation_checkpointing"]) == \
        expected_choice(gpus, 1, memory_gb)
    if gpus == 2:  # 16 GB: ZeRO-1/2 do not fit at all, ZeRO-3 only when recomputing
        assert choice["zero_stage"] == 3 and choice["activation_checkpointing"]


def test_stages_must_divide_gpus_and_a_global_batch_that_does_not_divide_is_named():
    result = plan("--nodes", "1", "--gpus-per-node", "6", "--gpu-memory-gb", "16", "--pipeline-stages", "4")
    assert not any(r["mode"] == "pipeline" for r in result["rows"])  # 4 stages do not divide 6 GPUs
    assert result["rows"] == [] and result["choice"] is None  # 2048 does not divide over 6 ranks
    assert "global_batch_size 2048 does not divide over 6 data-parallel ranks" in result["notes"][0]


def test_a_given_deepspeed_config_plans_its_own_stage_and_offload():
    offload = plan("--deepspeed", "zero3_offload_bf16", "--gpus-per-node", "8", "--gpu-memory-gb", "16")
    assert {r["zero_stage"] for r in offload["rows"]} == {3} and offload["cpu_offload"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(PARAMS_1P5B, LARGEST_1P5B, 8, 1, cpu_offload=True,
                                                      cpu_offload_params=True)
    assert abs(offload["rows"][0]["model_states_gb"] * GB - gpu) < 1e-6 * gpu


def test_rtd_counts_generator_and_discriminator_and_plans_the_zero3_mode_only():
    import torch

    from model.rtd import RTDModel
    run = RunConfig.from_file("configs/pretrain_v3_large.json", [])
    with torch.device("meta"):
        both = RTDModel(run.model_config(), run.generator_config(), run.embedding_sharing)
    rtd = plan("--set", "objective=rtd", config="configs/pretrain_v3_large.json")
    assert rtd["parameters"] == sum(p.numel() for p in both.parameters())
    assert {r["mode"] for r in rtd["rows"]} == {"zero3"} and rtd["choice"]["mode"] == "zero3"
    mlm = plan("--set", "objective=mlm", "--pipeline-stages", "8", config="configs/pretrain_v3_large.json")
    assert mlm["parameters"] < rtd["parameters"] and {r["mode"] for r in mlm["rows"]} == {"zero3", "pipeline"}


H100 = auto_ds.Device("cuda", "H100", 79.1, "bf16")


def choice_for(gpus_per_node, nodes, memory_gb, stage=None):
    run = RunConfig.from_file("xxlarge")
    row = planner.plan(run, nodes, gpus_per_node, memory_gb, 512, 1)["choice"]
    return run, (dict(row, zero_stage=stage) if stage else row)


def shipped(name):
    ds, _ = load_ds_config(name)
    return ds


def test_auto_builds_the_shipped_configs_for_the_recipes_cluster():
    run, row = choice_for(8, 8, 80)
    assert auto_ds.ds_config_for(row, run.model_config(), H100) == shipped("zero1_bf16")
    # ZeRO-3's settings follow the same hidden-size rules as the shipped ZeRO-3 config
    assert auto_ds.ds_config_for(dict(row, zero_stage=3), run.model_config(), H100) == shipped("zero3_bf16")


def test_auto_sets_micro_batch_recomputation_and_precision(capsys):
    run = RunConfig.from_file("xxlarge")
    chosen, ds, source = auto_ds.resolve(run, [], 64, 8, device=H100, seq_len=512)
    assert (chosen.micro_batch_size, chosen.activation_checkpointing) == (16, False)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 1 and source == "--deepspeed auto"
    line = capsys.readouterr().out
    assert line.startswith("deepspeed auto: ZeRO-1, micro-batch 16, no recomputation, bf16 on 64 x H100")
    # two 16 GB GPUs without bf16: ZeRO-3 with recomputation, fp16; --ds overrides apply on top
    v100 = auto_ds.Device("cuda", "V100", 16.0, "fp16")
    chosen, ds, source = auto_ds.resolve(run, ["gradient_clipping=0.5"], 2, 2, device=v100, seq_len=512,
                                         announce=False)
    assert ds["zero_optimization"]["stage"] == 3 and chosen.activation_checkpointing
    assert ds["fp16"] == {"enabled": True} and "bf16" not in ds and ds["gradient_clipping"] == 0.5
    assert capsys.readouterr().out == ""


def test_auto_refuses_what_it_cannot_plan():
    run = RunConfig.from_file("xxlarge")
    with pytest.raises(ConfigError, match="nothing fits in 90% of 16 GiB on each of 1 device: the smallest, ZeRO-3, "
                                          "micro-batch 1, activation recomputation, needs"):
        auto_ds.resolve(run, [], 1, 1, device=auto_ds.Device("cuda", "T4", 16.0, "fp16"), seq_len=512)
    with pytest.raises(ConfigError, match="the planner chooses the stage"):
        auto_ds.resolve(run, ["zero_optimization.stage=3"], 64, 8, device=H100, seq_len=512)
    with pytest.raises(ConfigError, match="optimizer 'cpu_adam' needs an offloading config"):
        auto_ds.resolve(RunConfig.from_file("xxlarge", ["optimizer=\"cpu_adam\""]), [], 64, 8, device=H100,
                        seq_len=512)
    with pytest.raises(ConfigError, match="only `deberta-ds pretrain` plans"):
        load_ds_config("auto")


def test_check_only_with_auto_plans_for_the_job_on_this_machine(tiny_shards, tmp_path):
    """The CPU: fp32, the node's memory shared by its ranks; preflight accepts the planned config."""
    result = cli("pretrain", "--check-only", "--nodes", "1", "--ranks-per-node", "2", "--config", "tiny_cpu",
                 "--deepspeed", "auto", "--data-dir", str(tiny_shards), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, explain(result)
    assert "deepspeed auto: ZeRO-1, micro-batch 4, no recomputation, fp32 on 2 x CPU" in result.stdout
    assert "seq 128" in result.stdout and "preflight ok: 2 ranks" in result.stdout
    refused = cli("pretrain", "--check-only", "--config", "tiny_cpu", "--deepspeed", "auto", "--ds",
                  "zero_optimization.stage=2", "--data-dir", str(tiny_shards), "--output-dir", str(tmp_path / "no"))
    assert refused.returncode == 1 and refused.stderr.startswith("error: --ds zero_optimization.stage with")
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- long sequences and sequence parallelism
def row(result, stage=1, micro=16, recompute=False):
    return next(r for r in result["rows"] if r["mode"] == "zero3" and r["zero_stage"] == stage
                and r["micro_batch"] == micro and r["activation_checkpointing"] == recompute)


def test_sequence_parallelism_splits_the_encoder_not_the_emd_nor_the_states():
    """SP 4 on 32 GPUs: 8 data-parallel ranks (micro-batches up to 2048/8), ZeRO states over all 32, the encoder's
    activations over 4 ranks, the EMD's layer whole on each."""
    config = RunConfig.from_file("xxlarge").model_config().replace(max_position_embeddings=2048,
                                                                   max_relative_positions=512)
    one = plan("--nodes", "4", "--gpus-per-node", "8", "--seq-len", "2048")
    four = plan("--nodes", "4", "--gpus-per-node", "8", "--seq-len", "2048", "--sequence-parallel", "4")
    assert (four["sequence_parallel"], four["data_parallel"], four["attention"]) == (4, 8, "linear")
    assert one["parameters"] == four["parameters"] == PARAMS_1P5B + 1536 * 1536  # the EMD table: 2048 rows
    assert row(four)["model_states_gb"] == row(one)["model_states_gb"]
    s, b, h, a = 2048, 16, 1536, 24
    split = (34 * s * b * h + 4 * a * s * b) / 4  # linear path: logsumexp, no s² term
    whole = 34 * s * b * h + 4 * a * s * b
    assert row(four)["activations_gb"] * GB == pytest.approx(48 * split + whole)
    assert row(one)["activations_gb"] * GB == pytest.approx(49 * whole)
    recomputed = 48 * 2 * s * b * h / 4 + 2 * s * b * h + whole
    assert row(four, recompute=True)["activations_gb"] * GB == pytest.approx(recomputed)
    assert planner.activation_bytes(config, 1, 512, 1, False) == 34 * 512 * h + 7 * a * 512 * 512  # eager at 512
    # one data-parallel rank per SP group of 8 GPUs takes 256 sequences: micro-batches up to the run's 16
    assert max(r["micro_batch"] for r in plan("--gpus-per-node", "8", "--sequence-parallel", "8")["rows"]) == 16


def test_sequence_parallel_must_divide_heads_and_gpus_and_the_table_says_what_it_assumes():
    with pytest.raises(ConfigError, match=r"^--sequence-parallel 5 does not divide the model's 24 attention heads"):
        plan("--gpus-per-node", "5", "--sequence-parallel", "5")
    with pytest.raises(ConfigError, match=r"^--sequence-parallel 8 does not divide the 4 GPUs"):
        plan("--gpus-per-node", "4", "--sequence-parallel", "8")
    parser = argparse.ArgumentParser()
    planner.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        planner.run(parser.parse_args(["--config", "xxlarge", "--nodes", "8", "--seq-len", "8192",
                                       "--sequence-parallel", "8"]))
    assert "sequence parallel 8: 8 data-parallel ranks x 8; per rank 1024 tokens" in out.getvalue()
    assert "attention: the linear-memory path is assumed above 512 tokens" in out.getvalue()
