import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from tests.helpers.data import preprocess_args
from pipeline import cli
from pipeline.data import preprocess, shards
from pipeline.data.tokenizer import Tokenizer


def _all_tokens(directory, tokenizer):
    """Every sample's tokens without [CLS]/[SEP], concatenated in shard order."""
    data = shards.ShardSet(str(directory), tokenizer.fingerprint, verify="full")
    return np.concatenate([data.sample(i)[1:-1] for i in range(len(data))]), data


def _digests(directory):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


def test_packing_follows_the_recipe(data_env, tok):
    text_tokens = Tokenizer(data_env["spm"], split_special_tokens=True)
    expected = np.concatenate([text_tokens.encode(line.rstrip("\n")) for f in data_env["corpus_files"]
                               for line in open(f, encoding="utf-8") if line.strip()])
    tokens, data = _all_tokens(data_env["shards"], tok)
    assert np.array_equal(tokens, expected)
    for shard in data.shards:
        lengths = np.diff(shard.offsets)
        assert np.all(lengths[:-1] == 64) and 3 <= lengths[-1] <= 64  # only a shard's last sample is short
        assert np.all(shard.tokens[shard.offsets[:-1]] == tok.cls_id)
        assert np.all(shard.tokens[shard.offsets[1:] - 1] == tok.sep_id)
    assert len(data.shards) > 2  # --shard-tokens split the output


@pytest.mark.parametrize("split_by", ["files", "documents"])
def test_tasks_are_disjoint_and_complete(data_env, split_by):
    files = data_env["corpus_files"]
    everything = list(preprocess.task_documents(preprocess_args(files, None, None), 0, 1))
    parts = [list(preprocess.task_documents(preprocess_args(files, None, None, split_by=split_by), i, 3))
             for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything) and sum(map(len, parts)) == len(everything)
    assert all(parts)


def test_tasks_combine_by_listing(data_env, tok, tmp_path):
    for index in range(3):
        args = preprocess_args(data_env["corpus_files"], data_env["spm"], str(tmp_path), num_shards=3,
                               shard_index=index, split_by="documents")
        preprocess.preprocess(args, *preprocess.task_from_env(3, index))
    combined, _ = _all_tokens(tmp_path, tok)
    single, _ = _all_tokens(data_env["shards"], tok)
    assert sorted(combined.tolist()) == sorted(single.tolist())


def test_same_output_with_two_workers_and_after_a_crash(data_env, tmp_path):
    args = preprocess_args(data_env["corpus_files"][:2], data_env["spm"], str(tmp_path / "a"), workers=2)
    preprocess.preprocess(args, 0, 1)
    reference = _digests(tmp_path / "a")
    # A crash while writing part 2: its manifest is missing, a temp file is left, no done marker.
    os.remove(tmp_path / "a" / "task-00000-of-00001-part-000002.json")
    os.remove(shards.task_done_path(str(tmp_path / "a"), 0, 1))
    (tmp_path / "a" / "task-00000-of-00001-part-000003.bin.tmp").write_bytes(b"junk")
    mtime = os.path.getmtime(tmp_path / "a" / "task-00000-of-00001-part-000000.bin")
    preprocess.preprocess(preprocess_args(args.input, args.tokenizer, args.output_dir, workers=1), 0, 1)
    assert _digests(tmp_path / "a") == reference
    assert os.path.getmtime(tmp_path / "a" / "task-00000-of-00001-part-000000.bin") == mtime  # skipped


def test_slurm_array_defaults():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert preprocess.task_from_env(environ=env) == (4, 8)
    assert preprocess.task_from_env(environ={}) == (0, 1)
    assert preprocess.task_from_env(2, 1, environ=env) == (1, 2)
    with pytest.raises(ValueError):
        preprocess.task_from_env(2, 2, environ={})


def test_jsonl_gzip_and_parquet_inputs(tmp_path, data_env, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document here", "second one, with ünïcode", "third"]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    assert cli.main(["preprocess", "--input", str(tmp_path / "*.jsonl.gz"), str(tmp_path / "*.parquet"),
                     "--tokenizer", data_env["spm"], "--output-dir", str(out), "--no-progress"]) == 0
    tokens, _ = _all_tokens(out, tok)
    assert tokens.tolist() == sum((tok.encode(d) for d in docs + docs), [])


def _preprocess_cli(inputs, spm, out, *extra):
    return cli.main(["preprocess", "--input", *map(str, inputs), "--tokenizer", str(spm), "--output-dir", str(out),
                     "--no-progress", *extra])


@pytest.mark.parametrize("content, message", [
    (b"", r"bad.txt: empty file"),
    (b"good line\nbad \xff\xfe line\n", r"bad.txt:2 \(byte offset 14\): invalid UTF-8"),
    (b"short\n" + b"x" * 200_000 + b"\n", r"bad.txt:2 \(byte offset 6\): line longer than --max-line-bytes=100000"),
])
def test_bad_input_fails_naming_file_and_line(tmp_path, data_env, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert _preprocess_cli([data_env["corpus_files"][0], bad], data_env["spm"], out,
                           "--max-line-bytes", "100000", "--split-by", "documents") == 1
    assert __import__("re").search(message, capsys.readouterr().err)
    leftovers = [n for n in os.listdir(out) if n.endswith((".json", ".done"))]
    assert leftovers == []  # no half-written shard looks complete


def test_missing_tokenizer_fails(tmp_path, data_env, capsys):
    assert _preprocess_cli(data_env["corpus_files"][:1], tmp_path / "nope.model", tmp_path / "o") == 1
    assert "nope.model" in capsys.readouterr().err
