"""`deberta-ds preprocess` as a user runs it (a subprocess): a disk that fills while it writes, and a rerun into a
finished shard directory with other settings, each end as one line and exit 1 with nothing half-written left."""
import hashlib
import os
import subprocess
import sys

from tests.helpers.launch import FILE_LIMIT, ROOT, cli, explain, run_env


def preprocess_args(data_env, out, tokenizer=None):
    return ["preprocess", "--input", *data_env["corpus_files"][:2], "--tokenizer", str(tokenizer or data_env["spm"]),
            "--output-dir", str(out), "--max-seq-len", "64", "--no-progress"]


def test_a_disk_that_fills_while_shards_are_written_is_one_line_and_leaves_no_temporary(data_env, tmp_path):
    """Files are limited to 50 kB (RLIMIT_FSIZE, SIGXFSZ ignored: a real write fails with EFBIG, as with ENOSPC on
    a full disk); the first shard's data is larger. Before, two chained OSErrors and a .bin.tmp were left."""
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-c", FILE_LIMIT, "50000", "-m", "pipeline.cli",
                             *preprocess_args(data_env, out)], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, explain(result)
    assert result.stderr == f"error: {out}/task-00000-of-00001-part-000000.bin: cannot write (File too large)\n"
    assert sorted(os.listdir(out)) == ["deberta-ds.output.json", "spm.model"]  # no shard, no temporary
    done = cli(*preprocess_args(data_env, out))
    assert done.returncode == 0, explain(done)  # with room again, the same command finishes the directory


def test_a_rerun_with_another_tokenizer_leaves_the_shards_and_their_tokenizer(data_env, tmp_path):
    out = tmp_path / "shards"
    assert cli(*preprocess_args(data_env, out)).returncode == 0
    before = hashlib.sha256((out / "spm.model").read_bytes()).hexdigest()
    other = tmp_path / "other"
    trained = cli("tokenizer", "train", "--input", data_env["corpus_files"][0], "--output", str(other),
                  "--vocab-size", "300")
    assert trained.returncode == 0, explain(trained)
    refused = cli(*preprocess_args(data_env, out, tokenizer=f"{other}.model"))
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, explain(refused)
    assert refused.stderr.startswith(f"error: {out}: holds the output of a preprocess of other inputs or settings "
                                     "(tokenizer_sha256: recorded")
    assert hashlib.sha256((out / "spm.model").read_bytes()).hexdigest() == before
