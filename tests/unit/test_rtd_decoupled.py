"""Decoupled RTD training in process (one rank, gloo, real DeepSpeed ZeRO-3): the run setting, the official
order (D judges the batch G corrupted before its update, reading E_G after it), GDES across two engines (E_G
gets no RTD gradient and changes by G's step only), a checkpoint round trip of both engines, and no host read
inside a step."""
import os

import deepspeed
import pytest
import torch

from pipeline.data.mlm_loader import build_pretrain_loader
from pipeline.errors import ConfigError
from pipeline.run import checkpointer as checkpoint
from pipeline.run.ds_config import load_ds_config
from pipeline.train.config import RunConfig
from pipeline.train.modes import build_stepper, stepper_class
from pipeline.train.preflight import complete_for_run
from pipeline.train.rtd import RTDStepper
from pipeline.train.rtd_decoupled import DecoupledRTDStepper
from tests.unit.test_engine import HostReads

OVERRIDES = {"vocab_size": 700, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


def rtd_run(**settings):
    values = dict(model="tiny", model_overrides=OVERRIDES, objective="rtd", global_batch_size=8, micro_batch_size=4,
                  warmup_steps=1, max_steps=10, lr=2e-3)
    values.update(settings)
    run = RunConfig(**values)
    run.validate()
    return run


def stepper_of(run, data_env, stage=3):
    ds = complete_for_run(run, load_ds_config("cpu_zero3_fp32")[0], 1, "cpu_zero3_fp32")
    ds["zero_optimization"]["stage"] = stage
    torch.manual_seed(5)  # the same initial weights for every stepper of a test
    stepper = build_stepper(run, ds, run.model_config(), rank=0)
    stepper.feed(loader(data_env, stepper))
    return stepper


def loader(data_env, stepper, consumed=0):
    return build_pretrain_loader(data_env["shards"], data_env["spm"], 4, stepper.dp_rank, stepper.dp_size, 1234,
                                 consumed_samples=consumed, masking="rtd")


def gathered(param):
    with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
        return param.detach().clone()


def g_table(stepper):
    return gathered(stepper.module.generator.deberta.embeddings.word_embeddings.weight)


def test_decoupled_is_the_default_and_es_needs_joint():
    assert RunConfig().rtd_training == "decoupled"
    assert stepper_class(rtd_run()) is DecoupledRTDStepper
    assert stepper_class(rtd_run(rtd_training="joint")) is RTDStepper
    with pytest.raises(ConfigError, match="rtd_training 'both' is not one of"):
        rtd_run(rtd_training="both")
    with pytest.raises(ConfigError, match="embedding_sharing 'es' .* set rtd_training 'joint'"):
        rtd_run(embedding_sharing="es")
    rtd_run(embedding_sharing="es", rtd_training="joint")


@pytest.mark.parametrize("sharing", ["none", "gdes"])
def test_the_first_step_judges_the_batch_the_generator_corrupted_before_its_update(process_group, data_env,
                                                                                     sharing):
    """From the same weights, the first step's generator numbers equal joint training's (G's forward comes before
    any update in both). D judges the same corrupted batch: with no sharing its loss equals joint's too; with
    gdes it reads E_G after G's update (the official order), so its loss differs."""
    joint = stepper_of(rtd_run(embedding_sharing=sharing, rtd_training="joint"), data_env).train_step()
    decoupled = stepper_of(rtd_run(embedding_sharing=sharing), data_env).train_step()
    for key in ("mlm_loss", "mlm_accuracy", "generator_correct", "replaced_rate"):
        assert torch.equal(decoupled[key], joint[key]), key
    same_d_input = torch.allclose(decoupled["rtd_loss"], joint["rtd_loss"], rtol=1e-6, atol=0)
    assert same_d_input == (sharing == "none")
    assert decoupled["loss"] == pytest.approx(float(decoupled["mlm_loss"] + 10 * decoupled["rtd_loss"]), rel=1e-6)
    assert decoupled["discriminator_lr"] == pytest.approx(2e-3) and float(decoupled["discriminator_grad_norm"]) > 0


def test_gdes_e_g_changes_by_the_generator_step_only(process_group, data_env):
    """Within a step, E_G changes in G's phase and not in D's, while E_Δ changes in D's; over steps, G trains the
    same whatever the RTD loss is (rtd_lambda 10 or 0): no RTD gradient reaches E_G or any of G's weights, and
    D's own clipping cannot scale G's update."""
    stepper = stepper_of(rtd_run(discriminator_lr=1e-3), data_env)
    delta = stepper.module.discriminator.deberta.embeddings.word_embeddings.weight
    before, delta_before = g_table(stepper), gathered(delta)
    corrupted = stepper.generator_phase(stepper.train_batches, stepper.accumulation, train=True)
    after_g, delta_after_g = g_table(stepper), gathered(delta)
    stepper.discriminator_phase(corrupted, train=True)
    assert not torch.equal(after_g, before) and torch.equal(delta_after_g, delta_before)
    assert torch.equal(g_table(stepper), after_g) and not torch.equal(gathered(delta), delta_after_g)
    assert stepper.d_engine.get_lr()[0] == pytest.approx(1e-3) and stepper.lr == pytest.approx(2e-3)

    generators = []
    for rtd_lambda in (10.0, 0.0):
        other = stepper_of(rtd_run(rtd_lambda=rtd_lambda), data_env)
        for _ in range(2):
            other.train_step()
        generators.append({n: gathered(p) for n, p in other.module.generator.named_parameters()})
    assert all(torch.equal(generators[0][n], generators[1][n]) for n in generators[0])


def test_a_checkpoint_holds_both_engines_and_repeats_the_next_step_bitwise(process_group, data_env, tmp_path):
    run = rtd_run()
    stepper = stepper_of(run, data_env)
    stepper.train_step()
    meta = {"model_config": run.model_config().to_dict(), "mode": "zero3", "pipeline_stages": 1, "dp_size": 1}
    checkpoint.save(stepper, str(tmp_path), 1, {"data": {"consumed_samples": 8}}, meta, keep_last=2, rank=0)
    second = stepper.train_step()
    tag_dir = tmp_path / "global_step1"
    assert checkpoint.engine_dirs(str(tag_dir)) == ["generator", "discriminator"]
    assert not any(name.endswith("model_states.pt") for name in os.listdir(tag_dir))
    saved = checkpoint.read_meta(str(tag_dir))["files"]
    assert any(f.startswith("generator/") for f in saved) and any(f.startswith("discriminator/") for f in saved)
    state = checkpoint.load(stepper, str(tmp_path), "global_step1", rank=0)
    assert state["step"] == 1 and state["data"]["consumed_samples"] == 8
    stepper.feed(loader(data_env, stepper, consumed=8))
    again = stepper.train_step()
    for key in ("loss", "mlm_loss", "rtd_loss"):
        assert torch.equal(again[key], second[key]), key


def test_a_step_reads_no_tensor_on_the_host(process_group, data_env):
    stepper = stepper_of(rtd_run(), data_env, stage=2)
    reads = HostReads()
    with reads:
        values = stepper.train_step()
    assert reads.reads == []
    assert all(torch.is_tensor(values[k]) and values[k].dim() == 0 for k in ("loss", "mlm_loss", "rtd_loss"))


def test_a_resume_with_new_peak_rates_gives_each_engine_its_own(process_group, data_env, tmp_path):
    """resume.load applies a changed lr / discriminator_lr to both engines' schedules, each its own rate."""
    from pipeline.run.checkpointer import Checkpointer
    from pipeline.train import resume
    run = rtd_run(discriminator_lr=1e-3)
    stepper = stepper_of(run, data_env)
    stepper.train_step()
    checkpointer = Checkpointer(str(tmp_path), 0, meta={"model_config": run.model_config().to_dict(), "mode": "zero3",
                                                        "pipeline_stages": 1, "dp_size": 1})
    checkpointer.save(stepper, 1, {"data": {"consumed_samples": 8}})
    changed = rtd_run(lr=1e-3, discriminator_lr=4e-3)
    again = stepper_of(changed, data_env)
    changes = {"lr": [2e-3, 1e-3], "discriminator_lr": [1e-3, 4e-3]}
    resume.load(checkpointer, again, "global_step1", False, changes)
    factor = stepper.engine.lr_scheduler.lr_lambdas[0](1)  # the schedule's factor after one step
    assert [g["lr"] for g in again.engine.optimizer.param_groups] == pytest.approx([1e-3 * factor] * 2)
    assert [g["lr"] for g in again.d_engine.optimizer.param_groups] == pytest.approx([4e-3 * factor] * 2)
