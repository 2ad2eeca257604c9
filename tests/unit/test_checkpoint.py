"""Which checkpoint a run resumes from (pipeline/run/checkpointer.py): the newest tag whose files match the list
its meta file records; damaged ones are named and skipped; a model config or mode that differs is refused."""
import json
import os

import pytest

from pipeline.errors import CheckpointError
from pipeline.run import checkpointer as checkpoint
from pipeline.train import resume

META = {"model_config": {"hidden_size": 64, "attention_impl": "auto"}, "mode": "zero3", "dp_size": 2}


def make_tag(ckpt_dir, step, files=None):
    tag_dir = ckpt_dir / f"global_step{step}"
    tag_dir.mkdir(parents=True)
    for name, data in (files or {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"x" * 3000,
                                 "rng_rank0.pt": b"r0", "rng_rank1.pt": b"r1"}).items():
        (tag_dir / name).write_bytes(data)
    (tag_dir / checkpoint.META).write_text(json.dumps(dict(META, step=step, files=checkpoint.file_manifest(str(tag_dir)))))
    return tag_dir


def test_the_newest_complete_tag_wins_and_unfinished_ones_do_not_count(tmp_path):
    make_tag(tmp_path, 2)
    make_tag(tmp_path, 4)
    (tmp_path / "global_step6").mkdir()        # being written when the run died: no meta file
    tag, meta, damaged = checkpoint.newest_complete(str(tmp_path))
    assert (tag, meta["step"], damaged) == ("global_step4", 4, [])
    files = meta["files"]
    assert files["rng_rank0.pt"]["bytes"] == 2 and "sha256" in files["rng_rank0.pt"]


@pytest.mark.parametrize("harm, problem", [
    (lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100), "100 bytes, 3000 when saved"),
    (lambda d: os.remove(d / "rng_rank1.pt"), "rng_rank1.pt: missing"),
    (lambda d: (d / "rng_rank0.pt").write_bytes(b"zz"), "rng_rank0.pt: its contents changed"),
    (lambda d: (d / checkpoint.META).write_text("{"), "deberta_ds.json: cannot read"),
])
def test_a_damaged_newest_tag_is_named_and_the_one_before_it_used(tmp_path, harm, problem):
    make_tag(tmp_path, 2)
    harm(make_tag(tmp_path, 4))
    tag, _, damaged = checkpoint.newest_complete(str(tmp_path))
    assert tag == "global_step2"
    assert [name for name, _ in damaged] == ["global_step4"] and problem in damaged[0][1]
    assert checkpoint.newest_complete(str(tmp_path))[0] == "global_step2"


def identity(mode="zero3", objective="mlm", **config):
    return {"model_config": dict({"hidden_size": 64}, **config), "mode": mode, "objective": objective,
            "generator_config": None, "embedding_sharing": None}


def test_a_checkpoint_of_another_model_mode_or_objective_is_refused():
    resume.check_compatible(META, identity(attention_impl="sdpa"), "tag")   # META: a build before objectives
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64 vs run 32"):
        resume.check_compatible(META, identity(hidden_size=32), "tag")
    with pytest.raises(CheckpointError, match="written in mode 'zero3', this run is 'pipeline'"):
        resume.check_compatible(META, identity("pipeline"), "tag")
    with pytest.raises(CheckpointError, match="written with objective 'mlm', this run has 'rtd'"):
        resume.check_compatible(META, dict(identity(), objective="rtd", embedding_sharing="gdes"), "tag")


def test_a_write_that_fails_names_the_file_and_the_os_error(tmp_path):
    from pipeline.errors import OutputError
    with pytest.raises(OutputError, match=r"nowhere/x.pt: No such file or directory"):
        checkpoint.save_file({"a": 1}, str(tmp_path / "nowhere" / "x.pt"))
