"""Training checkpoints: DeepSpeed's format plus what an exact resume needs.

Layout under OUTPUT_DIR/checkpoints:
    latest                          DeepSpeed's pointer to the newest tag
    global_stepN/                   DeepSpeed's files (ZeRO shards, or pipeline layer files); a stepper with
                                    two engines (rtd, decoupled) puts each engine's in a subdirectory
                                    (generator/, discriminator/)
    global_stepN/deberta_ds.json    run meta: model config, mode, stages, data-parallel size, step
    global_stepN/rng_rankR.pt       each rank's RNG states (torch CPU/CUDA, numpy, python)
    global_stepN_universal/         made on demand by ds_to_universal when resuming on another DP size

The client state inside DeepSpeed's files carries the step, the loader cursor (consumed samples)
and UNIVERSAL_CHECKPOINT_INFO, so `ds_to_universal` converts without `--inject_missing_state`.

deberta_ds.json is written last, by rank 0, once every rank's files are complete: a tag without it was being
written when the run stopped and is not a checkpoint. It lists every file of the tag with its size (and the
sha256 of the small ones: RNG states, DeepSpeed's model states of small models), so a resume checks the
newest tag before loading it: a file missing, truncated or changed, or a meta file that cannot be read, makes
the tag damaged; the run says so in one line and resumes from the newest complete tag instead. DeepSpeed's
files are written through Python file objects, so a failed write (disk full, a quota, an I/O error) names
the file and the OS error; the partial tag is removed and the previous checkpoint stays.
"""
import hashlib
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

from pipeline.errors import CheckpointError, OutputError
from pipeline.io import atomic_json
from pipeline.run.lifecycle import as_user_error, on_rank_zero

META = "deberta_ds.json"
TAG = re.compile(r"^global_step(\d+)$")
HASHED_BYTES = 1 << 20  # files up to this size get a sha256 in the meta file (cheap); larger ones a size


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


def os_error_in(error):
    """The OSError behind an exception (torch.save raises RuntimeError with the file's OSError as context)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def save_file(obj, path):
    """torch.save through a Python file object: a failed write is an OutputError naming the path and the OS
    error (torch.save to a path reports only "iostream error")."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as error:
        cause = os_error_in(error)
        if cause is None or isinstance(cause, OutputError):
            raise
        raise OutputError(f"{path}: {cause.strerror or cause}") from None


_failed_writes = []  # OutputErrors of DeepSpeed's writes during the save in progress (one save at a time)


def write_through_python(engine):
    """DeepSpeed's checkpoint engine writing every file with save_file (done once per engine). A failed write
    is recorded, not raised: save_checkpoint ends in barriers that every rank must reach, and a rank that left
    it early (a full disk on one node) would wait in the next collective while the others wait in DeepSpeed's
    barrier. save() raises the recorded failure once DeepSpeed has returned."""
    checkpoint_engine = engine.checkpoint_engine
    if not getattr(checkpoint_engine, "writes_through_python", False):
        def save_recording(state_dict, path):
            try:
                save_file(state_dict, path)
            except OutputError as error:
                _failed_writes.append(error)
        checkpoint_engine.save = save_recording
        checkpoint_engine.writes_through_python = True


