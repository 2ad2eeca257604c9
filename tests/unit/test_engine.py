"""The engine interface in process (one rank, gloo): both modes' steppers give the same methods, the same first
loss from the same release, a checkpoint round trip that repeats a step bitwise, and pipeline mode's layer files
map onto the release layout."""
import os

import pytest
import torch

from model import DebertaForMaskedLM, preset
from model import state_dict_adapter as keys
from pipeline.data.mlm_loader import build_pretrain_loader
from pipeline.run.ds_config import load_ds_config
from pipeline.release import save_release
from pipeline.release.write import mlm_layout
from pipeline.run import checkpointer as checkpoint
from pipeline.train.config import RunConfig
from pipeline.train.modes import build_stepper
from pipeline.run.stepper import Stepper
from pipeline.train.preflight import complete_for_run

OVERRIDES = {"vocab_size": 700, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def release(tmp_path_factory, data_env):
    torch.manual_seed(3)
    path = str(tmp_path_factory.mktemp("engine") / "release")
    save_release(DebertaForMaskedLM(preset("tiny", **OVERRIDES)), path, spm_path=data_env["spm"])
    return path


def stepper_for(mode, release, ds_name):
    run = RunConfig(model="tiny", model_overrides=OVERRIDES, mode=mode, global_batch_size=8, micro_batch_size=4,
                    warmup_steps=1, max_steps=10, lr=1e-3, init_from_release=release)
    ds = complete_for_run(run, load_ds_config(ds_name)[0], 1, ds_name)
    return run, build_stepper(run, ds, run.model_config(), rank=0)


def loader(data_env, stepper, consumed=0):
    return build_pretrain_loader(data_env["shards"], data_env["spm"], 4, stepper.dp_rank, stepper.dp_size, 1234,
                                 consumed_samples=consumed)


def test_both_modes_give_the_interface_and_the_same_first_loss(process_group, release, data_env):
    results = {}
    for mode, ds_name in (("zero3", "cpu_zero3_fp32"), ("pipeline", "cpu_pipeline_fp32")):
        _, stepper = stepper_for(mode, release, ds_name)
        assert isinstance(stepper, Stepper) and stepper.mode == mode
        assert (stepper.dp_rank, stepper.dp_size) == (0, 1)
        evaluation = stepper.eval_loss(stepper.batches(loader(data_env, stepper)), 1)
        stepper.feed(loader(data_env, stepper))
        step = stepper.train_step()
        assert set(step) == {"loss", "mlm_accuracy"} and set(evaluation) == {"val_loss", "val_mlm_accuracy"}
        assert stepper.lr > 0 and stepper.skipped_steps == 0 and stepper.grad_norm > 0
        assert_converted(stepper.module, whole_weights=mode == "pipeline")
        results[mode] = (evaluation["val_loss"], float(step["loss"]))
    # the same weights, batches and loss in both modes: zero3 runs the model, pipeline mode its blocks
    assert results["zero3"][0] == pytest.approx(results["pipeline"][0], abs=1e-6)
    assert results["zero3"][1] == pytest.approx(results["pipeline"][1], abs=1e-6)


def assert_converted(module, whole_weights):
    """The trainer applied model/fast/convert.py once: the attention path and the other fast pieces everywhere;
    fused QKV and the autocast linear only where every rank holds every weight whole (not under ZeRO-3, where
    the parameters are partitioned and gathered per module)."""
    from model.fast import modules as fast
    from model.layers import Linear
    kinds = {type(m) for m in module.modules()}
    assert {fast.FastAttention, fast.CheapDropout, fast.ActivatedLinear, fast.PreActivationIntermediate} <= kinds
    attentions = [m for m in module.modules() if isinstance(m, fast.FastAttention)]
    assert all(m.fuse_qkv == whole_weights for m in attentions)
    assert (fast.AutocastKeepLinear in kinds) == whole_weights and (Linear in kinds) != whole_weights
    if not whole_weights:
        assert all(hasattr(p, "ds_id") for p in module.parameters())  # partitioned when built, then converted


def test_a_checkpoint_round_trip_repeats_the_next_step_bitwise(process_group, release, data_env, tmp_path):
    run, stepper = stepper_for("zero3", release, "cpu_zero3_fp32")
    stepper.feed(loader(data_env, stepper))
    stepper.train_step()
    meta = {"model_config": run.model_config().to_dict(), "mode": "zero3", "pipeline_stages": 1, "dp_size": 1}
    checkpoint.save(stepper, str(tmp_path), 1, {"data": {"consumed_samples": 8}}, meta, keep_last=2, rank=0)
    second = float(stepper.train_step()["loss"])
    tag, saved, _ = checkpoint.newest_complete(str(tmp_path))
    assert tag == "global_step1" and saved["step"] == 1
    state = checkpoint.load(stepper, str(tmp_path), tag, rank=0)
    assert state["step"] == 1 and state["data"]["consumed_samples"] == 8
    stepper.feed(loader(data_env, stepper, consumed=8))
    again = float(stepper.train_step()["loss"])
    assert again == second


def test_pipeline_layer_files_are_the_release_layout(process_group):
    from pipeline.train.pipe import build_pipeline_module
    config = preset("tiny", **OVERRIDES)
    module = build_pipeline_module(config, 1)
    maps = keys.pipeline_layer_keys(config)
    mapped = {name: keys.from_pipeline(name, maps) for name in module.state_dict()}
    assert None not in mapped.values()
    assert set(mapped.values()) == {k for k, _ in mlm_layout(config, emd=True)}


def test_a_save_that_cannot_write_names_the_file_keeps_the_previous_checkpoint_and_leaves_no_partial_tag(
        process_group, release, data_env, tmp_path):
    """The files of this run are larger than the file-size limit set here (RLIMIT_FSIZE, with SIGXFSZ ignored, a
    real OS error from a real write: EFBIG, as a full disk gives ENOSPC)."""
    import resource
    import signal
    from pipeline.errors import OutputError
    run, stepper = stepper_for("zero3", release, "cpu_zero3_fp32")
    stepper.feed(loader(data_env, stepper))
    meta = {"model_config": run.model_config().to_dict(), "mode": "zero3", "pipeline_stages": 1, "dp_size": 1}
    stepper.train_step()
    checkpoint.save(stepper, str(tmp_path), 1, {}, meta, keep_last=3, rank=0)
    stepper.train_step()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(OutputError) as error:
            checkpoint.save(stepper, str(tmp_path), 2, {}, meta, keep_last=3, rank=0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(error.value)
    assert message.startswith(f"saving checkpoint {tmp_path / 'global_step2'} failed: {tmp_path / 'global_step2'}/")
    assert "File too large; the previous checkpoint global_step1 is kept" in message
    assert not (tmp_path / "global_step2").exists() and checkpoint.newest_complete(str(tmp_path))[0] == "global_step1"


class HostReads(torch.overrides.TorchFunctionMode):
    """Every read of a tensor's value on the host (item, bool, float, int, tolist) made by code under pipeline/,
    with the function that made it, the tensor's device and the loop's step at the time. On a GPU each such read
    of a device tensor waits until the accelerator has run everything queued before it."""
    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.tolist, torch.Tensor.__index__}
    OURS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pipeline")

    def __init__(self):
        super().__init__()
        self.reads, self.step, self.in_step = [], 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            import sys
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.OURS):
                self.reads.append((frame.f_code.co_name, args[0].device.type, self.step, self.in_step))
        return func(*args, **(kwargs or {}))


