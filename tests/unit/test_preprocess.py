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
from pipeline.io import OUTPUT_RECORD


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
    leftovers = [n for n in os.listdir(out) if n.endswith((".json", ".done")) and n != OUTPUT_RECORD]
    assert leftovers == []  # no half-written shard looks complete (the directory's identity record is no shard)


def test_missing_tokenizer_fails(tmp_path, data_env, capsys):
    assert _preprocess_cli(data_env["corpus_files"][:1], tmp_path / "nope.model", tmp_path / "o") == 1
    assert "nope.model" in capsys.readouterr().err


# ---------------------------------------------------------------- one shard directory, one identity
@pytest.fixture
def finished(data_env, tmp_path):
    """A finished shard directory of two corpus files: (its path, its files' digests)."""
    out = tmp_path / "shards"
    assert _preprocess_cli(data_env["corpus_files"][:2], data_env["spm"], out, "--max-seq-len", "64") == 0
    return out, _digests(out)


@pytest.fixture(scope="module")
def other_spm(data_env, tmp_path_factory):
    from pipeline.data import tokenizer
    texts = (line for line in open(data_env["corpus_files"][0], encoding="utf-8"))
    return tokenizer.train(texts, str(tmp_path_factory.mktemp("other") / "spm"), vocab_size=300, sample_size=2000)


@pytest.mark.parametrize("change, message", [
    ("tokenizer", "tokenizer_sha256: recorded"),
    ("max_seq_len", "max_seq_len: recorded 64, now 128"),
    ("input", "input_files: recorded 2 entries, now 1"),
    ("num_shards", "num_tasks: recorded 1, now 2"),
])
def test_a_rerun_with_other_inputs_or_settings_is_refused_and_changes_nothing(finished, data_env, other_spm, capsys,
                                                                              change, message):
    """Before, such a rerun into a finished directory exited 0, wrote nothing and replaced spm.model."""
    out, before = finished
    inputs, spm, extra = data_env["corpus_files"][:2], data_env["spm"], ["--max-seq-len", "64"]
    if change == "tokenizer":
        spm = other_spm
    elif change == "max_seq_len":
        extra = ["--max-seq-len", "128"]
    elif change == "input":
        inputs = inputs[:1]
    else:
        extra += ["--num-shards", "2", "--shard-index", "1"]
    capsys.readouterr()
    assert _preprocess_cli(inputs, spm, out, *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: holds the output of a preprocess of other inputs or settings (")
    assert message in err and f"preprocess into a new --output-dir, or delete {out} to redo it" in err
    assert len(err.splitlines()) == 1 and _digests(out) == before


def test_a_killed_run_continues_only_with_its_own_input(finished, data_env, capsys):
    """Killed while writing its last shard: another --input is refused (it would mix two corpora); the same input
    finishes the directory as an uninterrupted run does."""
    out, before = finished
    last = sorted(n for n in os.listdir(out) if n.startswith("task-") and n.endswith(".json"))[-1]
    os.remove(out / last)
    os.remove(shards.task_done_path(str(out), 0, 1))
    assert _preprocess_cli(data_env["corpus_files"][2:], data_env["spm"], out, "--max-seq-len", "64") == 1
    assert "input_files: recorded 2 entries, now 2; first difference at entry 0" in capsys.readouterr().err
    assert not (out / last).exists()
    assert _preprocess_cli(data_env["corpus_files"][:2], data_env["spm"], out, "--max-seq-len", "64") == 0
    assert _digests(out) == before


def test_a_directory_without_shards_takes_the_next_runs_identity(data_env, other_spm, tmp_path, capsys):
    """A first run that failed on its input wrote no shard: nothing can be mixed, so a corrected rerun (another
    input or tokenizer) is not refused."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"bad \xff line\n")
    out = tmp_path / "out"
    assert _preprocess_cli([bad], other_spm, out) == 1
    assert _preprocess_cli(data_env["corpus_files"][:1], data_env["spm"], out) == 0
    assert json.loads((out / OUTPUT_RECORD).read_text())["identity"]["input_files"] == [data_env["corpus_files"][0]]
    assert open(out / "spm.model", "rb").read() == open(data_env["spm"], "rb").read()


def _cut_gzip():
    """A gzip file whose end is missing (a download or copy that stopped): its first lines decompress."""
    text = "".join(f"document {i}: {' '.join(str(i * j * 7919 % 10007) for j in range(20))}\n" for i in range(2000))
    compressed = gzip.compress(text.encode())
    return compressed[:len(compressed) // 2]


@pytest.mark.parametrize("name, content, message", [
    ("cut.txt.gz", _cut_gzip(), "cut.txt.gz: truncated gzip file (Compressed file ended"),
    ("plain.jsonl.gz", b'{"text": "not compressed"}\n', "plain.jsonl.gz: not a valid gzip file (Not a gzipped file"),
    ("broken.parquet", b"PAR1 this is no parquet", "broken.parquet: not a readable parquet file (Parquet magic bytes"),
], ids=["truncated-gzip", "not-gzip", "corrupt-parquet"])
@pytest.mark.parametrize("command", ["preprocess", "tokenizer train"])
def test_a_damaged_compressed_or_parquet_input_is_one_line_naming_it(tmp_path, data_env, capsys, name, content,
                                                                    message, command):
    damaged = tmp_path / name
    damaged.write_bytes(content)
    if command == "preprocess":
        code = _preprocess_cli([damaged], data_env["spm"], tmp_path / "out")
    else:
        code = cli.main(["tokenizer", "train", "--input", str(damaged), "--output", str(tmp_path / "spm"),
                         "--vocab-size", "100"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {damaged}") and message in err and len(err.splitlines()) == 1, err
