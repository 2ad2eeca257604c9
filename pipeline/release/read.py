"""Reading a release directory (transformers' layout: config.json, model.safetensors or pytorch_model.bin,
sharded with an index file when large): the one checked reader behind `load_release`, a zero3 run's start
from a release and each pipeline stage's.

`Release(path)` reads the config and the tensor headers only; tensors are read one at a time when asked
for (`read(key)`), so no caller holds a release as a whole beside its model. Keys are ours
(model/state_dict_adapter.py). Anything missing, unexpected or mis-shaped is a ReleaseError naming the key
(and both shapes): nothing is silently re-initialised. The exceptions are a task head (pooler/classifier)
that the release does not have: it is new by definition when fine-tuning starts from a pretrained release,
and `load_release` says so; and, for a run starting from a release, an absolute position table shorter than the
run's (a 512-position release pretrained further on longer sequences): its rows are copied, the rest keep their
initialisation, and the run says so (`grows`, `copy_weight`, `check_grown`).
"""
import contextlib
import json
import os
import sys

import torch

from model import DebertaConfig, DebertaForEntityScoring, DebertaForMaskedLM, DebertaForMultipleChoice, \
    DebertaForSequenceClassification, DebertaModel
from model import state_dict_adapter as keys
from model.fast import convert
from pipeline.errors import ReleaseError

