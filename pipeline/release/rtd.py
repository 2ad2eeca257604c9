"""DeBERTa-v3 releases: the published layout of the deberta-v3-* directories, written from an RTD training
checkpoint and read to start (or continue) an RTD run.

    config.json                   the discriminator's config (deberta-v2)
    model.safetensors             the discriminator as a deberta-v2 model: deberta.* with its word table merged
                                  (gdes: the generator's + the delta; es: the generator's), and the RTD head
                                  under mask_predictions.*, which transformers ignores
    pytorch_model.generator.bin   the generator's state dict (deberta.*, lm_predictions.*, the EMD's table), as
                                  the published directories carry it (the official rtd.sh continues from it)
    generator_config.json         the generator's config (its depth differs from the discriminator's)
    spm.model, tokenizer_config.json

transformers' AutoModel loads the directory as the discriminator; `deberta-ds finetune --release DIR` starts
from it. One directory rather than two: it is the layout users download and continue from, and the generator
is a training-time part of the model, not a release of its own.
"""
import os
import sys

import torch

from model import DebertaConfig
from model import state_dict_adapter as keys
from model.rtd import DebertaForRTD, RTDModel
from pipeline.errors import ReleaseError
from pipeline.run.lifecycle import raise_where_read, say
from pipeline.release.read import Release, check_float_weight, check_grown, copy_weight, grown_tables
from pipeline.release.write import StreamingSafetensors, write_config

GENERATOR_FILE = "pytorch_model.generator.bin"
GENERATOR_CONFIG = "generator_config.json"
G_TABLE = "generator." + keys.WORD_EMBEDDINGS
D_TABLE = "discriminator." + keys.WORD_EMBEDDINGS


def rtd_layout(config, generator_config, sharing, emd):
    """[(RTDModel key, shape)]: what an RTD checkpoint of these configs holds."""
    with torch.device("meta"):
        model = RTDModel(config, generator_config, sharing, emd=emd)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def discriminator_layout(config):
    """[(release key, shape)] of the released discriminator (a table of its own, merged)."""
    with torch.device("meta"):
        return [(k, tuple(v.shape)) for k, v in DebertaForRTD(config, "none").state_dict().items()]


def write_rtd_release(tensors, config, generator_config, sharing, emd, out_dir, dtype, max_shard_bytes, source):
    """Stream (RTDModel key, tensor) from a checkpoint into the v3 layout in out_dir. Returns (tensors, bytes)."""
    expected = dict(rtd_layout(config, generator_config, sharing, emd))
    d_layout = discriminator_layout(config)
    writer = StreamingSafetensors(out_dir, d_layout, dtype, max_shard_bytes)
    generator, tables, seen = {}, {}, set()
    try:
        for key, tensor in tensors:
            key = keys.renamed_rtd_classifier(key)  # a checkpoint written before the rename
            if key not in expected or tuple(tensor.shape) != expected[key]:
                raise ReleaseError(f"{source}: {key} {tuple(tensor.shape)} is not a tensor of the RTD model of the "
                                   "checkpoint's configs (config and tensors disagree)")
            seen.add(key)
            if key in (G_TABLE, D_TABLE):
                tables[key] = tensor.float()
            if key.startswith("generator."):
                generator[key[len("generator."):]] = tensor.detach().to(dtype).clone()
            elif key != D_TABLE:
                writer.write(key[len("discriminator."):], tensor)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ReleaseError(f"{source}: the checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:6])}")
        merged = {"gdes": lambda: tables[G_TABLE] + tables[D_TABLE], "es": lambda: tables[G_TABLE],
                  "none": lambda: tables[D_TABLE]}[sharing]()
        writer.write(keys.WORD_EMBEDDINGS, merged)
    finally:
        writer.close()
    torch.save(generator, os.path.join(out_dir, GENERATOR_FILE))
    write_config(out_dir, config, "base", dtype, extra={"pretraining": "rtd", "embedding_sharing": sharing})
    write_config(out_dir, generator_config, None, dtype, name=GENERATOR_CONFIG)
    return len(seen), writer.bytes


