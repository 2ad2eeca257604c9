"""`deberta-ds convert`: training checkpoints -> release directories (the format transformers loads).

    deberta-ds convert to-release --checkpoint RUN/checkpoints --output DIR [--tag global_stepN]
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB] [--tokenizer spm.model] [--verify]

What it reads (the fp32 master weights wherever DeepSpeed keeps them):
  zero3 mode, ZeRO-3     the flat fp32 partitions in `*_optim_states.pt` (one file per data-parallel rank,
                         memory-mapped; Adam's moments are never read), unflattened with the parameter
                         shapes of `*_model_states.pt` (DeepSpeed's zero_to_fp32 functions)
  zero3 mode, ZeRO-1/2   the same from `single_partition_of_fp32_groups`
  pipeline mode          per stage, the fp32 partitions of `*_mp_rank_SS_optim_states.pt` with the shapes of
                         `mp_rank_SS_model_states.pt`; without optimizer files (ZeRO-0), the
                         `layer_XX-model_states.pt` files (`--source layers` forces them)
  universal              `global_stepN_universal/zero/<param>/fp32.pt` (from ds_to_universal)
The model config, mode and tokenizer fingerprint come from the tag's deberta_ds.json.

The other direction needs no conversion: a release directory (ours, the published
microsoft/deberta-v2-xxlarge layout, or transformers' legacy `cls.predictions.*` layout) starts a run
in either mode with the run-config setting `init_from_release` (`--set init_from_release=DIR`), and
fine-tuning with `deberta-ds finetune --release DIR`. Moving a run between zero3 and pipeline mode is
to-release then init_from_release: the weights move exactly, Adam's moments and the step count restart.

Output is written under a temporary name and renamed at the end: a failure leaves no output directory.
Safetensors files are written tensor by tensor at precomputed offsets, so memory holds one tensor at a
time (plus whatever pages of the memory-mapped source the kernel keeps).
"""
import contextlib
import glob
import io
import json
import os
import re
import resource
import struct
import sys
import time

EXIT_OK, EXIT_BAD_INPUT = 0, 1
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64"}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    rel = sub.add_parser("to-release", help="training checkpoint (zero3, pipeline or universal) -> release directory",
                         description="Write a release directory (config.json, model.safetensors, spm.model, "
                         "tokenizer config) that transformers' AutoModel/AutoModelForMaskedLM/AutoTokenizer load.")
    rel.add_argument("--checkpoint", required=True,
                     help="RUN/checkpoints (a tag is chosen in it), a run directory holding checkpoints/, or one "
                     "tag directory (global_stepN or global_stepN_universal)")
    rel.add_argument("--tag", help="global_stepN, or global_stepN_universal for DeepSpeed's universal format "
                     "(default: the newest finished tag, i.e. one with deberta_ds.json)")
    rel.add_argument("--output", required=True, help="release directory to create (must not exist, or be empty)")
    rel.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                     help="dtype of the released weights (default fp32; cast from the fp32 master weights)")
    rel.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file; above it the weights are sharded with an index (default 5GB)")
    rel.add_argument("--tokenizer", help="spm.model to ship (default: the run's tokenizer, or data_dir/spm.model "
                     "from the run config); its sha256 must match the checkpoint's tokenizer_sha256")
    rel.add_argument("--source", choices=("auto", "optimizer", "layers"), default="auto",
                     help="pipeline checkpoints only: read the fp32 master weights from the optimizer files "
                     "('optimizer') or the module weights from layer_XX-model_states.pt ('layers'); 'auto' "
                     "prefers the optimizer files when present (default)")
    rel.add_argument("--verify", action="store_true",
                     help="load the result in transformers and compare MLM logits with our model on a fixed "
                     "input (prints the max difference; fails above 1e-4)")
    rel.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")


def run(args):
    from model.release import CheckpointError
    try:
        if args.action == "to-release":
            to_release(args)
        return EXIT_OK
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


