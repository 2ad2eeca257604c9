"""Reading the fp32 master weights out of training checkpoints, one tensor at a time, under release keys:

  zero3 mode, ZeRO-3     the flat fp32 partitions in `*_optim_states.pt` (one file per data-parallel rank,
                         memory-mapped; Adam's moments are never read), unflattened with the parameter
                         shapes of `*_model_states.pt` (DeepSpeed's zero_to_fp32 functions)
  zero3 mode, ZeRO-1/2   the same from `single_partition_of_fp32_groups`
  pipeline mode          per stage, the fp32 partitions of `*_mp_rank_SS_optim_states.pt` with the shapes of
                         `mp_rank_SS_model_states.pt`; without optimizer files (ZeRO-0), the
                         `layer_XX-model_states.pt` files (`--source layers` forces them)
  universal              `global_stepN_universal/zero/<param>/fp32.pt` (from ds_to_universal)
  two engines            rtd with decoupled training: each engine's files (any of the kinds above but pipeline)
                         in a subdirectory of the tag named after its network (generator/, discriminator/),
                         read as the RTD model's keys `generator.*` and `discriminator.*` (engine_parts)
The model config, mode and tokenizer fingerprint come from the tag's deberta_ds.json.
"""
import contextlib
import glob
import io
import json
import math
import os
import re
import sys

from model import state_dict_adapter as keys
from pipeline.errors import CheckpointError
from pipeline.run import checkpointer as checkpoint


# ---------------------------------------------------------------- finding the checkpoint
def resolve_tag(path, tag=None):
    """(tag directory, meta dict, kind) where kind is 'zero', 'pipeline' or 'universal'."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if not tag and is_tag_dir(path):
        tag_dir = path
    else:
        ckpt_dir = path
        if not checkpoint.tags(ckpt_dir) and os.path.isdir(os.path.join(path, "checkpoints")):
            ckpt_dir = os.path.join(path, "checkpoints")  # a run directory
        if tag:
            tag_dir = os.path.join(ckpt_dir, tag)
            if not os.path.isdir(tag_dir):
                available = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("global_step"))
                raise CheckpointError(f"{tag_dir}: tag {tag!r} does not exist (found: {', '.join(available) or 'none'})")
        else:
            found, _, damaged = checkpoint.newest_complete(ckpt_dir)
            for name, problem in damaged:
                print(f"convert: checkpoint {name} is damaged ({problem})" + (f"; converting {found}" if found else ""),
                      file=sys.stderr)
            if found is None and damaged:
                raise CheckpointError(f"{ckpt_dir}: no complete checkpoint ({damaged[0][0]} is damaged: {damaged[0][1]}); "
                                      "give --tag to convert one regardless")
            if found is None:
                raise CheckpointError(f"{path}: not a training checkpoint directory (no global_stepN/ with "
                                      f"{checkpoint.META}; give --checkpoint RUN/checkpoints or a tag directory)")
            tag_dir = os.path.join(ckpt_dir, found)
    universal = any(os.path.isdir(os.path.join(folder, "zero")) for _, folder in engine_parts(tag_dir))
    meta = read_meta(tag_dir, universal)
    kind = "universal" if universal else ("pipeline" if meta["mode"] == "pipeline" else "zero")
    return tag_dir, meta, kind


def is_tag_dir(path):
    return os.path.exists(os.path.join(path, checkpoint.META)) or bool(engine_parts(path))


def holds_engine(path):
    """Whether a directory holds one DeepSpeed checkpoint: its files, or its universal conversion."""
    return os.path.isdir(os.path.join(path, "zero")) or bool(glob.glob(os.path.join(path, "*model_states.pt")))


def engine_parts(tag_dir):
    """[(key prefix, directory)] of the DeepSpeed checkpoints in a tag: [("", tag_dir)] when its files are at the
    top (one engine), else one per engine subdirectory it holds (checkpoint.ENGINE_DIRS, rtd with decoupled
    training), its name the prefix of its keys in the RTD model ("generator.", "discriminator.")."""
    if holds_engine(tag_dir):
        return [("", tag_dir)]
    return [(name + ".", os.path.join(tag_dir, name)) for name in checkpoint.ENGINE_DIRS
            if holds_engine(os.path.join(tag_dir, name))]


def master_tensors(tag_dir, kind, config, mode, shapes, source="auto"):
    """(key, fp32 tensor) of every engine of the tag (engine_parts), under the model's keys."""
    if kind == "pipeline":
        yield from pipeline_tensors(tag_dir, config, source)
        return
    parts = engine_parts(tag_dir) or [("", tag_dir)]  # none: zero_tensors names what the directory holds
    for prefix, folder in parts:
        if kind == "universal":
            tensors = universal_tensors(folder, config, mode, shapes, prefix)
        else:
            tensors = ((prefix + name, tensor) for name, tensor in zero_tensors(folder))
        yield from tensors