def read_generator(path, config):
    """(generator config, {our key: tensor, mapped}) of a v3 release directory's generator file. Its config comes
    from generator_config.json, or, as a published directory has none, from the discriminator's with the depth
    the file's layers give."""
    file = os.path.join(path, GENERATOR_FILE)
    if not os.path.exists(file):
        raise ReleaseError(f"{path}: no {GENERATOR_FILE}: an RTD run starts from a v3 release directory that holds "
                           "the generator (as the published deberta-v3-* and `deberta-ds convert` ones do)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file
        raise ReleaseError(f"{file}: cannot read ({type(error).__name__}: {error})") from None
    state = keys.from_release_state(state)
    config_file = os.path.join(path, GENERATOR_CONFIG)
    if os.path.exists(config_file):
        generator_config = DebertaConfig.from_json(config_file)
    else:
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("deberta.encoder.layer."))
        generator_config = config.replace(num_hidden_layers=depth)
    return generator_config, state


def rtd_head(path, release):
    """{key: reference} of a v3 release's RTD head (`mask_predictions.*`), its classifier under the published
    name: a release that spells it `classifer` (an earlier official revision's name, and ours before) loads,
    with a notice."""
    head = {k: ref for k, ref in release._release_refs.items() if k.startswith("mask_predictions.")}
    if any(keys.OLD_RTD_CLASSIFIER in k for k in head):
        print(f"{path}: the RTD head's classifier is stored as {keys.OLD_RTD_CLASSIFIER}* (the old spelling); "
              f"read as {keys.RTD_CLASSIFIER}*", file=sys.stderr)
    return {keys.renamed_rtd_classifier(k): ref for k, ref in head.items()}


def load_rtd_release_into(model, path, stage, rank):
    """An RTDModel's weights from a v3 release: the discriminator from model.safetensors (its merged table split
    back per the run's sharing: gdes delta = discriminator table - generator table), the generator from
    pytorch_model.generator.bin. Under ZeRO-3 rank 0 reads and GatheredParameters broadcasts, one tensor at a time
    (as pipeline/train/zero3.py load_release_into)."""
    import deepspeed
    release = Release(path)
    reads = stage != 3 or rank == 0
    error, values = None, {}
    if reads:
        try:
            generator_config, generator = read_generator(path, release.config)
            if generator_config.num_hidden_layers != model.generator_config.num_hidden_layers:
                raise ReleaseError(f"{path}: its generator has {generator_config.num_hidden_layers} layers, the run's "
                                   f"{model.generator_config.num_hidden_layers} (generator_layers)")
            head = rtd_head(path, release)
            if not head:
                raise ReleaseError(f"{path}: no RTD head (mask_predictions.*) to continue training from")
            values = {"generator." + k: v for k, v in generator.items()}
            values.update({"discriminator." + k: ref for k, ref in head.items()})
            values.update({"discriminator." + k: ref for k, ref in release.refs.items()
                           if k.startswith("deberta.") and k != keys.WORD_EMBEDDINGS})
            values["release table"] = release.refs[keys.WORD_EMBEDDINGS]
            for name, value in values.items():  # integer weights would load silently as whole numbers
                check_float_weight(getattr(value, "file", os.path.join(path, GENERATOR_FILE)),
                                   getattr(value, "key", name.split(".", 1)[-1]), value.dtype)
        except (ReleaseError, KeyError, ValueError) as e:
            error = e if isinstance(e, ReleaseError) else ReleaseError(f"{path}: not a v3 release ({e})")
    raise_where_read(error, stage == 3)
    own = dict(model.named_parameters())
    if reads:
        wanted = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in own.items()}
        have = {k: tuple(v.shape) for k, v in values.items() if k != "release table"}
        grown = grown_tables(have, wanted)
        problems = [k for k in wanted if k not in have and k != D_TABLE] + \
                   [f"{k} {have[k]} vs {s}" for k, s in wanted.items() if k in have and have[k] != s and k not in grown]
        if problems:
            error = ReleaseError(f"{path}: does not fit the run's RTD model: " + ", ".join(problems[:6]))
        else:
            try:  # the generator carries the EMD's table
                notice = check_grown(path, generator_config, model.generator_config, grown)
                if notice:
                    say(rank, notice)
            except ReleaseError as e:
                error = e
    raise_where_read(error, stage == 3)
    for name, param in own.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=stage == 3):
            if not reads:
                continue
            if name == D_TABLE:  # gdes: the delta that keeps the released table; none: the table itself
                table = _load(values["release table"]).float()
                tensor = table - _load(values[G_TABLE]).float() if model.sharing == "gdes" else table
            else:
                tensor = _load(values[name])
            copy_weight(param.data, tensor)


def _load(value):
    return value.load() if hasattr(value, "load") else value