TASKS = ("base", "mlm", "classification", "multiple_choice", "entity_scoring")
HEAD_TASKS = ("classification", "multiple_choice", "entity_scoring")  # a new head is allowed
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- files and tensors
def weight_files(path):
    """The tensor files of a release directory, in order; an index file lists the shards."""
    for name in WEIGHT_FILES:
        full = os.path.join(path, name)
        if not os.path.exists(full):
            continue
        if name.endswith(".index.json"):
            try:
                with open(full, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ReleaseError(f"{full}: not a valid index file ({e})") from None
            return [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
        return [full]
    raise ReleaseError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


@contextlib.contextmanager
def reading(file):
    """Turn whatever safetensors/torch raise for a missing, truncated or corrupt file into a ReleaseError."""
    if not os.path.exists(file):
        raise ReleaseError(f"{file}: shard listed in the index is missing")
    try:
        yield
    except ReleaseError:
        raise
    except Exception as e:  # safetensors/torch raise many types for truncated or corrupt files
        raise ReleaseError(f"{file}: cannot read tensors ({type(e).__name__}: {e})") from None


class TensorRef:
    """One tensor of a release, not yet read: its file, its key there and its shape (from the header).

    `load()` reads just this tensor: from a safetensors file into memory of its own (`fresh`); from a
    pytorch_model.bin, memory-mapped once (torch.load(mmap=True)) and shared by its refs, a view of the
    mapping (only the pages read are loaded; the caller copies what it keeps)."""

    def __init__(self, file, key, shape, dtype, bin_state=None):
        self.file, self.key, self.shape, self._bin_state = file, key, torch.Size(shape), bin_state
        self.dtype = dtype  # as the file names it: safetensors' "F32", "I32", ... or torch's "torch.float32"
        self.fresh = bin_state is None  # load() returns memory of its own (not a view of a mapping)

    def load(self):
        with reading(self.file):
            if self._bin_state is not None:
                return self._bin_state[self.key]
            from safetensors import safe_open
            try:
                # pread: the tensor gets memory of its own. safetensors' default (mmap) returns a view
                # of a file mapping, which must not become a trainable parameter.
                handle = safe_open(self.file, framework="pt", backend="pread")
            except TypeError:  # safetensors before 0.8 has only the mapping: copy out of it
                with safe_open(self.file, framework="pt") as f:
                    return f.get_tensor(self.key).clone()
            with handle as f:
                return f.get_tensor(self.key)


def index_tensors(path):
    """{release key: TensorRef} of a release directory, reading headers only (no tensor data)."""
    refs = {}
    for file in weight_files(path):
        with reading(file):
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        tensor = f.get_slice(key)
                        refs[key] = TensorRef(file, key, tensor.get_shape(), tensor.get_dtype())
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key, tensor in state.items():
                    refs[key] = TensorRef(file, key, tensor.shape, str(tensor.dtype), bin_state=state)
    return refs


def read_state_dict(path):
    """Every tensor of a release under its own keys (tests and small releases: holds them all)."""
    return {key: ref.load() for key, ref in index_tensors(path).items()}


def read_config(path):
    """The DebertaConfig of a release directory (config.json), a ReleaseError naming the file otherwise."""
    try:
        return DebertaConfig.from_json(os.path.join(path, "config.json"))
    except (FileNotFoundError, ValueError) as e:
        raise ReleaseError(str(e)) from None


# ---------------------------------------------------------------- a longer position table
def grows(key, have, want):
    """True where the release's absolute position table (`have` rows) is shorter than the model's (`want`), same
    width: the run trains on longer sequences than the release was pretrained on."""
    return (key.endswith("position_embeddings.weight") and len(have) == len(want) == 2 and have[1] == want[1]
            and have[0] < want[0])


def grown_tables(have, want):
    """{key: (release rows, model rows)} of the position tables that are shorter in the release (grows); `have`
    and `want`: {key: shape} of the release and of the model."""
    return {k: (have[k][0], s[0]) for k, s in want.items() if k in have and grows(k, tuple(have[k]), tuple(s))}


def copy_weight(param, source):
    """param <- source; a shorter position table (grows) fills the first rows, the others keep their values."""
    param[: source.shape[0]].copy_(source.to(param.dtype))


def check_grown(path, release_config, config, grown):
    """The notice for the tables that grow ({key: (release rows, model rows)}), or a ReleaseError when the run's
    relative attention differs from the release's: the table grows, the log buckets must not move (with
    max_relative_positions -1 they follow max_position_embeddings)."""
    if not grown:
        return None
    if (release_config.max_relative, release_config.position_buckets) != (config.max_relative, config.position_buckets):
        raise ReleaseError(f"{path}: its relative positions span {release_config.max_relative} in "
                           f"{release_config.position_buckets} buckets, the run's {config.max_relative} in "
                           f"{config.position_buckets}: set model_overrides.max_relative_positions="
                           f"{release_config.max_relative} (and position_buckets) to keep what it learned")
    have, want = next(iter(grown.values()))
    return (f"init_from_release: {path} has {have} absolute positions, the run {want}: rows 0-{have - 1} of "
            f"{', '.join(sorted(grown))} are the release's, rows {have}-{want - 1} start from random initialisation")


# ---------------------------------------------------------------- the release
class Release:
    """A release directory opened for reading: its config.json (`values`, `config`) and its tensors under our
    keys (`refs`: TensorRefs, nothing read yet)."""

    def __init__(self, path):
        self.path = path
        if not os.path.isdir(path):
            raise ReleaseError(f"{path}: no such release directory")
        self.config = read_config(path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            self.values = json.load(f)
        self._release_refs = index_tensors(path)
        self.refs = keys.from_release_state(self._release_refs)

    def __contains__(self, key):
        return key in self.refs

    def read(self, key):
        return self.refs[key].load()

    def check_tie(self):
        """transformers' legacy decoder copy must equal the word embeddings: our models tie them (reads two
        tensors; only for the legacy layout)."""
        decoder = self._release_refs.get(keys.LEGACY_DECODER)
        word = self.refs.get(keys.WORD_EMBEDDINGS)
        if decoder is not None and word is not None and not torch.equal(decoder.load(), word.load()):
            raise ReleaseError(f"{self.path}: {keys.LEGACY_DECODER} differs from the word embeddings it should be "
                               "tied to; this model ties them")

    def grown(self, shapes):
        """{key: (release rows, model rows)} of the position tables that are shorter in the release (grows)."""
        return grown_tables({k: ref.shape for k, ref in self.refs.items()}, shapes)

    def check_fits(self, shapes, what, new_ok=(), unexpected_ok=None, grown_ok=()):
        """Every key of `shapes` ({our key: shape}) present with that shape, else a ReleaseError naming keys and
        shapes. Keys starting with a prefix of `new_ok` may be missing (returned: a new task head); keys of the
        release that `shapes` lacks are an error unless unexpected_ok(key) allows them; keys in `grown_ok` (a
        position table that grows) may be shorter. Every weight read must be floating point (check_float)."""
        self.check_float(k for k in shapes if k in self.refs)
        missing = [k for k in shapes if k not in self.refs]
        new = [k for k in missing if k.startswith(tuple(new_ok))]
        missing = [k for k in missing if k not in new]
        unexpected = [k for k in self.refs if k not in shapes and not (unexpected_ok and unexpected_ok(k))]
        problems = []
        if missing:
            problems.append("missing keys: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
        for key, shape in shapes.items():
            if key in self.refs and tuple(self.refs[key].shape) != tuple(shape) and key not in grown_ok:
                problems.append(f"{key} has shape {tuple(self.refs[key].shape)} in the release but "
                                f"{tuple(shape)} in the model")
        if problems:
            raise ReleaseError(f"{self.path}: does not fit the {what}: " + "; ".join(problems))
        return new

    def check_float(self, keys_read):
        """A weight stored as integers (or bool) is not a weight: casting int32 to float would load it silently
        as whole numbers. Refuse the first, naming its file, key and dtype."""
        for key in keys_read:
            ref = self.refs[key]
            check_float_weight(ref.file, ref.key, ref.dtype)


def check_float_weight(file, key, dtype):
    """A ReleaseError naming the file, key and dtype unless `dtype` (a name) is a floating-point one."""
    if not is_float_dtype(str(dtype)):
        raise ReleaseError(f"{file}: {key} is {dtype}, not a floating-point weight (a release holds float32, "
                           "bfloat16 or float16 weights)")


def is_float_dtype(name):
    """True for safetensors' float dtypes (F64, F32, F16, BF16, F8_*) and torch's (torch.float32, ...)."""
    name = name.replace("torch.", "")
    return name.upper().startswith(("F", "BF")) or name.startswith(("float", "bfloat", "half", "double"))

# ---------------------------------------------------------------- load_release
def build_model(config, task="base", num_labels=None, position_table=False, emd=True):
    if task == "base":
        return DebertaModel(config, position_table=position_table)
    if task == "mlm":
        return DebertaForMaskedLM(config, emd=emd)
    if task == "classification":
        return DebertaForSequenceClassification(config, num_labels=num_labels or 2)
    if task == "multiple_choice":
        return DebertaForMultipleChoice(config)
    if task == "entity_scoring":
        return DebertaForEntityScoring(config)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation) while
    buffers stay real (they may be computed in a constructor and are not always in a release)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialise_rest(model):
    """Give every parameter still on the meta device (a new task head) real memory and its initialisation."""
    for name, module in model.named_modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            if not hasattr(module, "reset_parameters"):
                raise ReleaseError(f"{name}: parameters not in the release and no way to initialise them")
            module.reset_parameters()


def load_into_meta_model(model, task, release, dtype=None, allow_new_head=False):
    """Check the release against a model built by parameters_on_meta, then give it the release's tensors:
    each is read once, cast to the parameter's dtype (or `dtype`) and becomes the parameter
    (load_state_dict(assign=True)), so the weights are in memory once. Returns the new head's keys."""
    expected = {keys.to_release(k, task): v for k, v in model.state_dict().items()}
    unexpected_ok = (lambda key: key.startswith(keys.MLM_HEAD_PREFIX)) if task != "mlm" else None
    new = release.check_fits({k: v.shape for k, v in expected.items()}, f"{task} model",
                             new_ok=keys.TASK_HEAD_PREFIXES if allow_new_head else (), unexpected_ok=unexpected_ok)
    own = {}
    for key, target in expected.items():
        if key in new:
            continue
        ref = release.refs[key]
        tensor = ref.load()
        # The tensor becomes the parameter: it must be owned, contiguous memory of the model's dtype (a bf16
        # release still loads as an fp32 model). safetensors' get_tensor returns a fresh tensor; a view into a
        # mapped .bin file is copied.
        converted = tensor.to(dtype or target.dtype)
        fresh = converted is not tensor or ref.fresh
        own[keys.to_model(key, task)] = converted.contiguous() if fresh else converted.clone(memory_format=torch.contiguous_format)
        del tensor, converted
    model.load_state_dict(own, strict=not new, assign=True)
    del own
    materialise_rest(model)
    return new


def load_release(path, task="base", num_labels=None, emd=True, attention_impl=None, dtype=None, partitioned=False):
    """Load a release directory as one of our models (an nn.Module in eval mode).

    task: "base" (.last_hidden_state), "mlm" (.logits), "classification" (.logits [B, num_labels]) or
    "multiple_choice" or "entity_scoring" (ReCoRD: .logits [B, E]). emd: for "mlm", use the Enhanced Mask Decoder when the release has the absolute position
    table (as the official pretraining did); False gives transformers' MLM head on the last layer.
    The fast pieces are applied (model/fast/convert.py) with `attention_impl`, or the release's; partitioned:
    a runtime will gather each weight only around its own module's forward (ZeRO-3), which the fused QKV
    projection and the autocast linear cannot run under."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    release = Release(path)
    config = release.config
    if attention_impl:
        config = config.replace(attention_impl=attention_impl)
    has_table = keys.POSITION_TABLE in release
    if task == "mlm" and emd and not has_table and not config.position_biased_input:
        print(f"{path}: no absolute position table ({keys.POSITION_TABLE}); the MLM head reads the last layer "
              "(no Enhanced Mask Decoder)", file=sys.stderr)
    use_emd = task == "mlm" and emd and has_table
    if has_table and not config.position_biased_input and task != "base" and not use_emd:
        release.refs.pop(keys.POSITION_TABLE)  # only the EMD reads it; the base model keeps it for exact round trips
    release.check_tie()
    with parameters_on_meta():  # no memory and no random initialisation for weights about to be replaced
        model = build_model(config, task, num_labels, position_table=has_table, emd=use_emd)
    new = load_into_meta_model(model, task, release, dtype, allow_new_head=task in HEAD_TASKS)
    if new:
        print(f"{path}: new task head, initialised randomly: {', '.join(new)}", file=sys.stderr)
    if dtype is not None:
        model = model.to(dtype)  # the new task head and buffers; loaded weights already have it
    convert.apply(model, config.attention_impl, fuse_qkv=not partitioned, autocast_linear=not partitioned)
    return model.eval()