def test_the_loop_reads_no_tensor_on_the_host_between_log_lines(process_group, release, data_env, tmp_path):
    """issue 26: a step leaves its values on the device; the loop reads them once per log interval. The one
    other read is the stop-signal agreement, a CPU tensor over gloo, never the accelerator's."""
    from pipeline.run import loop
    from pipeline.run.checkpointer import Checkpointer
    from pipeline.run.monitor import Monitor
    _, stepper = stepper_for("zero3", release, "cpu_zero3_fp32")
    stepper.feed(loader(data_env, stepper))
    reads = HostReads()
    step_of = stepper.train_step

    def counted_step():
        reads.step, reads.in_step = reads.step + 1, True
        try:
            return step_of()
        finally:
            reads.in_step = False
    stepper.train_step = counted_step
    monitor = Monitor(str(tmp_path), 0, 0, 8)
    with reads:
        code = loop.train(stepper, Checkpointer(str(tmp_path / "checkpoints"), 0), monitor, 0,
                          loop.LoopSettings(total_steps=8, log_interval=4))
    monitor.close()
    assert code == 0
    assert [r for r in reads.reads if r[3]] == []                                  # none inside a step
    agreements = [r for r in reads.reads if r[0] == "any_rank"]
    assert len(agreements) == 8 and {device for _, device, _, _ in agreements} == {"cpu"}
    others = [r for r in reads.reads if r[0] != "any_rank"]
    assert {step for _, _, step, _ in others} == {4, 8}, others                  # the two log lines only
    assert len([r for r in others if r[0] == "_to_host"]) == 2                    # one transfer per log line
