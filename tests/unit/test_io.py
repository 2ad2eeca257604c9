"""pipeline/io.py: an output is complete or absent, and an error says whose file it is (the output's, or an
input's read inside the block)."""
import os

import pytest

from pipeline.errors import OutputError
from pipeline.io import atomic_copy, atomic_write, staged_directory


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
