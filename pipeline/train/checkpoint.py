"""Training checkpoints: DeepSpeed's format plus what an exact resume needs.

Layout under OUTPUT_DIR/checkpoints:
    latest                          DeepSpeed's pointer to the newest tag
    global_stepN/                   DeepSpeed's files (ZeRO shards, or pipeline layer files)
    global_stepN/deberta_ds.json    run meta: model config, mode, stages, data-parallel size, step
    global_stepN/rng_rankR.pt       each rank's RNG states (torch CPU/CUDA, numpy, python)
    global_stepN_universal/         made on demand by ds_to_universal when resuming on another DP size

The client state inside DeepSpeed's files carries the step, the loader cursor (consumed samples)
and UNIVERSAL_CHECKPOINT_INFO, so `ds_to_universal` converts without `--inject_missing_state`.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)

from pipeline.errors import CheckpointError
from pipeline.io import atomic_json

META = "deberta_ds.json"
TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step):
    return f"global_step{step}"


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def universal_client_state():
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def save(stepper, ckpt_dir, step, client_state, meta, keep_last, rank):
    """A checkpoint of the stepper's engine(s), every rank's RNG states, then the meta file that marks the tag
    finished; the oldest tags beyond keep_last are removed."""
    tag = tag_for(step)
    state = dict(client_state, step=step, **universal_client_state())
    stepper.save(ckpt_dir, tag, state)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    dist.barrier()  # every rank's files are complete before the meta file marks the tag finished
    if rank == 0:
        atomic_json(os.path.join(ckpt_dir, tag, META), dict(meta, step=step))
    dist.barrier()
    if rank == 0:
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def tags(ckpt_dir):
    """Finished checkpoint tags (those with our meta file), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        match = TAG.match(name)
        if match and os.path.exists(os.path.join(ckpt_dir, name, META)):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def prune(ckpt_dir, keep_last):
    for name in tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        shutil.rmtree(os.path.join(ckpt_dir, name + "_universal"), ignore_errors=True)


def latest(ckpt_dir):
    """The newest finished tag and its meta, or (None, None). A tag without the meta file was being
    written when the run died: it is ignored (DeepSpeed's `latest` may already point at it)."""
    found = tags(ckpt_dir)
    if not found:
        return None, None
    with open(os.path.join(ckpt_dir, found[-1], META), encoding="utf-8") as f:
        return found[-1], json.load(f)


def check_compatible(meta, model_config_dict, mode, source):
    saved = meta["model_config"]
    diffs = {k: (saved.get(k), v) for k, v in model_config_dict.items() if saved.get(k) != v and k != "attention_impl"}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise CheckpointError(f"{source}: the model config differs from the checkpoint's ({detail})")
    if meta["mode"] != mode:
        raise CheckpointError(f"{source}: written in mode {meta['mode']!r}, this run is {mode!r}; convert it first "
                          f"(deberta-ds convert to-release, then init_from_release)")


def ensure_universal(ckpt_dir, tag, rank):
    """Convert tag to DeepSpeed's universal format (once; rank 0 works, the others wait)."""
    target = os.path.join(ckpt_dir, tag + "_universal")
    if rank == 0 and not os.path.exists(os.path.join(target, "done")):
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(ckpt_dir, tag), "--output_folder", target, "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {os.path.join(ckpt_dir, tag)}:\n{result.stderr[-3000:]}")
        open(os.path.join(target, "done"), "w").close()
    dist.barrier()
    return tag + "_universal"


def inner_optimizer(engine):
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def load_engine(engine, ckpt_dir, tag):
    """engine.load_checkpoint (strict) with the fixes below; returns the client state."""
    # DeepSpeed's universal loader copies param_groups[0]'s hyper-parameters into every group, which
    # would put weight decay on biases and LayerNorms: keep each group's own weight decay
    decays = [group["weight_decay"] for group in inner_optimizer(engine).param_groups]
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True)
    optimizer = inner_optimizer(engine)
    for group, decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = decay
    # ... and it gives every parameter group the same `step` tensor object, which torch's Adam then
    # increments in place once per group: each group needs its own counter
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if path is None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    return client_state


class SingleEngine:
    """What save and load need of a run with one DeepSpeed engine (fine-tuning; the pretraining steppers
    extend it)."""

    def __init__(self, engine):
        self.engine = engine

    def save(self, ckpt_dir, tag, client_state):
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)

    def load(self, ckpt_dir, tag):
        return load_engine(self.engine, ckpt_dir, tag)


def load(stepper, ckpt_dir, tag, rank, universal=False):
    """The stepper's engine(s) and this rank's RNG states (not after a universal conversion: the ranks are
    others then); returns the client state."""
    client_state = stepper.load(ckpt_dir, tag)
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if not universal and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
