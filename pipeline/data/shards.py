"""The token-shard format (version 1): how preprocessing writes packed samples and the loader reads them.

A shard NAME is three files in one directory:
  NAME.bin   the token ids of all samples, concatenated: little-endian int32, no header
  NAME.idx   sample boundaries: little-endian int64, num_samples + 1 offsets (in tokens) into NAME.bin,
             starting at 0; sample k = bin[idx[k]:idx[k+1]] (with its [CLS] ... [SEP])
  NAME.json  the manifest, written last (its presence means the shard is complete):
             {"format": "deberta-ds-shard", "version": 1, "tokenizer_sha256", "vocab_size", "max_seq_len",
              "num_samples", "num_tokens", "documents", "bin": {"bytes", "sha256", "block_bytes",
              "block_sha256": [...]}, "idx": {"bytes", "sha256"}, "source": {...}}
`block_sha256` holds the sha256 of each `block_bytes` block of NAME.bin, so corruption is reported with its
byte range and checked block by block as the loader first touches it. Both data files are written under
NAME.*.tmp and renamed, then the manifest: a crash never leaves a shard that looks complete.
"""
import contextlib
import hashlib
import json
import os

import numpy as np

from pipeline.errors import DataError, OutputError
from pipeline.io import OUTPUT_RECORD, atomic_write

FORMAT = "deberta-ds-shard"
VERSION = 1
BLOCK_BYTES = 1 << 22  # 4 MiB: hashing one takes milliseconds (sha256: 2.4 ms here), so lazy checks do not stall training
TOKEN_DTYPE = np.dtype("<i4")
OFFSET_DTYPE = np.dtype("<i8")


class ShardError(DataError):
    """A shard is missing, truncated, corrupted or does not match the tokenizer; the message names the file."""


class BlockHasher:
    """sha256 of each BLOCK_BYTES block of a byte stream, fed in pieces of any size."""

    def __init__(self, block_bytes=BLOCK_BYTES):
        self.block_bytes = block_bytes
        self.digests = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data):
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self.finish_block()

    def finish_block(self):
        if self._filled:
            self.digests.append(self._current.hexdigest())
        self._current, self._filled = hashlib.sha256(), 0

    def finish(self):
        self.finish_block()
        return self.digests


def shard_paths(directory, name):
    base = os.path.join(directory, name)
    return {"bin": base + ".bin", "idx": base + ".idx", "json": base + ".json"}


class ShardWriter:
    """Streams packed samples into one shard; `close(...)` makes it visible, `abort()` removes it."""

    def __init__(self, directory, name, cls_id, sep_id):
        self.paths = shard_paths(directory, name)
        self.cls_id, self.sep_id = cls_id, sep_id
        with self._writing():
            self._bin = open(self.paths["bin"] + ".tmp", "wb")
        self._hasher = BlockHasher()
        self._whole = hashlib.sha256()
        self._offsets = [0]
        self.num_tokens = 0

    @property
    def num_samples(self):
        return len(self._offsets) - 1

    def write_lines(self, lines):
        """Write each row of `lines` (2-D ids, or a list of 1-D arrays) as [CLS] + row + [SEP]."""
        for row in ([lines] if isinstance(lines, np.ndarray) and lines.ndim == 1 else lines):
            sample = np.empty(len(row) + 2, dtype=TOKEN_DTYPE)
            sample[0], sample[1:-1], sample[-1] = self.cls_id, row, self.sep_id
            self._append(sample)

    def write_block(self, block):
        """Fast path: a 2-D array of equal-length lines, written as one buffer."""
        rows, width = block.shape
        framed = np.empty((rows, width + 2), dtype=TOKEN_DTYPE)
        framed[:, 0], framed[:, 1:-1], framed[:, -1] = self.cls_id, block, self.sep_id
        data = framed.tobytes()
        with self._writing():
            self._bin.write(data)
        self._hasher.update(data)
        self._whole.update(data)
        start = self._offsets[-1]
        self._offsets.extend(range(start + width + 2, start + rows * (width + 2) + 1, width + 2))
        self.num_tokens += framed.size

    def _append(self, sample):
        data = sample.tobytes()
        with self._writing():
            self._bin.write(data)
        self._hasher.update(data)
        self._whole.update(data)
        self._offsets.append(self._offsets[-1] + len(sample))
        self.num_tokens += len(sample)

    def close(self, metadata):
        """Finish the data files, rename them into place, then write the manifest; return the manifest."""
        with self._writing():
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        offsets = np.asarray(self._offsets, dtype=OFFSET_DTYPE).tobytes()
        atomic_write(self.paths["idx"], offsets)
        with self._writing():
            os.replace(self.paths["bin"] + ".tmp", self.paths["bin"])
        manifest = dict(metadata, format=FORMAT, version=VERSION, num_samples=self.num_samples,
                        num_tokens=self.num_tokens,
                        bin={"file": os.path.basename(self.paths["bin"]), "bytes": self.num_tokens * 4,
                             "sha256": self._whole.hexdigest(), "block_bytes": self._hasher.block_bytes,
                             "block_sha256": self._hasher.finish()},
                        idx={"file": os.path.basename(self.paths["idx"]), "bytes": len(offsets),
                             "sha256": hashlib.sha256(offsets).hexdigest()})
        atomic_write(self.paths["json"], json.dumps(manifest, indent=1).encode())
        return manifest

    @contextlib.contextmanager
    def _writing(self):
        """An OS error writing the data file (a full disk) as one OutputError naming the shard's file."""
        try:
            yield
        except OSError as error:
            if isinstance(error, OutputError):
                raise
            raise OutputError(f"{self.paths['bin']}: cannot write ({error.strerror or error})") from None

    def abort(self):
        """Remove every file of the shard. Closing may fail to flush what is buffered (the disk that filled):
        that data is being discarded anyway, and the error that stopped the writer is the one to report."""
        with contextlib.suppress(OSError):
            self._bin.close()
        remove_shard(self.paths)


