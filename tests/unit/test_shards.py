import hashlib
import json
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


def test_a_shard_changed_with_its_block_list_differs_from_the_recorded_identity(shard_copy, tok):
    """A .bin changed and its manifest's block hashes edited to match passes the loader's checks and leaves the
    whole-file hashes (shards_sha256) as they were: the block lists' own hash (blocks_sha256) tells, and a resume
    on such shards is refused like one on other data (and accepted only with --accept-data-change)."""
    from pipeline.errors import CheckpointError
    from pipeline.train.resume import check_same_data
    recorded = shards.ShardSet(str(shard_copy), tok.fingerprint).identity()
    bin_path = shard_copy / "task-00000-of-00001-part-000000.bin"
    manifest_path = shard_copy / "task-00000-of-00001-part-000000.json"
    with open(bin_path, "r+b") as handle:
        handle.seek(4 * 5)
        handle.write(np.asarray([7], dtype="<i4").tobytes())  # token 5 of the first sample becomes 7
    manifest = json.loads(manifest_path.read_text())
    block = open(bin_path, "rb").read()[:manifest["bin"]["block_bytes"]]
    manifest["bin"]["block_sha256"][0] = hashlib.sha256(block).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    changed = shards.ShardSet(str(shard_copy), tok.fingerprint, verify="full")  # passes every check
    now = changed.identity()
    assert changed.sample(0)[5] == 7 and now["shards_sha256"] == recorded["shards_sha256"]
    assert now["blocks_sha256"] != recorded["blocks_sha256"]
    meta = {"tokenizer_sha256": tok.fingerprint, "data": recorded}
    with pytest.raises(CheckpointError, match=r"trained on other data .*\(blocks_sha256: checkpoint"):
        check_same_data(meta, now, "global_step2", accept_change=False)
    assert check_same_data(meta, now, "global_step2", accept_change=True) is True
    older = {"tokenizer_sha256": tok.fingerprint, "data": {k: v for k, v in recorded.items() if k != "blocks_sha256"}}
    assert check_same_data(older, recorded, "global_step2", accept_change=False) is False  # older checkpoints resume
