"""Objective rtd (DeBERTa-v3) for real, joint training (rtd_training=joint: one engine; decoupled training, the
default, is tests/integration/test_rtd_decoupled.py): 2 gloo ranks under ZeRO-3 against one process, an exact
resume after SIGKILL, a resume on another number of ranks, the v3 release against transformers, fine-tuning
from it, and a release -> training -> release round trip."""
import json
import os
import shutil

import pytest
import torch
import transformers

from pipeline.release import load_release
from pipeline.release.read import read_state_dict
from tests.helpers.launch import NO_DROPOUT, cli, explain, losses, pretrain, single_rank
from tests.helpers.pretrain import eval_sets
from tests.helpers.v3 import assert_release_round_trip
from tests.helpers.superglue import write_cb_like

RTD = ["objective=rtd", "rtd_training=joint"]
SHORT = RTD + NO_DROPOUT + ["max_steps=4", "save_interval=2"]


@pytest.fixture(scope="module")
def two_ranks(tiny_shards, valid_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtd") / "run"
    result = pretrain(tiny_shards, out, sets=SHORT + eval_sets(valid_shards))
    assert result.returncode == 0, explain(result)
    (out / "stderr.txt").write_text(result.stderr)
    return out


def records(run, key):
    return {r["step"]: r for r in map(json.loads, open(run / "metrics.jsonl")) if key in r}


def test_two_ranks_equal_one_process_and_every_number_is_logged(two_ranks, tiny_shards, valid_shards, tmp_path):
    one = pretrain(tiny_shards, tmp_path, nproc=1, sets=SHORT + eval_sets(valid_shards))
    assert one.returncode == 0, explain(one)
    for step in range(1, 5):
        assert abs(losses(two_ranks)[step] - losses(tmp_path)[step]) <= 1e-5, step
    assert "rtd: generator 1 layers, gdes" in (two_ranks / "stderr.txt").read_text()
    logged = records(two_ranks, "rtd_loss")[4]
    for key in ("mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_accuracy", "replaced_rate", "generator_correct"):
        assert 0 <= logged[key] < 20, key
    assert logged["loss"] == pytest.approx(logged["mlm_loss"] + 10 * logged["rtd_loss"], rel=1e-5)
    assert 0 < logged["replaced_rate"] < 0.2            # at most the 15% masked, less what the generator got right
    held_out = records(two_ranks, "val_rtd_loss")
    assert sorted(held_out) == [2, 4] and held_out[4]["val_mlm_loss"] > 0
    assert held_out[4]["val_loss"] == pytest.approx(records(tmp_path, "val_loss")[4]["val_loss"], abs=1e-5)
    events = [n for n in os.listdir(two_ranks / "tensorboard")]
    assert events


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_exact(tiny_shards, tmp_path):
    """With dropout on and the generator's sampling from the saved random state."""
    sets = RTD + ["max_steps=6", "save_interval=3"]
    whole = pretrain(tiny_shards, tmp_path / "whole", sets=sets)
    assert whole.returncode == 0, explain(whole)
    killed = pretrain(tiny_shards, tmp_path / "cut", sets=sets, extra_env={"DEBERTA_DS_FAULT": "kill:4"})
    assert killed.returncode != 0
    resumed = pretrain(tiny_shards, tmp_path / "cut", sets=sets)
    assert resumed.returncode == 0 and "resumed from global_step3 at step 3" in resumed.stderr, explain(resumed)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_a_resume_on_another_number_of_ranks_continues_the_run(two_ranks, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run, ignore=shutil.ignore_patterns("stderr.txt"))
    shutil.rmtree(run / "checkpoints" / "global_step4")
    result = pretrain(tiny_shards, run, nproc=1, sets=SHORT)
    assert result.returncode == 0, explain(result)
    assert "resumed from global_step2_universal at step 2" in result.stderr
    for step in (3, 4):
        assert abs(losses(run)[step] - losses(two_ranks)[step]) <= 1e-5


@pytest.fixture(scope="module")
def v3_release(two_ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("v3") / "release"
    result = cli("convert", "to-release", "--checkpoint", str(two_ranks / "checkpoints"), "--output", str(out), "--verify")
    assert result.returncode == 0, explain(result)
    assert "discriminator hidden states" in result.stderr
    return out


def test_the_release_is_the_published_v3_layout_and_transformers_loads_the_discriminator(v3_release):
    names = set(os.listdir(v3_release))
    assert {"config.json", "model.safetensors", "pytorch_model.generator.bin", "generator_config.json", "spm.model"} <= names
    state = read_state_dict(str(v3_release))
    assert any(k.startswith("mask_predictions.") for k in state)
    assert not any(k.startswith(("generator.", "discriminator.")) for k in state)
    generator = torch.load(v3_release / "pytorch_model.generator.bin")
    assert "lm_predictions.lm_head.bias" in generator and "deberta.embeddings.position_embeddings.weight" in generator
    theirs, info = transformers.AutoModel.from_pretrained(str(v3_release), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ours = load_release(str(v3_release), task="base")
    ids = torch.randint(4, 1000, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        a = theirs.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


def test_the_released_discriminator_computes_what_the_trained_one_did(two_ranks, v3_release):
    """The checkpoint read by DeepSpeed's own zero_to_fp32 into the training module (generator + discriminator,
    the delta still apart) against the release in transformers: the merged table and every other tensor carry
    the discriminator over, not only a layout transformers accepts."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.rtd import RTDModel
    from pipeline.train.config import RunConfig
    run = RunConfig.from_file("tiny_cpu", RTD + NO_DROPOUT)
    trained = RTDModel(run.model_config(), run.generator_config(), run.embedding_sharing, emd=run.emd).eval()
    trained.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(two_ranks / "checkpoints")))
    released = transformers.AutoModel.from_pretrained(str(v3_release)).eval()
    ids = torch.randint(4, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        a = trained.discriminator.deberta(ids, mask, added_embeds=trained.shared_rows(ids)).last_hidden_state
        b = released(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


def test_finetuning_starts_from_the_v3_release(v3_release, tmp_path):
    write_cb_like(str(tmp_path / "data" / "CB" / "train.jsonl"), 16, seed=1)
    write_cb_like(str(tmp_path / "data" / "CB" / "val.jsonl"), 8, seed=2)
    result = cli("finetune", "--task", "CB", "--release", str(v3_release), "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8", "--max-seq-len", "32",
                 extra_env=single_rank())
    assert result.returncode == 0, explain(result)
    assert "new task head, initialised randomly: pooler.dense.weight" in result.stderr


def test_release_to_training_to_release_is_exact(v3_release, tiny_shards, tmp_path):
    """init_from_release starts an RTD run from the v3 directory (the discriminator's merged table split back into
    the generator's and a delta); with lr 0 the next release equals the one that went in."""
    assert_release_round_trip(v3_release, tiny_shards, tmp_path, RTD)


def test_a_published_v3_directory_continues_an_rtd_run(tiny_shards, tmp_path):
    """`--set init_from_release=DIR` on a directory in the published deberta-v3 layout (pytorch_model.bin with
    the RTD head's `mask_predictions.classifier.*`, an MLM head and the position table beside it, the generator's
    pytorch_model.generator.bin, no generator_config.json): the run starts from its weights. With lr 0 the
    release written after one step holds the published discriminator and generator unchanged."""
    from model.rtd import RTDModel
    from pipeline.train.config import RunConfig
    from tests.helpers.v3 import write_published_v3
    run = RunConfig.from_file("tiny_cpu", RTD + NO_DROPOUT)
    torch.manual_seed(11)
    published = RTDModel(run.model_config(), run.generator_config(), run.embedding_sharing, emd=run.emd)
    with torch.no_grad():  # a delta that is not zero: the merged table differs from the generator's
        published.discriminator.deberta.embeddings.word_embeddings.weight.normal_(0, 0.01)
    discriminator, generator = write_published_v3(published, str(tmp_path / "v3"), tiny_shards.parent / "spm.model")
    sets = RTD + NO_DROPOUT + ["max_steps=1", "save_interval=1", "lr=0",
                               f"init_from_release={json.dumps(str(tmp_path / 'v3'))}"]
    result = pretrain(tiny_shards, tmp_path / "run", nproc=1, sets=sets)
    assert result.returncode == 0, explain(result)
    assert "old spelling" not in result.stderr
    again = cli("convert", "to-release", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output",
                str(tmp_path / "again"))
    assert again.returncode == 0, explain(again)
    released = read_state_dict(str(tmp_path / "again"))
    assert {k for k in discriminator if k.startswith(("deberta.encoder.", "mask_predictions."))} <= released.keys()
    for key, value in released.items():  # the merged table is split and merged again: rounding only
        assert torch.allclose(value, discriminator[key], atol=1e-6, rtol=0), key
    assert torch.equal(released["mask_predictions.classifier.weight"], discriminator["mask_predictions.classifier.weight"])
    regenerated = torch.load(tmp_path / "again" / "pytorch_model.generator.bin")
    assert all(torch.equal(regenerated[k], generator[k]) for k in regenerated)


def test_rtd_in_pipeline_mode_is_refused_before_anything_starts(tiny_shards, tmp_path):
    result = pretrain(tiny_shards, tmp_path, nproc=1, sets=RTD + ["mode=pipeline"])
    assert result.returncode != 0 and "objective 'rtd' runs in mode 'zero3' only" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