# ---------------------------------------------------------------- finding the checkpoint
def resolve_tag(path, tag=None):
    """(tag directory, meta dict, kind) where kind is 'zero', 'pipeline' or 'universal'."""
    from model.release import CheckpointError
    from pipeline import checkpoint
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if not tag and is_tag_dir(path):
        tag_dir = path
    else:
        ckpt_dir = path
        if not tag and not checkpoint.tags(ckpt_dir) and os.path.isdir(os.path.join(path, "checkpoints")):
            ckpt_dir = os.path.join(path, "checkpoints")  # a run directory
        if tag:
            tag_dir = os.path.join(ckpt_dir, tag)
            if not os.path.isdir(tag_dir):
                available = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("global_step"))
                raise CheckpointError(f"{tag_dir}: tag {tag!r} does not exist (found: {', '.join(available) or 'none'})")
        else:
            found, _ = checkpoint.latest(ckpt_dir)
            if found is None:
                raise CheckpointError(f"{path}: not a training checkpoint directory (no global_stepN/ with "
                                      f"{checkpoint.META}; give --checkpoint RUN/checkpoints or a tag directory)")
            tag_dir = os.path.join(ckpt_dir, found)
    universal = os.path.isdir(os.path.join(tag_dir, "zero"))
    meta = read_meta(tag_dir, universal)
    kind = "universal" if universal else ("pipeline" if meta["mode"] == "pipeline" else "zero")
    return tag_dir, meta, kind


def is_tag_dir(path):
    from pipeline.checkpoint import META
    return (os.path.exists(os.path.join(path, META)) or os.path.isdir(os.path.join(path, "zero"))
            or bool(glob.glob(os.path.join(path, "*model_states.pt"))))


def read_meta(tag_dir, universal):
    """deberta_ds.json of the tag; a universal directory uses its source tag's (global_stepN beside it)."""
    from model.release import CheckpointError
    from pipeline.checkpoint import META
    candidates = [os.path.join(tag_dir, META)]
    if universal and tag_dir.rstrip("/").endswith("_universal"):
        candidates.append(os.path.join(tag_dir.rstrip("/")[: -len("_universal")], META))
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
    raise CheckpointError(f"{tag_dir}: no {META} (the run meta: model config, mode, tokenizer) in "
                          f"{' or '.join(candidates)}; the tag is incomplete or not from deberta-ds pretrain")


# ---------------------------------------------------------------- reading weights
def torch_load(file, mmap=True):
    """torch.load that names the file when it is truncated or not a checkpoint."""
    import torch
    from model.release import CheckpointError
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

    from model.release import CheckpointError
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

    from model.release import CheckpointError
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
    from model.release import CheckpointError
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
    from model.release import CheckpointError
    from pipeline.pipe import layer_key_map, release_key
    maps = layer_key_map(config)
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
                key = release_key(name, config, maps)
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


TIED_KEYS = ("deberta.embeddings.word_embeddings.weight", "deberta.embeddings.position_embeddings.weight")


def _once(key, tensor, seen, file):
    """Yield a tensor the first time its release key appears. The word embedding is also on the last stage
    (tied decoder): that copy must be equal. Only these tied tensors are kept for the check, not the model."""
    import torch
    from model.release import CheckpointError
    if key in seen:
        first = seen[key]
        if first is None or tuple(first.shape) != tuple(tensor.shape) or not torch.equal(first, tensor):
            raise CheckpointError(f"{file}: {key} differs from its tied copy on another stage")
        return
    seen[key] = tensor if key in TIED_KEYS else None
    yield key, tensor


def universal_tensors(tag_dir, config, mode, shapes):
    """DeepSpeed's universal format: one directory per parameter with fp32.pt (exp_avg*.pt are not read)."""
    import torch
    from model.release import CheckpointError
    from pipeline.pipe import layer_key_map, release_key
    maps = layer_key_map(config) if mode == "pipeline" else None
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
        key = release_key(name, config, maps) if maps else name
        if key is None:
            raise CheckpointError(f"{file}: parameter {name} has no release key")
        # ds_to_universal stores parameters flat; the model's shape comes from the config
        if key in shapes and tensor.dim() == 1 and tensor.numel() == _numel(shapes[key]):
            tensor = tensor.view(shapes[key])
        yield from _once(key, tensor, seen, file)