def on_every_rank(work):
    """Run work() on this rank; if it raised an OSError on any rank, every rank gets that rank's message."""
    message = None
    try:
        work()
    except OSError as error:
        message = str(as_user_error(error) or error)
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def save(stepper, ckpt_dir, step, client_state, meta, keep_last, rank):
    """A checkpoint of the stepper's engine(s), every rank's RNG states, then the meta file that marks the tag
    finished and lists its files; the oldest tags beyond keep_last are removed. A write that fails on any rank
    removes the partial tag on all and raises an OutputError naming the file and the OS error."""
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    state = dict(client_state, step=step, **universal_client_state())

    def write_rank_files():
        _failed_writes.clear()
        try:
            stepper.save(ckpt_dir, tag, state)
        except OSError:  # DeepSpeed's own writes (it copies zero_to_fp32.py in) after a recorded failure
            if not _failed_writes:
                raise
        if _failed_writes:  # the first failed write names the file that could not be written
            raise _failed_writes[0]
        save_file(rng_state(), os.path.join(tag_dir, f"rng_rank{rank}.pt"))

    def write_meta():
        if rank == 0:
            atomic_json(os.path.join(tag_dir, META), dict(meta, step=step, files=file_manifest(tag_dir)))

    for work in (write_rank_files, write_meta):  # every rank's files are complete before the meta file
        failure = on_every_rank(work)
        if failure:
            if rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            dist.barrier()
            previous = tags(ckpt_dir)
            raise OutputError(f"saving checkpoint {tag_dir} failed: {failure}; "
                              + (f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint"))
    if rank == 0:
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def file_manifest(tag_dir):
    """{file relative to the tag: {"bytes", and "sha256" for files up to HASHED_BYTES}} of every file but META."""
    files = {}
    for folder, _, names in os.walk(tag_dir):
        for name in sorted(names):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, tag_dir)
            if relative == META:
                continue
            entry = {"bytes": os.path.getsize(path)}
            if entry["bytes"] <= HASHED_BYTES:
                entry["sha256"] = _sha256(path)
            files[relative] = entry
    return files


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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


def read_meta(tag_dir):
    path = os.path.join(tag_dir, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from None
    # a JSON object: pretraining's (model_config, mode, data, ...) or fine-tuning's (run); each caller checks
    # the keys it reads (check_compatible, resume_position, the converter's read_meta)
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path}: not a deberta-ds checkpoint meta file (no step)")
    return meta


def damage(tag_dir, meta):
    """Why the files of a tag do not match its meta file ("" when they do; meta files of builds that recorded no
    file list are taken as they are)."""
    for relative, entry in sorted(meta.get("files", {}).items()):
        path = os.path.join(tag_dir, relative)
        if not os.path.exists(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, {entry['bytes']} when saved (truncated or replaced)"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{path}: its contents changed since it was saved (sha256 differs)"
    return ""


def newest_complete(ckpt_dir):
    """(tag, meta, damaged) of the newest finished tag whose files match its meta file, or (None, None, damaged);
    damaged lists (tag, why) of the newer finished tags that do not."""
    damaged = []
    for name in reversed(tags(ckpt_dir)):
        tag_dir = os.path.join(ckpt_dir, name)
        try:
            meta = read_meta(tag_dir)
            problem = damage(tag_dir, meta)
        except CheckpointError as error:
            problem = str(error)
        if not problem:
            return name, meta, damaged
        damaged.append((name, problem))
    return None, None, damaged


def prune(ckpt_dir, keep_last):
    for name in tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        shutil.rmtree(os.path.join(ckpt_dir, name + "_universal"), ignore_errors=True)


def resume_point(ckpt_dir, rank):
    """(tag, meta) to resume from, or (None, None) for a fresh run. Rank 0 names each damaged newer tag; a
    directory whose tags are all damaged is refused: starting over would not continue the run."""
    tag, meta, damaged = newest_complete(ckpt_dir)
    if rank == 0:
        for name, problem in damaged:
            print(f"checkpoint {name} is damaged ({problem}); "
                  + (f"resuming from {tag}" if tag else "no complete checkpoint before it"), file=sys.stderr)
    if tag is None and damaged:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to resume from ({damaged[-1][0]} is the oldest, "
                              "damaged); starting over would not continue the run. Move the checkpoints away to "
                              "start from scratch")
    return tag, meta


ENGINE_DIRS = ("generator", "discriminator")  # a two-engine stepper's subdirectories of a tag (rtd, decoupled)


def engine_dirs(tag_dir):
    """The DeepSpeed checkpoints of a tag, relative to it: [""] when its files are at the tag's top (one engine),
    else those of ENGINE_DIRS it holds (objective rtd, decoupled: generator/ and discriminator/)."""
    def holds_engine(sub):
        folder = os.path.join(tag_dir, sub)
        return os.path.isdir(folder) and any(name.endswith("model_states.pt") for name in os.listdir(folder))
    return [""] if holds_engine("") else [sub for sub in ENGINE_DIRS if holds_engine(sub)]


def ensure_universal(ckpt_dir, tag, rank):
    """Convert tag to DeepSpeed's universal format (once; rank 0 works, the others wait), each engine's
    checkpoint into the same place under global_stepN_universal as it has under the tag."""
    target = os.path.join(ckpt_dir, tag + "_universal")

    def convert():
        if os.path.exists(os.path.join(target, "done")):
            return
        shutil.rmtree(target, ignore_errors=True)
        for sub in engine_dirs(os.path.join(ckpt_dir, tag)):
            source = os.path.join(ckpt_dir, tag, sub)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
                   "--output_folder", os.path.join(target, sub), "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise CheckpointError(f"ds_to_universal failed on {source}:\n{result.stderr[-3000:]}")
        open(os.path.join(target, "done"), "w").close()

    on_rank_zero(rank, convert)  # the others wait in it, and stop with rank 0's error
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
    # ... and its learning rate: the scheduler's state is restored, but it rewrites the groups' rates only at
    # its next step, so until then every group would run at group 0's rate (rtd: the discriminator at the
    # generator's lr); set each group's from the restored scheduler (unchanged where nothing was copied)
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and path is not None:
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    if path is None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    return client_state


def load(stepper, ckpt_dir, tag, rank, universal=False):
    """The stepper's engine(s) and this rank's RNG states (not after a universal conversion: the ranks are
    others then); returns the client state."""
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if not universal and not os.path.exists(rng_file):
        raise CheckpointError(f"{rng_file}: missing; without this rank's random states the resumed run would not "
                              "be the run it continues (dropout, masking draws)")
    client_state = stepper.load(ckpt_dir, tag)
    if not universal:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


class Checkpointer:
    """A run's checkpoints: where they go, when they are due, how many stay, and what the meta file records.

    interval    save every `interval` steps and at the last step; None: only when the run is stopped by a
                signal (fine-tuning: its checkpoints exist for preemption, and the run removes them at its end)
    keep_last   finished tags kept (older ones are removed after a save)
    meta        what deberta_ds.json records beside the step and the file list: the run's identity, which
                the trainer checks on resume (pretraining: model, mode, data; fine-tuning: the whole run)
    """

    def __init__(self, ckpt_dir, rank, interval=None, keep_last=1, meta=None):
        from pipeline.io import make_dirs
        self.dir, self.rank, self.interval, self.keep_last = ckpt_dir, rank, interval, keep_last
        self.meta = dict(meta or {})
        make_dirs(ckpt_dir, "checkpoint directory")

    def due(self, step, last_step):
        return self.interval is not None and (step % self.interval == 0 or step == last_step)

    def resume_point(self):
        """(tag, meta) of the newest complete checkpoint, or (None, None) (resume_point below)."""
        return resume_point(self.dir, self.rank)

    def load(self, stepper, tag, universal=False):
        return load(stepper, self.dir, tag, self.rank, universal=universal) or {}

    def save(self, stepper, step, client_state):
        return save(stepper, self.dir, step, client_state, self.meta, self.keep_last, self.rank)

    def remove_all(self):
        """The run is complete and nothing is left to resume (rank 0 removes; fine-tuning's end)."""
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
