"""Writing a release directory: one streaming safetensors writer and one config writer, used by
`save_release` (a model in memory, e.g. fine-tuning's best epoch) and by the converter (tensors streamed
from a training checkpoint).

The safetensors files are laid out in advance from the expected (key, shape) and filled as tensors arrive,
each written at its offset and dropped, so memory holds one tensor at a time. A release directory is
written under a temporary name and renamed into place when complete (pipeline/io.py). An existing directory
is replaced only when it is itself a release (only release files in it) and replacing was asked for;
anything else is refused, naming what is there.
"""
import fnmatch
import json
import os
import struct
import time

import torch

from model import DebertaForEntityScoring, DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification
from model import state_dict_adapter as keys
from pipeline.errors import ConfigError, ReleaseError
from pipeline.io import atomic_copy, atomic_json, staged_directory

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64"}
ARCHITECTURES = {"mlm": "DebertaV2ForMaskedLM", "classification": "DebertaV2ForSequenceClassification",
                 "multiple_choice": "DebertaV2ForMultipleChoice", "base": "DebertaV2Model",
                 # transformers has no ReCoRD head: its DebertaV2Model loads the encoder (proj/classifier ignored)
                 "entity_scoring": "DebertaV2Model"}
# what a release directory may hold (ours, transformers' save_pretrained, the published checkpoints)
RELEASE_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
                 "pytorch_model.generator.bin", "generator_config.json", "spm.model", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.json", "added_tokens.json", "README.md", ".gitattributes")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text, option="--max-shard-size"):
    """Bytes of a size such as 5GB, 500MB, 2GiB or 1000000; a ConfigError naming the option otherwise."""
    value = str(text).strip().upper()
    factor = 1
    for unit, unit_factor in SIZE_UNITS.items():
        if value.endswith(unit):
            value, factor = value[: -len(unit)], unit_factor
            break
    try:
        size = int(float(value) * factor)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not a size (e.g. 5GB, 500MB, 2GiB or a number of bytes)") from None
    if size < 1:
        raise ConfigError(f"{option} {text!r}: must be positive")
    return size


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------- the replace policy
def is_release_file(name):
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RELEASE_FILES)


def check_output(out_dir, overwrite):
    """May a release be written to out_dir? Yes when it does not exist or is empty; when it is a release
    directory (config.json and only release files) only with overwrite; never over anything else."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ReleaseError(f"{out_dir}: exists and is not a directory; choose another output")
    names = sorted(os.listdir(out_dir))
    if not names:
        return
    others = [n + ("/" if os.path.isdir(os.path.join(out_dir, n)) else "") for n in names if not is_release_file(n)]
    if others or "config.json" not in names:
        found = ", ".join(others[:6]) + (" ..." if len(others) > 6 else "") if others else "no config.json"
        raise ReleaseError(f"{out_dir}: exists and is not a release directory ({found}); a release is written "
                           "only to a new or empty directory, or over a previous release with --overwrite")
    if not overwrite:
        raise ReleaseError(f"{out_dir}: a release is already there; give --overwrite to replace it (the new one "
                           "is complete before the old one goes)")


# ---------------------------------------------------------------- writers
class StreamingSafetensors:
    """Safetensors files laid out in advance from the expected (key, shape), filled as tensors arrive in any
    order: each tensor is written at its offset and dropped. `finish()` names the keys that never arrived."""

    def __init__(self, out_dir, layout, dtype, max_shard_bytes):
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
            weight_map = {key: name for name, names, _ in self.files for key in names}
            total = sum(size for _, _, size in self.files)
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_tensors(out_dir, layout, tensors, dtype, max_shard_bytes, source):
    """Stream (release key, tensor) into safetensors files in out_dir, every key and shape checked against
    `layout` [(key, shape)]. Returns (tensors written, bytes, seconds)."""
    shapes = dict(layout)
    writer = StreamingSafetensors(out_dir, layout, dtype, max_shard_bytes)
    count, start = 0, time.time()
    try:
        for key, tensor in tensors:
            if key not in shapes:
                raise ReleaseError(f"{source}: {key} is not a parameter of the model in the checkpoint's config "
                                   "(config and tensors disagree)")
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise ReleaseError(f"{source}: {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                                   f"{tuple(shapes[key])} in its config")
            if key in writer.written:
                raise ReleaseError(f"{source}: {key} appears twice")
            writer.write(key, tensor)
            count += 1
            del tensor
    finally:
        writer.close()
    missing = [k for k, _ in layout if k not in writer.written]
    if missing:
        raise ReleaseError(f"{source}: the checkpoint lacks {len(missing)} parameter(s) of its config: "
                           + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    return count, writer.bytes, time.time() - start


def write_config(out_dir, config, task, dtype, extra=None, name="config.json"):
    """config.json (or `name`): transformers' keys of the DeBERTa config, the architecture of the task (none for
    task None) and the weights' dtype, plus `extra` (num_labels, the fine-tuned task and its labels)."""
    values = config.to_dict()
    if task is not None:
        values["architectures"] = [ARCHITECTURES[task]]
    values["torch_dtype"] = str(dtype).replace("torch.", "")
    values.update(extra or {})
    atomic_json(os.path.join(out_dir, name), dict(sorted(values.items())))


def write_tokenizer_files(out_dir, spm_path):
    atomic_copy(spm_path, os.path.join(out_dir, "spm.model"))
    atomic_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "vocab_type": "spm", "bos_token": "[CLS]",
        "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "split_by_punct": False})


# ---------------------------------------------------------------- save_release
def task_of(model):
    if isinstance(model, DebertaForMaskedLM):
        return "mlm"
    if isinstance(model, DebertaForSequenceClassification):
        return "classification"
    if isinstance(model, DebertaForMultipleChoice):
        return "multiple_choice"
    if isinstance(model, DebertaForEntityScoring):
        return "entity_scoring"
    return "base"


def model_layout(model, task):
    """[(release key, shape)] of a model's state dict, in its order (a ZeRO-3 partitioned parameter's full shape)."""
    params = dict(model.named_parameters())
    return [(keys.to_release(k, task), tuple(getattr(params.get(k), "ds_shape", v.shape))) for k, v in model.state_dict().items()]


def mlm_layout(config, emd):
    """[(release key, shape)] of the MLM model a pretraining checkpoint of this config holds."""
    with torch.device("meta"):
        return model_layout(DebertaForMaskedLM(config, emd=emd), "mlm")


def save_release(model, out_dir, spm_path=None, dtype=torch.float32, max_shard_size="5GB", tensors=None,
                 extra_config=None, overwrite=False):
    """Write `model` (or `tensors`: an iterable of (release key, tensor) laid out like the model, e.g. DeepSpeed's
    fp32 master weights) as a release directory: under a temporary name, renamed into place when complete."""
    check_output(out_dir, overwrite)
    task = task_of(model)
    layout = model_layout(model, task)
    if tensors is None:
        tensors = ((keys.to_release(k, task), v) for k, v in model.state_dict().items())
    extra = dict(extra_config or {})
    if getattr(model, "num_labels", None):
        extra.setdefault("num_labels", model.num_labels)
    with staged_directory(out_dir, replace=overwrite) as tmp:
        write_tensors(tmp, layout, tensors, dtype, parse_size(max_shard_size), source=out_dir)
        write_config(tmp, model.config, task, dtype, extra)
        if spm_path:
            write_tokenizer_files(tmp, spm_path)
    return out_dir
