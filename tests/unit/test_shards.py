import os
import shutil

import numpy as np
import pytest

from pipeline.data import shards


def _write(directory, name, samples):
    writer = shards.ShardWriter(str(directory), name, cls_id=1, sep_id=2)
    writer.write_lines([np.asarray(s, dtype=np.int32) for s in samples])
    return writer.close({"tokenizer_sha256": "t", "vocab_size": 50, "max_seq_len": 10, "documents": 1,
                         "source": {"task_index": 0, "num_tasks": 1, "part": 0}})


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [rng.integers(4, 50, size=n) for n in (8, 3, 8, 1)]
    manifest = _write(tmp_path, "s", samples)
    assert manifest["num_samples"] == 4 and manifest["num_tokens"] == 20 + 8
    shard = shards.Shard(str(tmp_path / "s.json"), verify="full")
    for index, sample in enumerate(samples):
        assert list(shard.sample(index)) == [1] + list(sample) + [2]
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))


def test_block_hasher_matches_whole_blocks():
    import hashlib

    data = bytes(range(256)) * 100
    hasher = shards.BlockHasher(block_bytes=1000)
    for start in range(0, len(data), 333):
        hasher.update(data[start:start + 333])
    expected = [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in range(0, len(data), 1000)]
    assert hasher.finish() == expected


@pytest.fixture
def shard_copy(data_env, tmp_path):
    target = tmp_path / "shards"
    shutil.copytree(data_env["shards"], target)
    return target


def test_corrupted_byte_is_reported_with_file_and_offset(shard_copy, tok):
    bin_path = shard_copy / "task-00000-of-00001-part-000000.bin"
    with open(bin_path, "r+b") as handle:
        handle.seek(1001)
        byte = handle.read(1)
        handle.seek(1001)
        handle.write(bytes([byte[0] ^ 0xFF]))
    data = shards.ShardSet(str(shard_copy), tok.fingerprint, verify="lazy")  # opening checks sizes only
    with pytest.raises(shards.ShardError, match=rf"{bin_path}: sha256 mismatch in bytes \[0, "):
        data.sample(0)
    with pytest.raises(shards.ShardError, match=str(bin_path)):
        shards.ShardSet(str(shard_copy), tok.fingerprint, verify="full")


def test_truncated_shard_is_reported(shard_copy, tok):
    bin_path = shard_copy / "task-00000-of-00001-part-000001.bin"
    os.truncate(bin_path, os.path.getsize(bin_path) - 7)
    with pytest.raises(shards.ShardError, match=rf"{bin_path}: .* truncated"):
        shards.ShardSet(str(shard_copy), tok.fingerprint)


def test_tokenizer_mismatch_is_reported(shard_copy):
    with pytest.raises(shards.ShardError, match="tokenizer sha256"):
        shards.ShardSet(str(shard_copy), tokenizer_fingerprint="0" * 64)


def test_incomplete_preprocessing_is_refused(shard_copy, tok):
    os.remove(shards.task_done_path(str(shard_copy), 0, 1))
    with pytest.raises(shards.ShardError, match="incomplete"):
        shards.ShardSet(str(shard_copy), tok.fingerprint)
    assert len(shards.ShardSet(str(shard_copy), tok.fingerprint, allow_incomplete=True)) > 0


def test_empty_directory_is_reported(tmp_path):
    with pytest.raises(shards.ShardError, match="no shard manifests"):
        shards.ShardSet(str(tmp_path))