def remove_shard(paths):
    for path in paths.values():
        for candidate in (path, path + ".tmp"):
            if os.path.exists(candidate):
                os.remove(candidate)


def read_manifest(path):
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: cannot read shard manifest ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} version {VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def is_complete(directory, name):
    """True when the shard's manifest exists and its data files have the sizes it records."""
    paths = shard_paths(directory, name)
    if not os.path.exists(paths["json"]):
        return False
    try:
        manifest = read_manifest(paths["json"])
    except ShardError:
        return False
    return all(os.path.exists(paths[k]) and os.path.getsize(paths[k]) == manifest[k]["bytes"] for k in ("bin", "idx"))


class Shard:
    """A memory-mapped shard. Sizes and the offsets are checked on open; token blocks are checked
    against their sha256 the first time they are read (or all at once with verify="full")."""

    def __init__(self, manifest_path, verify="lazy"):
        self.manifest_path = manifest_path
        self.manifest = read_manifest(manifest_path)
        directory = os.path.dirname(manifest_path)
        self.bin_path = os.path.join(directory, self.manifest["bin"]["file"])
        self.idx_path = os.path.join(directory, self.manifest["idx"]["file"])
        self._check_sizes()
        self.offsets = self._load_offsets()
        self.tokens = np.memmap(self.bin_path, dtype=TOKEN_DTYPE, mode="r") if self.manifest["num_tokens"] else \
            np.zeros(0, dtype=TOKEN_DTYPE)
        self.block_bytes = self.manifest["bin"]["block_bytes"]
        self._block_digests = self.manifest["bin"]["block_sha256"]
        self._verified = np.zeros(len(self._block_digests), dtype=bool)
        self.verify = verify
        if verify == "full":
            self.verify_blocks(0, len(self._block_digests))

    def __len__(self):
        return self.manifest["num_samples"]

    def _check_sizes(self):
        for path, key in ((self.bin_path, "bin"), (self.idx_path, "idx")):
            if not os.path.exists(path):
                raise ShardError(f"{path}: missing (listed in {self.manifest_path})")
            size, expected = os.path.getsize(path), self.manifest[key]["bytes"]
            if size != expected:
                raise ShardError(f"{path}: {size} bytes, manifest says {expected}: truncated or overwritten "
                                 f"(the shard is corrupted at byte offset {min(size, expected)})")

    def _load_offsets(self):
        with open(self.idx_path, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != self.manifest["idx"]["sha256"]:
            raise ShardError(f"{self.idx_path}: sha256 mismatch: the offsets file is corrupted")
        offsets = np.frombuffer(data, dtype=OFFSET_DTYPE)
        if len(offsets) != len(self) + 1 or offsets[0] != 0 or offsets[-1] != self.manifest["num_tokens"] \
                or np.any(np.diff(offsets) <= 0):
            raise ShardError(f"{self.idx_path}: offsets inconsistent with {self.manifest_path}")
        return offsets

    def verify_blocks(self, first, last):
        """Check the sha256 of blocks [first, last) not checked yet; raise ShardError naming the byte range."""
        for block in range(first, last):
            if self._verified[block]:
                continue
            start = block * self.block_bytes
            data = self.tokens[start // 4:(start + self.block_bytes) // 4].tobytes()
            if hashlib.sha256(data).hexdigest() != self._block_digests[block]:
                raise ShardError(f"{self.bin_path}: sha256 mismatch in bytes [{start}, {start + len(data)}) "
                                 f"(block {block}): the shard is corrupted; re-run preprocess for it")
            self._verified[block] = True

    def sample(self, index):
        """Token ids of sample `index` ([CLS] ... [SEP]) as a read-only int32 array, after its checksum check."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if self.verify != "none":
            self.verify_blocks(start * 4 // self.block_bytes, (end * 4 - 1) // self.block_bytes + 1)
        return self.tokens[start:end]


def task_done_path(directory, task_index, num_tasks):
    """Marker written when preprocessing task `task_index` of `num_tasks` has written all its shards."""
    return os.path.join(directory, f"task-{task_index:05d}-of-{num_tasks:05d}.done")


class ShardSet:
    """All shards of a directory (the outputs of every preprocessing task), as one indexable dataset.

    Refuses to load when a task has not finished (unless allow_incomplete), when shards were made with
    different tokenizers or lengths, or when `tokenizer_fingerprint` is given and differs.
    """

    def __init__(self, directory, tokenizer_fingerprint=None, verify="lazy", allow_incomplete=False):
        if not os.path.isdir(directory):
            raise ShardError(f"{directory}: no such shard directory")
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json") and n != OUTPUT_RECORD)
        self.shards = [Shard(os.path.join(directory, n), verify=verify) for n in names]
        if not self.shards:
            raise ShardError(f"{directory}: no shard manifests (*.json); run `deberta-ds preprocess` first")
        if not allow_incomplete:
            self._check_tasks_done(directory)
        self.tokenizer_sha256 = self._same_value("tokenizer_sha256")
        self.max_seq_len = self._same_value("max_seq_len")
        self.vocab_size = self._same_value("vocab_size")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_sha256:
            raise ShardError(f"{directory}: shards were made with tokenizer sha256 {self.tokenizer_sha256}, "
                             f"but the given tokenizer has sha256 {tokenizer_fingerprint}: use the spm.model "
                             f"the shards were made with, or preprocess again")
        self.cumulative = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = sum(s.manifest["num_tokens"] for s in self.shards)

    def _same_value(self, key):
        values = {s.manifest[key] for s in self.shards}
        if len(values) != 1:
            raise ShardError(f"shards disagree on {key}: " + ", ".join(
                f"{s.manifest_path}={s.manifest[key]}" for s in self.shards))
        return values.pop()

    def _check_tasks_done(self, directory):
        tasks = {(s.manifest["source"]["task_index"], s.manifest["source"]["num_tasks"]) for s in self.shards}
        for num_tasks in {k for _, k in tasks}:
            missing = [i for i in range(num_tasks) if not os.path.exists(task_done_path(directory, i, num_tasks))]
            if missing:
                raise ShardError(f"{directory}: preprocessing is incomplete: tasks {missing} of {num_tasks} "
                                 f"have not finished (no {os.path.basename(task_done_path(directory, missing[0], num_tasks))})")

    def __len__(self):
        return int(self.cumulative[-1])

    @property
    def fingerprint(self):
        """sha256 over every shard's data and index hashes, in the loader's order: what the samples are."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.manifest['bin']['sha256']} {shard.manifest['idx']['sha256']}\n".encode())
        return digest.hexdigest()

    @property
    def blocks_fingerprint(self):
        """sha256 over every shard's list of block hashes, in the loader's order. The loader checks each block of
        data against that list, not against the whole file's sha256 that `fingerprint` covers: a .bin changed
        together with its block list would pass the checks and leave `fingerprint` as it was."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{shard.block_bytes} {' '.join(shard.manifest['bin']['block_sha256'])}\n".encode())
        return digest.hexdigest()

    def identity(self):
        """What a run records about its data, and compares on resume."""
        return {"tokenizer_sha256": self.tokenizer_sha256, "shards_sha256": self.fingerprint,
                "blocks_sha256": self.blocks_fingerprint, "num_samples": len(self), "max_seq_len": self.max_seq_len}

    def sample(self, index):
        shard = int(np.searchsorted(self.cumulative, index, side="right")) - 1
        return self.shards[shard].sample(index - int(self.cumulative[shard]))
