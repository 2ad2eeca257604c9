"""`deberta-ds finetune` / `deberta-ds predict` end to end on a tiny random model and a learnable synthetic
CB-like task (the label is given by a keyword in the hypothesis), under single-process DeepSpeed with
SiFT on; ReCoRD-like queries (the answer is the entity after a keyword) in passage windows; plus the settings, schedule, batching and MNLI-initialisation helpers, and bad input.

DeepSpeed runs in a subprocess (`python -m pipeline.cli finetune ...`) so that its process group does
not leak into pytest; with OMP_NUM_THREADS=1, because two threads on a shared 2-core machine made the
tiny run about 20 times slower."""
import json
import os
import socket

import pytest
import torch

from model import DebertaForMaskedLM, preset
from pipeline.release import load_release, save_release
from pipeline.finetune import tasks as sg
from pipeline.finetune.features import collate
from pipeline.data.tokenizer import Tokenizer
from tests.helpers import launch
from tests.helpers.launch import ROOT, one_line_error, single_rank
from tests.helpers.superglue import write_cb_like, write_record_like

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "superglue")


def cli(*argv, timeout=120):
    """`deberta-ds ARGV` as one rank of DeepSpeed, in a subprocess (module docstring)."""
    return launch.cli(*argv, extra_env=single_rank(), timeout=timeout)


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


def test_finetune_writes_metrics_jsonl_and_tensorboard_like_pretraining(finetuned):
    out, result = finetuned
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    steps = [r["step"] for r in records if set(r) == {"step", "loss"}]
    assert steps == list(range(1, 33))                        # every step's loss: 4 epochs x 8 steps
    evaluations = [r for r in records if "val_score" in r]
    assert [r["epoch"] for r in evaluations] == [1, 2, 3, 4] and [r["step"] for r in evaluations] == [8, 16, 24, 32]
    assert any("lr" in r and "grad_norm" in r for r in records)  # the log interval's line
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tensorboard")))