# ---------------------------------------------------------------- writing safetensors, one tensor at a time
class StreamingSafetensors:
    """Safetensors files laid out in advance from the expected (key, shape), filled as tensors arrive in
    any order: each tensor is written at its offset and dropped. Keys that never arrive are an error."""

    def __init__(self, out_dir, layout, dtype, max_shard_bytes):
        import torch
        self.dtype = dtype
        self.item = torch.empty((), dtype=dtype).element_size()
        shards, current, size = [], [], 0
        for key, shape in layout:
            nbytes = _numel(shape) * self.item
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append((key, shape))
            size += nbytes
        shards.append(current)
        self.where = {}  # key -> (file, absolute offset, nbytes, shape)
        self.files = []
        code = SAFETENSORS_DTYPES[str(dtype).replace("torch.", "")]
        for i, shard in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for key, shape in shard:
                nbytes = _numel(shape) * self.item
                header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            path = os.path.join(out_dir, name)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text)
                f.truncate(8 + len(text) + offset)  # sparse until filled
            start = 8 + len(text)
            for key, shape in shard:
                begin, end = header[key]["data_offsets"]
                self.where[key] = (path, start + begin, end - begin, tuple(shape))
            self.files.append((name, [k for k, _ in shard], offset))
        self.out_dir = out_dir
        self.written, self.bytes = set(), 0
        self.handles = {}

    def write(self, key, tensor):
        import torch
        path, offset, nbytes, _ = self.where[key]
        data = tensor.detach().to(self.dtype).contiguous()
        handle = self.handles.get(path) or self.handles.setdefault(path, open(path, "r+b"))
        handle.seek(offset)
        handle.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
        self.written.add(key)
        self.bytes += nbytes

    def close(self):
        for handle in self.handles.values():
            handle.close()
        self.handles = {}
        if len(self.files) > 1:
            weight_map = {key: name for name, keys, _ in self.files for key in keys}
            total = sum(size for _, _, size in self.files)
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def expected_layout(config, emd):
    """(release key, shape) of the MLM model a checkpoint of this config holds, in release order."""
    import torch
    from model.heads import DebertaForMaskedLM
    from model.release import release_state_dict
    with torch.device("meta"):
        model = DebertaForMaskedLM(config, emd=emd)
    return [(k, tuple(v.shape)) for k, v in release_state_dict(model, "mlm").items()]


def write_release(tensors, config, emd, tmp, dtype, max_shard_bytes, source):
    """Stream (release key, tensor) into safetensors in tmp; every key checked against the config."""
    from model.release import CheckpointError
    layout = expected_layout(config, emd)
    shapes = dict(layout)
    writer = StreamingSafetensors(tmp, layout, dtype, max_shard_bytes)
    count, start = 0, time.time()
    try:
        for key, tensor in tensors:
            if key not in shapes:
                raise CheckpointError(f"{source}: {key} is not a parameter of the model in the checkpoint's config "
                                      "(config and tensors disagree)")
            if tuple(tensor.shape) != shapes[key]:
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                                      f"{shapes[key]} in its config")
            if key in writer.written:
                raise CheckpointError(f"{source}: {key} appears twice")
            writer.write(key, tensor)
            count += 1
            del tensor
    finally:
        writer.close()
    missing = [k for k, _ in layout if k not in writer.written]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks {len(missing)} parameter(s) of its config: "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    return count, writer.bytes, time.time() - start