def read_meta(tag_dir, universal):
    """deberta_ds.json of the tag; a universal directory uses its source tag's (global_stepN beside it)."""
    candidates = [os.path.join(tag_dir, checkpoint.META)]
    if universal and tag_dir.rstrip("/").endswith("_universal"):
        candidates.append(os.path.join(tag_dir.rstrip("/")[: -len("_universal")], checkpoint.META))
    for candidate in candidates:
        if os.path.exists(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    meta = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{candidate}: not valid JSON ({e})") from None
            for key in ("model_config", "mode"):
                if key not in meta:
                    raise CheckpointError(f"{candidate}: no {key!r} (not written by deberta-ds pretrain?)")
            return meta
    raise CheckpointError(f"{tag_dir}: no {checkpoint.META} (the run meta: model config, mode, tokenizer) in "
                          f"{' or '.join(candidates)}; the tag is incomplete or not from deberta-ds pretrain")


# ---------------------------------------------------------------- reading weights
def torch_load(file, mmap=True):
    """torch.load that names the file when it is truncated or not a checkpoint."""
    import torch
    try:
        return torch.load(file, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as e:  # zip reader, unpickler and mmap raise many types for damaged files
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {e}); truncated or not a "
                              "DeepSpeed checkpoint file") from None


@contextlib.contextmanager
def quiet():
    """DeepSpeed's zero_to_fp32 helpers print progress to stdout; keep our output to our own lines."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def zero_fp32_state(ds_dir, model_files, optim_files):
    """{param name: tensor or lazy GatheredTensor} of the fp32 master weights of one ZeRO group of files
    (all data-parallel ranks of one model/pipeline rank). The optimizer files are memory-mapped and
    their Adam moments dropped unread, as zero_to_fp32 does; ZeRO-3 parameters stay lazy until
    `.contiguous()` gathers one of them."""
    from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARTITION_COUNT,
                                                SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)
    from deepspeed.utils import zero_to_fp32 as z

    zero_model_states = [parse_model_file(file) for file in model_files]
    states = []
    for file in optim_files:
        state = torch_load(file)
        optimizer = state.get(OPTIMIZER_STATE_DICT) if isinstance(state, dict) else None
        if not isinstance(optimizer, dict) or ZERO_STAGE not in optimizer:
            raise CheckpointError(f"{file}: not a ZeRO optimizer state file")
        # Adam's moments (nested state of ZeRO-3, base_optimizer_state of ZeRO-1/2): mapped, never read
        optimizer.pop(OPTIMIZER_STATE_DICT, None)
        optimizer.pop("base_optimizer_state", None)
        states.append(optimizer)
    stage = states[0][ZERO_STAGE]
    world_size = states[0][PARTITION_COUNT]
    world_size = max(world_size) if isinstance(world_size, list) else world_size
    if world_size != len(optim_files):
        raise CheckpointError(f"{ds_dir}: ZeRO wrote {world_size} optimizer partitions but {len(optim_files)} "
                              f"files are there ({', '.join(os.path.basename(f) for f in optim_files)}): a rank's "
                              "file is missing or left over from another run")
    key = FP32_FLAT_GROUPS if stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS
    flat_groups = [s[key] for s in states]
    with quiet():
        try:
            if stage == 3:
                return z._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, zero_model_states, False)
            return z._get_fp32_state_dict_from_zero2_checkpoint(world_size, flat_groups, zero_model_states, False,
                                                                states[0].get("param_alignment_paddings"))
        except (ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{ds_dir}: the optimizer partitions do not match the parameter shapes "
                                  f"({type(e).__name__}: {e})") from None


def parse_model_file(file):
    """zero_to_fp32's parse_model_states for one file, also for pipeline stages (whose 'module' is None:
    their weights are in the layer files); names the file when it is damaged or not a model-states file."""
    from deepspeed.checkpoint.constants import (BUFFER_NAMES, DS_VERSION, FROZEN_PARAM_FRAGMENTS,
                                                FROZEN_PARAM_SHAPES, PARAM_SHAPES)
    from deepspeed.utils import zero_to_fp32 as z

    state = torch_load(file, mmap=False)
    if not isinstance(state, dict) or BUFFER_NAMES not in state or PARAM_SHAPES not in state:
        raise CheckpointError(f"{file}: not a DeepSpeed model-states file (no {BUFFER_NAMES}/{PARAM_SHAPES})")
    module = state.get("module") or {}
    buffers = {k: v for k, v in module.items() if k in state[BUFFER_NAMES]}
    return z.zero_model_state(buffers=buffers, param_shapes=state[PARAM_SHAPES],
                              shared_params=list(state.get("shared_params", {}).items()),
                              ds_version=state.get(DS_VERSION), frozen_param_shapes=state.get(FROZEN_PARAM_SHAPES),
                              frozen_param_fragments=state.get(FROZEN_PARAM_FRAGMENTS))


def materialise(tensor):
    """A real tensor from a zero_to_fp32 GatheredTensor (which gathers the partitions now) or a tensor."""
    return tensor.contiguous()


def natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def zero_tensors(tag_dir):
    """zero3 mode: (release key, fp32 tensor); parameter names are the model's = release keys."""
    model_files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")), key=natural)
    optim_files = sorted(glob.glob(os.path.join(tag_dir, "*optim_states.pt")), key=natural)
    if not model_files or not optim_files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed ZeRO files (*_model_states.pt and *_optim_states.pt); "
                              "found " + (", ".join(sorted(os.listdir(tag_dir))) or "nothing"))
    state = zero_fp32_state(tag_dir, model_files, optim_files)
    for name in list(state):
        yield name, materialise(state.pop(name))  # pop: a gathered tensor is freed once written


