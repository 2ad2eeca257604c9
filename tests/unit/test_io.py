"""pipeline/io.py: an output is complete or absent, an error says whose file it is (the output's, or an
input's read inside the block), an output keeps the identity it was first written with, and a killed writer's
temporary directory does not outlive it."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline.errors import OutputError
from pipeline.io import OUTPUT_RECORD, _make_owned_directory, atomic_copy, atomic_write, check_output_identity, \
    staged_directory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_failed_block_leaves_no_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "dir") as staged:
            atomic_write(os.path.join(staged, "a.txt"), "a")
            raise RuntimeError("the work failed")
    atomic_write(target, "done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"] and target.read_text() == "done\n"


def test_an_input_that_cannot_be_read_keeps_its_own_name(tmp_path):
    missing = tmp_path / "no-such-input.model"
    with pytest.raises(FileNotFoundError) as error:
        atomic_copy(missing, tmp_path / "copy.model")
    assert error.value.filename == str(missing) and not isinstance(error.value, OutputError)
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_cannot_be_written_is_an_output_error_naming_it(tmp_path):
    with pytest.raises(OutputError, match="/proc/deberta-ds-test: cannot create the directory"):
        atomic_write("/proc/deberta-ds-test/out.json", "x")
    with pytest.raises(OutputError, match=f"{tmp_path / 'dir'}: cannot write"):
        with staged_directory(tmp_path / "dir") as staged:
            os.rmdir(staged)
            open(os.path.join(staged, "a.txt"), "w").close()


# ---------------------------------------------------------------- one output, one identity
def test_an_output_keeps_the_identity_it_was_first_written_with(tmp_path):
    identity = {"tokenizer_sha256": "a" * 64, "max_seq_len": 128, "input_files": ["/d/a.txt", "/d/b.txt"]}
    assert check_output_identity(tmp_path, "preprocess", identity, "use another directory") is True
    record = json.loads((tmp_path / OUTPUT_RECORD).read_text())
    assert record == {"written_by": "preprocess", "identity": identity}
    assert check_output_identity(tmp_path, "preprocess", dict(identity), "use another directory") is False
    other = dict(identity, max_seq_len=512, input_files=["/d/a.txt", "/d/c.txt"])
    with pytest.raises(OutputError) as refused:
        check_output_identity(tmp_path, "preprocess", other, "use another directory")
    assert str(refused.value) == (
        f"{tmp_path}: holds the output of a preprocess of other inputs or settings (max_seq_len: recorded 128, "
        'now 512; input_files: recorded 2 entries, now 2; first difference at entry 1: recorded "/d/b.txt", now '
        '"/d/c.txt"); use another directory')
    assert json.loads((tmp_path / OUTPUT_RECORD).read_text()) == record  # a refusal changes nothing
    with pytest.raises(OutputError, match=r"written by: preprocess, now finetune"):
        check_output_identity(tmp_path, "finetune", identity, "use another directory")
    assert check_output_identity(tmp_path, "preprocess", other, "use another directory", force=True) is True
    assert json.loads((tmp_path / OUTPUT_RECORD).read_text())["identity"] == other
    assert sorted(os.listdir(tmp_path)) == [OUTPUT_RECORD]  # no temporary left


def test_a_damaged_identity_record_is_refused_not_replaced(tmp_path):
    (tmp_path / OUTPUT_RECORD).write_text("{not json")
    with pytest.raises(OutputError, match=f"{tmp_path / OUTPUT_RECORD}: cannot read the record"):
        check_output_identity(tmp_path, "preprocess", {"a": 1}, "use another directory")
    assert (tmp_path / OUTPUT_RECORD).read_text() == "{not json"


# ---------------------------------------------------------------- staged directories
def test_a_staged_directory_never_replaces_one_that_appeared_meanwhile(tmp_path):
    """Two commands writing one new output: the one that finishes second is refused, the first's output stays."""
    target = tmp_path / "release"
    with pytest.raises(OutputError, match=f"{target}: appeared while this output was written .* give --overwrite"):
        with staged_directory(target) as mine:
            atomic_write(os.path.join(mine, "config.json"), "mine")
            target.mkdir()  # the other command renames its complete output into place first
            (target / "config.json").write_text("theirs")
    assert sorted(os.listdir(tmp_path)) == ["release"] and (target / "config.json").read_text() == "theirs"
    with staged_directory(target, replace=True) as mine:  # replacing, when asked, still works
        atomic_write(os.path.join(mine, "config.json"), "mine")
    assert sorted(os.listdir(tmp_path)) == ["release"] and (target / "config.json").read_text() == "mine"
    target.rename(tmp_path / "gone")
    target.mkdir()  # an empty directory is a new output
    with staged_directory(target) as mine:
        atomic_write(os.path.join(mine, "config.json"), "new")
    assert (target / "config.json").read_text() == "new"


KILLED_WHILE_WRITING = """
import os, signal, sys
from pipeline.io import staged_directory
with staged_directory(sys.argv[1]) as tmp:
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(b"x" * 1_000_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_temporary_directory_of_a_killed_writer_is_removed_by_the_next_one(tmp_path, capsys):
    target = tmp_path / "release"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(target)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert killed.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".tmp-release-")
    live = _make_owned_directory(str(target))  # one of a process that still runs (this one) is kept
    with staged_directory(target) as mine:
        atomic_write(os.path.join(mine, "config.json"), "{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["release", os.path.basename(live)])
    assert f"{tmp_path / left[0]}: removed, a temporary output left by a process that ended" in capsys.readouterr().err


def test_the_identity_record_is_written_where_hard_links_are_not_supported(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted", source)

    monkeypatch.setattr(os, "link", no_links)
    assert check_output_identity(tmp_path, "preprocess", {"a": 1}, "use another directory") is True
    assert check_output_identity(tmp_path, "preprocess", {"a": 1}, "use another directory") is False
    with pytest.raises(OutputError, match="a: recorded 1, now 2"):
        check_output_identity(tmp_path, "preprocess", {"a": 2}, "use another directory")
    assert sorted(os.listdir(tmp_path)) == [OUTPUT_RECORD]
