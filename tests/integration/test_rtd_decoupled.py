"""Objective rtd with decoupled training (the default: the generator and the discriminator each under their own
engine) for real: 2 gloo ranks under ZeRO-3 against one process, an exact resume after SIGKILL, a resume on
another number of ranks (each engine through the universal format), a checkpoint of the other training kind
refused, and the v3 release converted from the two engines' checkpoint."""
import json
import os
import shutil

import pytest
import torch
import transformers

from pipeline.release.read import read_state_dict
from tests.helpers.launch import NO_DROPOUT, cli, explain, losses, pretrain
from tests.helpers.pretrain import eval_sets
from tests.helpers.v3 import assert_release_round_trip

RTD = ["objective=rtd"]  # rtd_training: decoupled by default
SHORT = RTD + NO_DROPOUT + ["max_steps=4", "save_interval=2"]


@pytest.fixture(scope="module")
def two_ranks(tiny_shards, valid_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtd_decoupled") / "run"
    result = pretrain(tiny_shards, out, sets=SHORT + eval_sets(valid_shards))
    assert result.returncode == 0, explain(result)
    (out / "stderr.txt").write_text(result.stderr)
    return out


def records(run, key):
    return {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl")) if key in r}


def test_two_ranks_equal_one_process_and_both_engines_are_logged(two_ranks, tiny_shards, valid_shards, tmp_path):
    one = pretrain(tiny_shards, tmp_path, nproc=1, sets=SHORT + eval_sets(valid_shards))
    assert one.returncode == 0, explain(one)
    for step in range(1, 5):
        assert abs(losses(two_ranks)[step] - losses(tmp_path)[step]) <= 1e-5, step
    assert "rtd decoupled: generator 1 layers, gdes, two engines" in (two_ranks / "stderr.txt").read_text()
    logged = records(two_ranks, "rtd_loss")[4]
    assert logged["loss"] == pytest.approx(logged["mlm_loss"] + 10 * logged["rtd_loss"], rel=1e-5)
    assert logged["discriminator_lr"] == pytest.approx(logged["lr"]) and logged["discriminator_grad_norm"] > 0
    assert logged["grad_norm"] != pytest.approx(logged["discriminator_grad_norm"])  # each engine its own norm
    held_out = records(two_ranks, "val_rtd_loss")
    assert sorted(held_out) == [2, 4]
    assert held_out[4]["val_loss"] == pytest.approx(records(tmp_path, "val_loss")[4]["val_loss"], abs=1e-5)
    tag = two_ranks / "checkpoints" / "global_step4"
    assert {"generator", "discriminator"} <= set(os.listdir(tag))


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_exact(tiny_shards, tmp_path):
    """With dropout on and the generator's sampling from the saved random state; both engines restored."""
    sets = RTD + ["max_steps=6", "save_interval=3"]
    whole = pretrain(tiny_shards, tmp_path / "whole", sets=sets)
    assert whole.returncode == 0, explain(whole)
    killed = pretrain(tiny_shards, tmp_path / "cut", sets=sets, extra_env={"DEBERTA_DS_FAULT": "kill:4"})
    assert killed.returncode != 0
    resumed = pretrain(tiny_shards, tmp_path / "cut", sets=sets)
    assert resumed.returncode == 0 and "resumed from global_step3 at step 3" in resumed.stderr, explain(resumed)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
    a, b = records(tmp_path / "whole", "rtd_loss")[6], records(tmp_path / "cut", "rtd_loss")[6]
    assert (a["rtd_loss"], a["discriminator_grad_norm"]) == (b["rtd_loss"], b["discriminator_grad_norm"])


def test_a_resume_on_another_number_of_ranks_continues_the_run(two_ranks, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run, ignore=shutil.ignore_patterns("stderr.txt"))
    shutil.rmtree(run / "checkpoints" / "global_step4")
    result = pretrain(tiny_shards, run, nproc=1, sets=SHORT)
    assert result.returncode == 0, explain(result)
    assert "resumed from global_step2_universal at step 2" in result.stderr
    assert {"generator", "discriminator"} <= set(os.listdir(run / "checkpoints" / "global_step2_universal"))
    for step in (3, 4):
        assert abs(losses(run)[step] - losses(two_ranks)[step]) <= 1e-5


def test_a_checkpoint_of_the_other_training_kind_is_refused(two_ranks, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run, ignore=shutil.ignore_patterns("stderr.txt"))
    result = pretrain(tiny_shards, run, nproc=1, sets=SHORT + ["rtd_training=joint", "max_steps=6"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line and "rtd_training" in line]
    assert errors and "written with rtd_training 'decoupled', this run has 'joint'" in errors[0], explain(result)
    assert "--set rtd_training=decoupled" in errors[0]
    assert "Traceback" not in "\n".join(line for line in result.stderr.splitlines() if "/pipeline/" in line)
    assert sorted(os.listdir(run / "checkpoints")) == ["global_step2", "global_step4"]


@pytest.fixture(scope="module")
def v3_release(two_ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("v3_decoupled") / "release"
    result = cli("convert", "to-release", "--checkpoint", str(two_ranks / "checkpoints"), "--output", str(out), "--verify")
    assert result.returncode == 0, explain(result)
    return out


def test_the_release_of_two_engines_is_the_v3_layout_and_computes_what_the_trained_discriminator_did(
        two_ranks, v3_release):
    """Each engine's checkpoint read by DeepSpeed's own zero_to_fp32 into the training module (generator +
    discriminator, the delta still apart) against the release in transformers."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.rtd import RTDModel
    from pipeline.train.config import RunConfig
    names = set(os.listdir(v3_release))
    assert {"config.json", "model.safetensors", "pytorch_model.generator.bin", "generator_config.json"} <= names
    state = read_state_dict(str(v3_release))
    assert any(k.startswith("mask_predictions.") for k in state)
    assert not any(k.startswith(("generator.", "discriminator.")) for k in state)
    run = RunConfig.from_file("tiny_cpu", RTD + NO_DROPOUT)
    trained = RTDModel(run.model_config(), run.generator_config(), run.embedding_sharing, emd=run.emd).eval()
    tag = str(two_ranks / "checkpoints" / "global_step4")
    for name in ("generator", "discriminator"):
        getattr(trained, name).load_state_dict(get_fp32_state_dict_from_zero_checkpoint(tag, tag=name))
    generator = torch.load(v3_release / "pytorch_model.generator.bin")
    assert generator.keys() == trained.generator.state_dict().keys()
    assert all(torch.equal(generator[k], v) for k, v in trained.generator.state_dict().items())
    released = transformers.AutoModel.from_pretrained(str(v3_release)).eval()
    ids = torch.randint(4, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        a = trained.discriminator.deberta(ids, mask, added_embeds=trained.shared_rows(ids)).last_hidden_state
        b = released(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


def test_release_to_decoupled_training_to_release_is_exact(v3_release, tiny_shards, tmp_path):
    """init_from_release starts both engines from the v3 directory; with lr 0 (and so discriminator_lr 0) the next
    release, read from the two engines' checkpoint, equals the one that went in."""
    assert_release_round_trip(v3_release, tiny_shards, tmp_path, RTD)