def pipeline_tensors(tag_dir, config, source="auto"):
    """pipeline mode: (release key, tensor) from each stage's fp32 partitions, or from the layer files.
    The tied word embedding is held by the first and the last stage: yielded once, the copy checked."""
    maps = keys.pipeline_layer_keys(config)
    stage_files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")), key=natural)
    optim_any = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    use_optimizer = source == "optimizer" or (source == "auto" and optim_any)
    seen = {}
    if use_optimizer:
        if not stage_files or not optim_any:
            raise CheckpointError(f"{tag_dir}: no mp_rank_SS_model_states.pt / *_optim_states.pt files to read "
                                  "fp32 master weights from (try --source layers)")
        for model_file in stage_files:
            stage = re.search(r"mp_rank_(\d+)_model_states", model_file).group(1)
            optim_files = sorted(glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_*_mp_rank_{stage}_optim_states.pt")),
                                 key=natural)
            if not optim_files:
                raise CheckpointError(f"{tag_dir}: stage {int(stage)} has no *_mp_rank_{stage}_optim_states.pt")
            state = zero_fp32_state(tag_dir, [model_file], optim_files)
            for name in list(state):
                key = keys.from_pipeline(name, maps)
                if key is None:
                    raise CheckpointError(f"{model_file}: parameter {name} has no release key; the checkpoint's "
                                          "layers do not match the model config")
                yield from _once(key, materialise(state.pop(name)), seen, model_file)
        return
    layer_files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")), key=natural)
    if not layer_files:
        raise CheckpointError(f"{tag_dir}: no layer_XX-model_states.pt files (not a pipeline checkpoint)")
    for file in layer_files:
        index = int(re.search(r"layer_(\d+)", os.path.basename(file)).group(1))
        if index not in maps:
            raise CheckpointError(f"{file}: layer {index} does not exist in a model with "
                                  f"{config.num_hidden_layers} encoder layers")
        for inner, tensor in torch_load(file).items():
            key = maps[index].get(inner)
            if key is None:
                raise CheckpointError(f"{file}: key {inner!r} of layer {index} has no release key")
            yield from _once(key, tensor, seen, file)


TIED_KEYS = (keys.WORD_EMBEDDINGS, keys.POSITION_TABLE)


def _once(key, tensor, seen, file):
    """Yield a tensor the first time its release key appears. The word embedding is also on the last stage
    (tied decoder): that copy must be equal. Only these tied tensors are kept for the check, not the model."""
    import torch
    if key in seen:
        first = seen[key]
        if first is None or tuple(first.shape) != tuple(tensor.shape) or not torch.equal(first, tensor):
            raise CheckpointError(f"{file}: {key} differs from its tied copy on another stage")
        return
    seen[key] = tensor if key in TIED_KEYS else None
    yield key, tensor


def universal_tensors(tag_dir, config, mode, shapes, prefix=""):
    """DeepSpeed's universal format: one directory per parameter with fp32.pt (exp_avg*.pt are not read); keys
    `prefix` + the parameter's name."""
    import torch
    maps = keys.pipeline_layer_keys(config) if mode == "pipeline" else None
    root = os.path.join(tag_dir, "zero")
    names = sorted((n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))), key=natural)
    if not names:
        raise CheckpointError(f"{root}: empty (no parameter directories)")
    seen = {}
    for name in names:
        file = os.path.join(root, name, "fp32.pt")
        if not os.path.exists(file):
            raise CheckpointError(f"{os.path.join(root, name)}: no fp32.pt")
        value = torch_load(file)
        tensor = value["param"] if isinstance(value, dict) else value  # older DeepSpeed wrapped it in a dict
        if not torch.is_tensor(tensor):
            raise CheckpointError(f"{file}: holds no tensor")
        key = keys.from_pipeline(name, maps) if maps else prefix + name
        if key is None:
            raise CheckpointError(f"{file}: parameter {name} has no release key")
        # ds_to_universal stores parameters flat; the model's shape comes from the config
        if key in shapes and tensor.dim() == 1 and tensor.numel() == math.prod(shapes[key]):
            tensor = tensor.view(shapes[key])
        yield from _once(key, tensor, seen, file)


