"""The release format: a directory that transformers loads (config.json, model.safetensors or
pytorch_model.bin, sharded with an index file when large, optionally spm.model).

Key layouts accepted on load:
  * `deberta.*` (task models) or bare `embeddings.* / encoder.*` (transformers' DebertaV2Model);
  * the MLM head as `lm_predictions.lm_head.*` (official checkpoints, transformers with legacy=False)
    or `cls.predictions.*` (transformers' legacy head; its decoder is the tied word embedding);
  * `deberta.embeddings.position_embeddings.weight`: kept when present (the Enhanced Mask Decoder
    needs it; transformers ignores it).
Anything missing, unexpected or mis-shaped is an error naming the key (and both shapes): nothing is
silently re-initialised. The one exception is a task head (pooler/classifier) that the release does
not have: it is new by definition when fine-tuning starts from a pretrained release, and we say so.
"""
import contextlib
import json
import os
import shutil
import sys
import tempfile

import torch

from model.config import DebertaConfig
from model.encoder import DebertaModel
from model.heads import DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification

TASKS = ("base", "mlm", "classification", "multiple_choice")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# renames from transformers' legacy MLM head to the official layout we use
LEGACY_HEAD = {
    "cls.predictions.transform.dense.weight": "lm_predictions.lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_predictions.lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_predictions.lm_head.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_predictions.lm_head.LayerNorm.bias",
    "cls.predictions.bias": "lm_predictions.lm_head.bias",
}
TIED_LEGACY = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
IGNORED_PREFIXES = ("mask_predictions.",)  # RTD discriminator heads of v3 releases: not ours to load
POSITION_TABLE = "deberta.embeddings.position_embeddings.weight"
NEW_HEAD_PREFIXES = ("pooler.", "classifier.")


class CheckpointError(ValueError):
    """A release or checkpoint that does not fit the model: names the file and the key."""


