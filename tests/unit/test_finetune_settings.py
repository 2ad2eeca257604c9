"""Fine-tuning's settings and helpers, in process: the typed settings and their order of precedence, SiFT's
auto mode, the micro-batches every rank walks, the parameter groups, and the start from an MNLI model."""
import argparse

import pytest
import torch

from model import DebertaForSequenceClassification, preset
from pipeline.errors import ConfigError
from pipeline.finetune import finetune
from pipeline.finetune import tasks as sg
from pipeline.finetune.batches import epoch_micro_batches
from pipeline.finetune.config import FinetuneConfig, SiFTSettings, load_preset
from pipeline.finetune.start import build_model, resolve_sift
from pipeline.run.optim import param_groups, warmup_linear_decay
from pipeline.release import save_release


# ---------------------------------------------------------------- helpers
def namespace(**values):
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    argv = ["--task", values.pop("task", "CB"), "--release", "R", "--output-dir", "O"]
    for key, value in values.items():
        if key == "set":
            for item in value:
                argv += ["--set", item]
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_settings_come_from_the_preset_then_set_then_named_options():
    run = finetune.run_of(namespace(set=["lr=1e-5", "sift.vat_lambda=3", "epochs=2"], epochs=7))
    settings = run.settings
    assert (run.task, run.release, run.output_dir) == ("CB", "R", "O")  # the run carries its paths too
    preset_values = load_preset("CB")
    assert settings.lr == 1e-5 and settings.epochs == 7                # --set, then the named option wins
    assert settings.sift.vat_lambda == 3 and settings.sift.vat_learning_rate == 1e-4
    assert settings.batch_size == preset_values["batch_size"] and settings.warmup_steps == 50
    with pytest.raises(ConfigError, match="predicted by the RTE model"):
        finetune.run_of(namespace(task="AX-b"))


def settings_with_sift(enabled, mode):
    return FinetuneConfig(lr=1e-5, batch_size=8, epochs=1, warmup_steps=0, cls_drop_out=0.0, max_seq_len=64,
                          sift=SiFTSettings(enabled=enabled, mode=mode))


def test_sift_auto_follows_the_preset_only_for_the_1p5b_model():
    assert resolve_sift(settings_with_sift(True, "auto"), preset("xxlarge")).enabled
    assert not resolve_sift(settings_with_sift(True, "auto"), preset("tiny")).enabled
    assert resolve_sift(settings_with_sift(False, "on"), preset("tiny")).enabled
    assert not resolve_sift(settings_with_sift(True, "off"), preset("xxlarge")).enabled


def test_one_schedule_for_both_trainers_peaks_at_the_last_warmup_update_and_never_wastes_one():
    factor = warmup_linear_decay(warmup_steps=4, total_steps=12)
    values = [factor(step) for step in range(13)]    # step: optimizer steps taken before this update
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])   # update 4 = the last warmup one: the peak
    assert values[4] == 1.0 and values[8] == pytest.approx(0.5)
    assert values[11] == pytest.approx(1 / 8) and values[12] == 0.0  # the last (12th) update still moves
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert warmup_linear_decay(0, 4)(0) == 1.0


def test_every_rank_gets_the_same_number_of_micro_batches_covering_the_data():
    settings = FinetuneConfig(lr=1e-5, batch_size=8, micro_batch_size=2, seed=3, epochs=1, warmup_steps=0,
                              cls_drop_out=0.0, max_seq_len=64)
    lengths = [5 + (7 * i) % 13 for i in range(21)]
    per_rank = [epoch_micro_batches(lengths, settings, epoch=1, rank=r, world_size=2)[:2] for r in range(2)]
    assert per_rank[0][1] == 3 and len(per_rank[0][0]) == len(per_rank[1][0]) == 6
    seen = [i for batches, _ in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(21)) and len(seen) == 24     # padded to whole global batches
    other_epoch = epoch_micro_batches(lengths, settings, epoch=2, rank=0, world_size=2)[0]
    assert other_epoch != per_rank[0][0]


def test_weight_decay_skips_biases_and_layernorm():
    model = DebertaForSequenceClassification(preset("tiny", vocab_size=100), num_labels=2)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_init_from_mnli_copies_encoder_and_the_named_classifier_rows(tmp_path, spm_path):  # noqa: F811
    torch.manual_seed(0)
    mnli = DebertaForSequenceClassification(preset("tiny", vocab_size=640), num_labels=3)
    save_release(mnli, str(tmp_path / "mnli"), spm_path=spm_path)
    args = argparse.Namespace(release=None, init_from_mnli=str(tmp_path / "mnli"))
    rte = build_model(args, sg.get_task("RTE"))
    assert torch.equal(rte.classifier.weight, mnli.classifier.weight[[1, 2]])   # neutral, entailment
    assert torch.equal(rte.deberta.embeddings.word_embeddings.weight, mnli.deberta.embeddings.word_embeddings.weight)
    assert torch.equal(rte.pooler.dense.weight, mnli.pooler.dense.weight)
    copa = build_model(args, sg.get_task("COPA"))
    assert copa.classifier.weight.shape == (1, 64) and torch.equal(copa.classifier.bias, mnli.classifier.bias[[2]])
    with pytest.raises(ConfigError, match="does not start from MNLI"):
        build_model(args, sg.get_task("BoolQ"))
