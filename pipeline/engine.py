"""Build the DeepSpeed engine of a pretraining run, in one of two modes over one model definition:

  zero3     the plain `DebertaForMaskedLM` under a DeepSpeedEngine; ZeRO stage from the DeepSpeed config
            (3 for the 1.5B preset: built under `deepspeed.zero.Init`, so no rank ever holds the full model)
  pipeline  the same blocks as a PipelineModule (pipeline/pipe.py) with ZeRO-0/1

The optimizer is the paper's: AdamW (β 0.9/0.999, ε 1e-6), weight decay 0.01 except on biases and
LayerNorm weights, linear warmup then linear decay to zero at max_steps.
"""
import sys

import deepspeed
import torch

from model.heads import DebertaForMaskedLM
from model.release import CheckpointError, check_legacy_tie, index_tensors, materialise, normalise_keys
from pipeline.run_config import precision, zero_stage


def no_decay(name):
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name.lower()


def param_groups(module, weight_decay):
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(run, module):
    groups = param_groups(module, run.weight_decay)
    if run.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=run.lr, betas=run.adam_betas, eps=run.adam_eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=run.lr, betas=run.adam_betas, eps=run.adam_eps, fused=fused or None)


def warmup_linear_decay(run):
    warmup, total = max(run.warmup_steps, 0), run.max_steps

    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def torch_checkpoint(function, *args):
    # non-reentrant: works with integer inputs and with ZeRO-3's parameter hooks
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def build_zero3_model(run, ds, model_config, rank):
    stage = zero_stage(ds)
    # transformers/dynamo must be imported before zero.Init patches module construction
    import torch._dynamo  # noqa: F401
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = DebertaForMaskedLM(model_config, emd=run.emd)
    if stage == 3:
        # the MLM decoder reads the word embedding outside the embedding's forward: let ZeRO-3 gather it
        # for the head's forward. The shared relative table is read through its own forward (encoder.py).
        deepspeed.zero.register_external_parameter(model.lm_predictions.lm_head,
                                                   model.deberta.embeddings.word_embeddings.weight)
        if run.zero3_leaf_layers:
            for layer in leaf_layers(model):
                deepspeed.utils.set_z3_leaf_module(layer, True)
    if run.activation_checkpointing:
        model.deberta.encoder.checkpoint_fn = torch_checkpoint
    if run.init_from_release:
        load_release_into(model, run.init_from_release, stage, rank)
    return model


def leaf_layers(model):
    """The encoder layers ZeRO-3 may treat as leaf modules: those a forward runs exactly once.

    A leaf's parameters are gathered when it starts and released when it ends, as one group, and no hooks
    are installed inside its 17 modules: in bench/zero_overhead.py's 48-layer model ZeRO-3's parameter
    fetches per step fall from 2,825 to 287. A layer run twice in one forward cannot be a leaf: DeepSpeed
    reduces a leaf's gradients at each of its backward calls (stage3.py, reduce_leaf_module_grads) and
    asserts on the second. With the EMD the encoder runs all layers but the last once, and the EMD runs
    the last one emd_steps times."""
    layers = list(model.deberta.encoder.layer)
    return layers[:-1] if model.emd_steps > 1 else layers


def load_release_into(model, path, stage, rank):
    """Copy a release's weights into a (possibly ZeRO-3 partitioned) model, one tensor at a time.

    The release's headers give every rank the keys and shapes to check; the tensors themselves are read
    one by one, right before their copy, so no rank holds the release as a whole. Under ZeRO-3 only rank 0
    reads them: GatheredParameters(modifier_rank=0) broadcasts rank 0's values to all ranks when the block
    exits and then re-partitions (deepspeed/runtime/zero/partition_parameters.py, GatheredParameters._exit).
    """
    refs = index_tensors(path)
    state = normalise_keys(refs, source=path, check_tie=False)
    reads_tensors = stage != 3 or rank == 0
    tie_error = None
    if reads_tensors:
        try:
            check_legacy_tie(refs.get("cls.predictions.decoder.weight"),
                             state.get("deberta.embeddings.word_embeddings.weight"), path)
        except CheckpointError as error:
            tie_error = str(error)
    if stage == 3 and torch.distributed.is_initialized():
        # every rank must stop on a bad release, not only the one that read it (the others would wait
        # in the first collective)
        shared = [tie_error]
        torch.distributed.broadcast_object_list(shared, src=0)
        tie_error = shared[0]
    if tie_error:
        raise CheckpointError(tie_error)
    own = dict(model.named_parameters())
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path}: release lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, param in own.items():
        shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)} in the release but {shape} in the model")
    for name, param in own.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=stage == 3):
            if reads_tensors:
                source = materialise(state[name])
                param.data.copy_(source.to(param.dtype))
                del source  # one release tensor in memory at a time


def build_engine(run, ds, model_config, rank):
    """(engine, module) for the run's mode."""
    if run.mode == "pipeline":
        from pipeline.pipe import build_pipeline_module
        module = build_pipeline_module(model_config, run.pipeline_stages, emd=run.emd,
                                       activation_checkpointing=run.activation_checkpointing, seed=run.seed)
        if run.init_from_release:
            from pipeline.pipe import load_release_into_pipe
            load_release_into_pipe(module, run.init_from_release, model_config)
    else:
        module = build_zero3_model(run, ds, model_config, rank)
    optimizer = build_optimizer(run, module)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(run))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if precision(ds) != "fp32" and rank == 0:
        print(f"precision {precision(ds)}", file=sys.stderr)
    return engine, module