# ---------------------------------------------------------------- reading tensors
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
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{full}: not a valid index file ({e})") from None
            return [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
        return [full]
    raise CheckpointError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def iter_tensors(files):
    """Yield (key, tensor) one file at a time, so a sharded release never needs to be in memory twice."""
    for file in files:
        with _reading(file):
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()


@contextlib.contextmanager
def _reading(file):
    """Turn whatever safetensors/torch raise for a missing, truncated or corrupt file into a CheckpointError."""
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # safetensors/torch raise many types for truncated or corrupt files
        raise CheckpointError(f"{file}: cannot read tensors ({type(e).__name__}: {e})") from None


def read_state_dict(path):
    return dict(iter_tensors(weight_files(path)))


class TensorRef:
    """One tensor of a release, not yet read: its file, its key there and its shape (from the header).

    `load()` reads just this tensor: from a safetensors file into memory of its own (`fresh`); from a
    pytorch_model.bin, memory-mapped once (torch.load(mmap=True)) and shared by its refs, a view of the
    mapping (only the pages read are loaded; the caller copies what it keeps)."""

    def __init__(self, file, key, shape, bin_state=None):
        self.file, self.key, self.shape, self._bin_state = file, key, torch.Size(shape), bin_state
        self.fresh = bin_state is None  # load() returns memory of its own (not a view of a mapping)

    def load(self):
        with _reading(self.file):
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
    """{key: TensorRef} of a release directory, reading headers only (no tensor data)."""
    refs = {}
    for file in weight_files(path):
        with _reading(file):
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        refs[key] = TensorRef(file, key, f.get_slice(key).get_shape())
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key, tensor in state.items():
                    refs[key] = TensorRef(file, key, tensor.shape, bin_state=state)
    return refs


def materialise(value):
    """A tensor from a state-dict value: a tensor itself, or a TensorRef read now."""
    return value.load() if isinstance(value, TensorRef) else value


# ---------------------------------------------------------------- key layouts
def normalise_key(key):
    """A release key in our layout, or None for keys we do not load (ignored heads, tied legacy copies)."""
    if key.startswith(IGNORED_PREFIXES) or key.endswith("position_ids"):
        return None
    if key in TIED_LEGACY:
        return None  # checked against the tensors it is tied to (check_legacy_tie)
    key = LEGACY_HEAD.get(key, key)
    if key.startswith(("embeddings.", "encoder.")):
        key = "deberta." + key
    return key


def check_legacy_tie(decoder, word, source):
    """transformers' legacy decoder weight must equal the word embeddings: our model ties them."""
    if decoder is not None and word is not None and not torch.equal(materialise(decoder), materialise(word)):
        raise CheckpointError(f"{source}: cls.predictions.decoder.weight differs from the word embeddings it "
                              "should be tied to; this model ties them")


def normalise_keys(state, source="checkpoint", check_tie=True):
    """Any accepted layout -> ours: `deberta.*` + `lm_predictions.lm_head.*` + task head keys.

    Values may be tensors or TensorRefs (then check_tie=False defers the tie check, which has to read
    two tensors, to the caller: see load_release)."""
    out = {}
    for key, tensor in state.items():
        ours = normalise_key(key)
        if ours is not None:
            out[ours] = tensor
    if check_tie:
        check_legacy_tie(state.get("cls.predictions.decoder.weight"),
                         out.get("deberta.embeddings.word_embeddings.weight"), source)
    return out


def model_keys(model, task):
    """Release keys of a model: ours, with the `deberta.` prefix also for the base model."""
    prefix = "deberta." if task == "base" else ""
    return {prefix + k: v for k, v in model.state_dict().items()}


def check_and_load(model, task, state, source, allow_new_head=False, dtype=None):
    """Check `state` (tensors or TensorRefs) against the model, then load it.

    A model built by `empty_model` (parameters on the meta device) takes the tensors themselves
    (load_state_dict(assign=True)): each is read once, cast to the parameter's dtype (or `dtype`) and
    becomes the parameter, so the weights are in memory once. A real model gets them copied in."""
    expected = model_keys(model, task)
    missing = [k for k in expected if k not in state]
    new_head = [k for k in missing if allow_new_head and k.startswith(NEW_HEAD_PREFIXES)]
    missing = [k for k in missing if k not in new_head]
    unexpected = [k for k in state if k not in expected]
    if task != "mlm":  # an MLM release fine-tuned from: its head is not part of a classifier
        unexpected = [k for k in unexpected if not k.startswith("lm_predictions.")]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)} in the checkpoint but "
                            f"{tuple(tensor.shape)} in the model")
    if problems:
        raise CheckpointError(f"{source}: does not fit the {task} model: " + "; ".join(problems))
    prefix = "deberta." if task == "base" else ""
    on_meta = any(t.is_meta for t in expected.values())
    own = {}
    for key, target in expected.items():
        if key not in state:
            continue
        source = state[key]
        tensor = materialise(source)
        if on_meta:
            # The tensor becomes the parameter: it must be owned, contiguous memory of the model's dtype
            # (a bf16 release still loads as an fp32 model, as copying did). safetensors' get_tensor
            # returns a fresh tensor; a caller's tensor or a view into a mapped .bin file is copied.
            converted = tensor.to(dtype or target.dtype)
            fresh = converted is not tensor or (isinstance(source, TensorRef) and source.fresh)
            tensor = converted.contiguous() if fresh else converted.clone(memory_format=torch.contiguous_format)
        own[key[len(prefix):]] = tensor
        del tensor
    model.load_state_dict(own, strict=not new_head, assign=on_meta)
    del own
    if on_meta:
        materialise_rest(model)
    if new_head:
        print(f"{source}: new task head, initialised randomly: {', '.join(new_head)}", file=sys.stderr)
    return model


def materialise_rest(model):
    """Give every parameter still on the meta device (a new task head) real memory and its initialisation."""
    for name, module in model.named_modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            if not hasattr(module, "reset_parameters"):
                raise CheckpointError(f"{name}: parameters not in the release and no way to initialise them")
            module.reset_parameters()


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation) while
    buffers stay real (they may be computed in a constructor and are not always in a release)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