def test_a_finished_run_is_not_replaced_by_one_of_other_settings(finetuned, tiny_release, cb_data):
    out, _ = finetuned
    before = open(os.path.join(out, "metrics.json"), encoding="utf-8").read()
    options = [o if o != "3e-3" else "1e-3" for o in TRAIN_OPTIONS]   # another learning rate
    other = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", cb_data, "--output-dir", out,
                *options, "--sift", "on", "--sift-lambda", "1.0")
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    errors = [line for line in other.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "holds the output of a fine-tuning run of other inputs or settings" in errors[0], errors
    assert "settings.lr: recorded 0.003, now 0.001" in errors[0]
    assert "--overwrite" in errors[0]
    assert open(os.path.join(out, "metrics.json"), encoding="utf-8").read() == before


def test_a_non_finite_loss_stops_finetuning_with_exit_3_and_no_result(tmp_path, tiny_release, cb_data):
    """A release whose weights hold a NaN (as a diverged run would leave them): the first loss is NaN, and the
    run stops as pretraining does (exit 3), writing no metrics.json and no best release."""
    from safetensors.torch import load_file, save_file
    import shutil
    broken = tmp_path / "nan_release"
    shutil.copytree(tiny_release, broken)
    weights = load_file(str(broken / "model.safetensors"))
    key = next(k for k in weights if k.endswith("attention.output.dense.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = cli("finetune", "--task", "CB", "--release", str(broken), "--data-dir", cb_data, "--output-dir",
                 str(out), *TRAIN_OPTIONS)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite or skipped step(s) in a row at step 1" in result.stderr
    assert not (out / "metrics.json").exists() and not (out / "best").exists()


def test_best_release_loads_in_transformers_with_the_same_logits(finetuned, cb_data, spm_path):  # noqa: F811
    import transformers

    best = os.path.join(finetuned[0], "best")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(best).eval()
    ours = load_release(best, task="classification", num_labels=3)
    assert hf.config.num_labels == 3 and hf.config.cls_dropout == 0.0
    task = sg.get_task("CB")
    examples = task.load("val", cb_data)
    batch = collate(task.build_features(examples, Tokenizer(spm_path), 32)[:8])
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


# ---------------------------------------------------------------- ReCoRD: entity scoring in windows
@pytest.fixture(scope="module")
def record_run(tmp_path_factory, tiny_release):
    data = str(tmp_path_factory.mktemp("record"))
    write_record_like(os.path.join(data, "ReCoRD", "train.jsonl"), 96, seed=1)
    write_record_like(os.path.join(data, "ReCoRD", "val.jsonl"), 32, seed=2)
    write_record_like(os.path.join(data, "ReCoRD", "test.jsonl"), 8, seed=3, labelled=False)
    out = str(tmp_path_factory.mktemp("record_out"))
    result = cli("finetune", "--task", "ReCoRD", "--release", tiny_release, "--data-dir", data, "--output-dir", out,
                 *TRAIN_OPTIONS[:-2], "--max-seq-len", "24", "--epochs", "3", timeout=300)
    return data, out, result


def test_record_learns_from_one_pass_per_window_and_predicts(record_run, tmp_path):
    data, out, result = record_run
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    # passages of up to ~45 tokens with max_seq_len 24: several windows per query, all scored
    assert "96 train / 32 val examples (" in result.stderr and all(0 <= e["padding_fraction"] < 1 for e in metrics["epochs"])
    assert metrics["best"]["val"]["em"] >= 0.6, metrics["epochs"]                  # chance: about 1/4
    best = os.path.join(out, "best")
    config = json.load(open(os.path.join(best, "config.json")))
    assert config["finetuning_task"] == "ReCoRD" and "id2label" not in config
    result = cli("predict", "--task", "ReCoRD", "--model", best, "--data-dir", data, "--output-dir", str(tmp_path),
                 "--max-seq-len", "24", "--split", "val")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.split("scores: ")[1])
    assert scores["em"] == pytest.approx(metrics["best"]["val"]["em"], abs=1e-4)
    result = cli("predict", "--task", "ReCoRD", "--model", best, "--data-dir", data, "--output-dir", str(tmp_path),
                 "--max-seq-len", "24")
    lines = [json.loads(line) for line in open(tmp_path / "ReCoRD.jsonl")]
    assert result.returncode == 0 and [line["idx"] for line in lines] == list(range(8))


def test_record_release_loads_in_transformers_as_the_encoder(record_run, spm_path):  # noqa: F811
    import transformers

    best = os.path.join(record_run[1], "best")
    hf = transformers.AutoModel.from_pretrained(best).eval()
    ours = load_release(best, task="entity_scoring")
    assert set(ours.state_dict()) >= {"proj.weight", "classifier.weight"}
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).last_hidden_state, ours.deberta(ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input: one line, exit code 1
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
    one_line_error(result, "train.jsonl:3", "'maybe'", exit_code=1)


def test_missing_split_is_a_one_line_error(tiny_release, tmp_path):
    write_cb_like(str(tmp_path / "CB" / "train.jsonl"), 4, seed=1)
    result = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out"), *TRAIN_OPTIONS)
    one_line_error(result, "val split not found", exit_code=1)


def test_a_head_for_another_task_is_a_one_line_error(finetuned, tmp_path):
    best = os.path.join(finetuned[0], "best")          # a 3-label CB model
    result = cli("predict", "--task", "AX-b", "--model", best, "--data-dir", FIXTURES, "--output-dir", str(tmp_path))
    one_line_error(result, "fine-tuned for CB, not RTE (the model that predicts AX-b)", exit_code=1)
    result = cli("finetune", "--task", "RTE", "--release", best, "--data-dir", FIXTURES,
                 "--output-dir", str(tmp_path / "out"), *TRAIN_OPTIONS)
    one_line_error(result, "classifier.weight", "(3, 64)", "(2, 64)", exit_code=1)


def test_an_output_directory_in_use_by_another_run_is_refused(tiny_release, cb_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # held by a live process on this host (this test's own)
    (out / "deberta-ds.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                     "started": "now"}))
    result = cli("finetune", "--task", "CB", "--release", tiny_release, "--data-dir", cb_data,
                 "--output-dir", str(out), *TRAIN_OPTIONS)
    one_line_error(result, "in use by another fine-tuning run", f"pid {os.getpid()}", exit_code=1)
    assert sorted(os.listdir(out)) == ["deberta-ds.lock"]


def test_predict_refuses_a_release_without_a_head_trained_for_the_task(tiny_release, finetuned, cb_data, tmp_path):
    result = cli("predict", "--task", "CB", "--model", tiny_release, "--data-dir", cb_data, "--output-dir", str(tmp_path))
    one_line_error(result, f"{tiny_release}: has no trained head for CB", "a pretraining release", exit_code=1)
    assert not os.listdir(tmp_path)
    result = cli("predict", "--task", "BoolQ", "--model", os.path.join(finetuned[0], "best"), "--data-dir", cb_data,
                 "--output-dir", str(tmp_path))
    one_line_error(result, "fine-tuned for CB, not BoolQ", exit_code=1)
    config = json.load(open(os.path.join(finetuned[0], "best", "config.json")))
    assert config["finetuning_task"] == "CB" and config["id2label"] == {"0": "contradiction", "1": "neutral",
                                                                        "2": "entailment"}