# ---------------------------------------------------------------- tokenizer
def find_tokenizer(meta, given):
    """The spm.model to ship: --tokenizer, else the run's (tokenizer or data_dir/spm.model); checked against
    the fingerprint the run recorded."""
    from model.release import CheckpointError
    from pipeline.tokenizer import file_sha256
    run = meta.get("run_config") or {}
    candidates = [given] if given else [p for p in (run.get("tokenizer"),
                                                     os.path.join(run.get("data_dir") or "", "spm.model")) if p]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise CheckpointError(f"no tokenizer: {' or '.join(candidates) or 'nothing'} "
                              f"{'does' if given else 'do'} not exist; give --tokenizer spm.model (the shard "
                              "directory's spm.model)")
    want = meta.get("tokenizer_sha256")
    if want and file_sha256(found) != want:
        raise CheckpointError(f"{found}: sha256 {file_sha256(found)[:16]}... is not the tokenizer this run trained with "
                              f"({want[:16]}...); give the run's spm.model with --tokenizer")
    return found


# ---------------------------------------------------------------- verify
def verify(path, emd, atol=1e-4):
    """transformers vs our model on a fixed input, one model in memory at a time. Returns the max |diff|."""
    import torch
    import transformers

    from model.release import CheckpointError, load_release
    transformers.utils.logging.disable_progress_bar()
    config = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, config["vocab_size"] - 1, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    theirs, info = transformers.AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointError(f"{path}: transformers reports missing {info['missing_keys']} / mismatched "
                              f"{info['mismatched_keys']} keys")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, attention_mask=mask).logits
    del theirs
    # our MLM head on the last layer, as transformers computes it (transformers has no EMD)
    ours = load_release(path, task="mlm", emd=False, dtype=torch.float32)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
    del ours
    keep = mask.bool()
    diff = (got[keep] - expected[keep]).abs().max().item()
    print(f"verify: transformers vs deberta-ds MLM logits on a fixed [2, 16] input: max |diff| {diff:.3g}",
          file=sys.stderr)
    if not diff <= atol:
        raise CheckpointError(f"{path}: transformers' logits differ from ours by {diff:.3g} (> {atol})")
    if os.path.exists(os.path.join(path, "spm.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tokenizer("verify the tokenizer loads")
    return diff


# ---------------------------------------------------------------- to-release
def to_release(args):
    import torch

    from model.config import DebertaConfig
    from model.release import CheckpointError, parse_size, staged_directory, write_tokenizer_files
    out = os.path.abspath(args.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise CheckpointError(f"{out}: exists and is not empty (give --overwrite to replace it)")
    tag_dir, meta, kind = resolve_tag(args.checkpoint, args.tag)
    config = DebertaConfig.from_dict(meta["model_config"])
    emd = bool((meta.get("run_config") or {}).get("emd", True))
    spm = find_tokenizer(meta, args.tokenizer)
    dtype = getattr(torch, DTYPES[args.dtype])
    max_shard = parse_size(args.max_shard_size)
    if kind == "universal":
        tensors = universal_tensors(tag_dir, config, meta["mode"], dict(expected_layout(config, emd)))
    elif kind == "pipeline":
        tensors = pipeline_tensors(tag_dir, config, args.source)
    else:
        tensors = zero_tensors(tag_dir)
    print(f"convert: {tag_dir} ({kind}, mode {meta['mode']}, step {meta.get('step')}) -> {out} ({args.dtype})",
          file=sys.stderr)

    with staged_directory(out) as tmp:
        count, nbytes, seconds = write_release(tensors, config, emd, tmp, dtype, max_shard, tag_dir)
        values = config.to_dict()
        values["torch_dtype"] = DTYPES[args.dtype]
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)
        write_tokenizer_files(tmp, spm)
        if args.verify:
            verify(tmp, emd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"convert: wrote {count} tensors, {nbytes / 1e9:.3f} GB in {seconds:.1f} s "
          f"({count / max(seconds, 1e-9):.1f} tensors/s, {nbytes / 1e9 / max(seconds, 1e-9):.3f} GB/s); "
          f"peak RSS {peak:.2f} GiB", file=sys.stderr)
    return out