# ---------------------------------------------------------------- building
def build_model(config, task="base", num_labels=None, position_table=False, emd=True):
    if task == "base":
        return DebertaModel(config, position_table=position_table)
    if task == "mlm":
        return DebertaForMaskedLM(config, emd=emd)
    if task == "classification":
        return DebertaForSequenceClassification(config, num_labels=num_labels or 2)
    if task == "multiple_choice":
        return DebertaForMultipleChoice(config)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def load_release(path, task="base", num_labels=None, emd=True, attention_impl=None, dtype=None):
    """Load a release directory as one of our models (an nn.Module in eval mode).

    task: "base" (.last_hidden_state), "mlm" (.logits), "classification" (.logits [B, num_labels]) or
    "multiple_choice". emd: for "mlm", use the Enhanced Mask Decoder when the release has the
    absolute position table (as the official pretraining did); False gives transformers' MLM head
    on the last layer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    config = DebertaConfig.from_json(os.path.join(path, "config.json"))
    if attention_impl:
        config = config.replace(attention_impl=attention_impl)
    # Headers only: the tensors are read one at a time while loading, each straight into its parameter.
    refs = index_tensors(path)
    state = normalise_keys(refs, source=path, check_tie=False)
    has_table = POSITION_TABLE in state
    if task == "mlm" and emd and not has_table and not config.position_biased_input:
        print(f"{path}: no absolute position table ({POSITION_TABLE}); the MLM head reads the last layer "
              "(no Enhanced Mask Decoder)", file=sys.stderr)
    use_emd = task == "mlm" and emd and has_table
    if has_table and not config.position_biased_input and task != "base" and not use_emd:
        state.pop(POSITION_TABLE)  # only the EMD reads it; the base model keeps it for exact round trips
    # reads the word embeddings twice (a transient copy of one tensor): only for transformers' legacy layout
    check_legacy_tie(refs.get("cls.predictions.decoder.weight"), state.get("deberta.embeddings.word_embeddings.weight"),
                     path)
    with parameters_on_meta():  # no memory and no random initialisation for weights about to be replaced
        model = build_model(config, task, num_labels, position_table=has_table, emd=use_emd)
    check_and_load(model, task, state, source=path, allow_new_head=task in ("classification", "multiple_choice"),
                   dtype=dtype)
    if dtype is not None:
        model = model.to(dtype)  # the new task head and buffers; loaded weights already have it
    return model.eval()


# ---------------------------------------------------------------- writing
def release_state_dict(model, task):
    """Our state dict with release key names (base model keys get the `deberta.` prefix)."""
    return model_keys(model, task)


def task_of(model):
    if isinstance(model, DebertaForMaskedLM):
        return "mlm"
    if isinstance(model, DebertaForSequenceClassification):
        return "classification"
    if isinstance(model, DebertaForMultipleChoice):
        return "multiple_choice"
    return "base"


ARCHITECTURES = {"mlm": "DebertaV2ForMaskedLM", "classification": "DebertaV2ForSequenceClassification",
                 "multiple_choice": "DebertaV2ForMultipleChoice", "base": "DebertaV2Model"}


def parse_size(text):
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(text).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_safetensors(tensors, out_dir, max_shard_bytes):
    """Write (key, tensor) pairs as model.safetensors, or as shards plus an index above max_shard_bytes."""
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_tokenizer_files(out_dir, spm_path):
    shutil.copyfile(spm_path, os.path.join(out_dir, "spm.model"))
    tokenizer_config = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "vocab_type": "spm",
                        "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
                        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
                        "split_by_punct": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


@contextlib.contextmanager
def staged_directory(out_dir):
    """A temporary directory beside out_dir that replaces out_dir when the block succeeds and is removed
    when it fails: a release directory is either complete or absent."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-release-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a release is for others to read
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_release(model, out_dir, spm_path=None, dtype=torch.float32, max_shard_size="5GB", config=None,
                 tensors=None, num_labels=None):
    """Write a release directory under a temporary name, then rename it into place.

    `tensors`: an iterable of (release key, tensor) to stream instead of `model`'s state dict (the
    converter streams them from a training checkpoint); then `config` is required."""
    config = config or model.config
    task = task_of(model) if model is not None else "mlm"
    with staged_directory(out_dir) as tmp:
        values = config.to_dict()
        values["architectures"] = [ARCHITECTURES[task]]
        values["torch_dtype"] = str(dtype).replace("torch.", "")
        if num_labels or getattr(model, "num_labels", None):
            values["num_labels"] = num_labels or model.num_labels
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)
        if tensors is None:
            tensors = release_state_dict(model, task).items()
        cast = ((k, t.detach().to(dtype) if t.is_floating_point() else t.detach()) for k, t in tensors)
        write_safetensors(cast, tmp, parse_size(max_shard_size))
        if spm_path:
            write_tokenizer_files(tmp, spm_path)
    return out_dir
