"""`deberta-ds finetune` / `deberta-ds predict` end to end on a tiny random model and a learnable synthetic
CB-like task (the label is given by a keyword in the hypothesis), under single-process DeepSpeed with
SiFT on; plus the settings, schedule, batching and MNLI-initialisation helpers, and bad input.

DeepSpeed runs in a subprocess (`python -m pipeline.cli finetune ...`) so that its process group does
not leak into pytest; with OMP_NUM_THREADS=1, because two threads on a shared 2-core machine made the
tiny run about 20 times slower."""
import argparse
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from data_fixtures import data_env, spm_path  # noqa: F401 (fixtures)
from model import DebertaForMaskedLM, DebertaForSequenceClassification, load_release, preset, save_release
from pipeline import finetune
from pipeline import superglue as sg
from pipeline.launch import free_port
from pipeline.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "superglue")
KEYWORDS = {"entailment": "certainly", "contradiction": "never", "neutral": "perhaps"}
FILLER = ("the function returns a list of values from the file and the object is used by the module "
          "when a string or number is given to the method of this class").split()


def write_cb_like(path, count, seed, labelled=True):
    """Official CB jsonl lines; the hypothesis holds exactly one keyword, which decides the label."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for idx in range(count):
            label = rng.choice(sorted(KEYWORDS))
            premise = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 10)))
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
            words.insert(rng.randint(0, len(words)), KEYWORDS[label])
            record = {"premise": premise, "hypothesis": " ".join(words), "idx": idx}
            if labelled:
                record["label"] = label
            out.write(json.dumps(record) + "\n")


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, spm_path):  # noqa: F811
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("release") / "tiny")
    save_release(DebertaForMaskedLM(preset("tiny", vocab_size=640)), path, spm_path=spm_path)
    return path


@pytest.fixture(scope="module")
def cb_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("superglue"))
    write_cb_like(os.path.join(root, "CB", "train.jsonl"), 64, seed=1)
    write_cb_like(os.path.join(root, "CB", "val.jsonl"), 32, seed=2)
    write_cb_like(os.path.join(root, "CB", "test.jsonl"), 12, seed=3, labelled=False)
    return root


TRAIN_OPTIONS = ["--deepspeed", "ds_configs/finetune_cpu.json", "--lr", "3e-3", "--batch-size", "8",
                 "--epochs", "4", "--warmup-steps", "2", "--cls-drop-out", "0", "--max-seq-len", "32"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_release, cb_data):
    out = str(tmp_path_factory.mktemp("finetune"))
    result = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", cb_data, "--output-dir", out,
                 *TRAIN_OPTIONS, "--sift", "on", "--sift-lambda", "1.0")
    return out, result


# ---------------------------------------------------------------- end to end
def test_finetune_with_sift_learns_the_task_and_keeps_the_best(finetuned):
    out, result = finetuned
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["settings"]["sift"]["enabled"] and metrics["settings"]["sift"]["vat_lambda"] == 1.0
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    assert all(e["adv_loss"] is not None and e["adv_loss"] >= 0 for e in metrics["epochs"])
    best = max(metrics["epochs"], key=lambda e: e["val"]["score"])
    assert metrics["best"]["epoch"] == best["epoch"]
    assert metrics["best"]["val"]["accuracy"] >= 0.9, metrics["epochs"]
    assert "| epoch | step | train_loss" in result.stdout and "best: epoch" in result.stdout
    assert not [n for n in os.listdir(out) if n.startswith(".")]        # no temporary leftovers


def test_best_release_loads_in_transformers_with_the_same_logits(finetuned, cb_data, spm_path):  # noqa: F811
    import transformers

    best = os.path.join(finetuned[0], "best")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(best).eval()
    ours = load_release(best, task="classification", num_labels=3)
    assert hf.config.num_labels == 3 and hf.config.cls_dropout == 0.0
    task = sg.get_task("CB")
    examples = task.load("val", cb_data)
    batch = sg.collate(task.build_features(examples, Tokenizer(spm_path), 32)[:8])
    with torch.no_grad():
        hf_logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        our_logits = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(hf_logits, our_logits, atol=1e-5)


def test_predict_writes_the_submission_with_official_labels(finetuned, cb_data, tmp_path):
    best = os.path.join(finetuned[0], "best")
    result = cli("predict", "--task", "CB", "--model", best, "--data-dir", cb_data, "--output-dir", str(tmp_path),
                 "--max-seq-len", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(tmp_path / "CB.jsonl")]
    assert [line["idx"] for line in lines] == list(range(12))
    assert {line["label"] for line in lines} <= set(sg.MNLI_LABELS)
    # the same model's val predictions score like the training run's evaluation, in their own folder
    result = cli("predict", "--task", "CB", "--model", best, "--data-dir", cb_data, "--output-dir", str(tmp_path),
                 "--max-seq-len", "32", "--split", "val")
    assert result.returncode == 0 and (tmp_path / "val" / "CB.jsonl").exists()
    scores = json.loads(result.stdout.split("scores: ")[1])
    assert scores["accuracy"] >= 0.9


# ---------------------------------------------------------------- bad input: one line, exit code 1
def one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_unknown_label_is_a_one_line_error(tiny_release, cb_data, tmp_path):
    bad = tmp_path / "data"
    os.makedirs(bad / "CB")
    for split in ("train", "val"):
        lines = open(os.path.join(cb_data, "CB", f"{split}.jsonl")).read().splitlines()
        if split == "train":
            lines[2] = lines[2].replace('"label": "neutral"', '"label": "maybe"').replace(
                '"label": "entailment"', '"label": "maybe"').replace('"label": "contradiction"', '"label": "maybe"')
        (bad / "CB" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", str(bad),
                 "--output-dir", str(tmp_path / "out"), *TRAIN_OPTIONS)
    one_line_error(result, "train.jsonl:3", "'maybe'")


def test_missing_split_is_a_one_line_error(tiny_release, tmp_path):
    write_cb_like(str(tmp_path / "CB" / "train.jsonl"), 4, seed=1)
    result = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out"), *TRAIN_OPTIONS)
    one_line_error(result, "val split not found")


def test_head_with_another_number_of_labels_is_a_one_line_error(finetuned, tmp_path):
    best = os.path.join(finetuned[0], "best")          # a 3-label CB model
    result = cli("predict", "--task", "AX-b", "--model", best, "--data-dir", FIXTURES, "--output-dir", str(tmp_path))
    one_line_error(result, "classifier.weight", "(3, 64)", "(2, 64)")
    result = cli("finetune", "--task", "RTE", "--release", best, "--data-dir", FIXTURES,
                 "--output-dir", str(tmp_path / "out"), *TRAIN_OPTIONS)
    one_line_error(result, "classifier.weight", "(3, 64)", "(2, 64)")


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
    settings = finetune.resolve_settings(namespace(set=["lr=1e-5", "sift.vat_lambda=3", "epochs=2"], epochs=7), sg.get_task("CB"))
    preset_values = sg.load_preset("CB")
    assert settings["lr"] == 1e-5 and settings["epochs"] == 7                # --set, then the named option wins
    assert settings["sift"]["vat_lambda"] == 3 and settings["sift"]["vat_learning_rate"] == 1e-4
    assert settings["batch_size"] == preset_values["batch_size"] and settings["warmup_steps"] == 50
    with pytest.raises(finetune.UsageError, match="predicted by the RTE model"):
        finetune.resolve_settings(namespace(task="AX-b"), sg.get_task("AX-b"))


def test_sift_auto_follows_the_preset_only_for_the_1p5b_model():
    settings = {"sift": {"enabled": True}}
    assert finetune.resolve_sift("auto", dict(settings, sift={"enabled": True}), preset("xxlarge"))["enabled"]
    assert not finetune.resolve_sift("auto", dict(settings, sift={"enabled": True}), preset("tiny"))["enabled"]
    assert finetune.resolve_sift("on", {"sift": {"enabled": False}}, preset("tiny"))["enabled"]
    assert not finetune.resolve_sift("off", {"sift": {"enabled": True}}, preset("xxlarge"))["enabled"]


def test_linear_warmup_then_linear_decay():
    factor = finetune.linear_schedule(warmup_steps=4, total_steps=12)
    values = [factor(step) for step in range(13)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and values[4] == 1.0
    assert values[8] == pytest.approx(0.5) and values[12] == 0.0
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_every_rank_gets_the_same_number_of_micro_batches_covering_the_data():
    settings = {"batch_size": 8, "micro_batch_size": 2, "seed": 3}
    per_rank = [finetune.epoch_micro_batches(21, settings, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert per_rank[0][1] == 3 and len(per_rank[0][0]) == len(per_rank[1][0]) == 6
    seen = [i for batches, _ in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(21)) and len(seen) == 24     # padded to whole global batches
    other_epoch = finetune.epoch_micro_batches(21, settings, epoch=2, rank=0, world_size=2)[0]
    assert other_epoch != per_rank[0][0]


def test_weight_decay_skips_biases_and_layernorm():
    model = DebertaForSequenceClassification(preset("tiny", vocab_size=100), num_labels=2)
    decay, no_decay = finetune.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_init_from_mnli_copies_encoder_and_the_named_classifier_rows(tmp_path, spm_path):  # noqa: F811
    torch.manual_seed(0)
    mnli = DebertaForSequenceClassification(preset("tiny", vocab_size=640), num_labels=3)
    save_release(mnli, str(tmp_path / "mnli"), spm_path=spm_path)
    args = argparse.Namespace(release=None, init_from_mnli=str(tmp_path / "mnli"))
    rte = finetune.build_model(args, sg.get_task("RTE"))
    assert torch.equal(rte.classifier.weight, mnli.classifier.weight[[1, 2]])   # neutral, entailment
    assert torch.equal(rte.deberta.embeddings.word_embeddings.weight, mnli.deberta.embeddings.word_embeddings.weight)
    assert torch.equal(rte.pooler.dense.weight, mnli.pooler.dense.weight)
    copa = finetune.build_model(args, sg.get_task("COPA"))
    assert copa.classifier.weight.shape == (1, 64) and torch.equal(copa.classifier.bias, mnli.classifier.bias[[2]])
    with pytest.raises(finetune.UsageError, match="does not start from MNLI"):
        finetune.build_model(args, sg.get_task("BoolQ"))
