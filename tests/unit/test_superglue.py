"""SuperGLUE tasks: parsing the official files, input formats, features, collation, decoding, scoring,
submission files, the `datasets` path and the presets. Everything runs on tests/fixtures/superglue."""
import json
import os
import shutil
import zlib

import numpy as np
import pytest
import torch

from pipeline.finetune import task_data
from pipeline.finetune.features import build_features, collate, truncate_longest_first, write_submission
from pipeline.finetune import tasks as sg
from pipeline.finetune.config import PRESETS_PATH, load_preset
from pipeline.errors import ConfigError, DataError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "superglue")
EIGHT_TASKS = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC")


class FakeTokenizer:
    """The project's tokenizer interface (encode / build_inputs, pad 0 cls 1 sep 2, mask_id): whitespace
    words hashed to ids 4..1003, so the tests do not depend on pipeline/tokenizer.py or a sentencepiece model."""

    pad_id, cls_id, sep_id, mask_id = 0, 1, 2, 1004

    def encode(self, text):
        return [4 + zlib.crc32(word.encode()) % 1000 for word in text.split()]

    def build_inputs(self, ids_a, ids_b=None):
        ids = [self.cls_id] + list(ids_a) + [self.sep_id]
        return ids if ids_b is None else ids + list(ids_b) + [self.sep_id]


TOK = FakeTokenizer()


def load(name, split="val"):
    return sg.get_task(name).load(split, FIXTURES)


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def perfect_logits(task, examples, features):
    """Logits that make every prediction right (one-hot on the gold label / gold candidate)."""
    if task.kind == "multiple_choice":
        return np.eye(len(features[0]["choices"]))[[f["label"] for f in features]]
    if task.kind == "entity_scoring":                  # one logit per candidate a window holds
        return [np.array(f["entity_labels"]) for f in features]
    return np.eye(2 if task.kind == "grouped_binary" else task.num_labels)[[f["label"] for f in features]]


# --- registry and label spaces ----------------------------------------------------------------------

def test_registry_has_every_task_with_its_kind():
    kinds = {name: sg.get_task(name).kind for name in sg.TASKS}
    assert kinds == {
        "BoolQ": "classification", "CB": "classification", "COPA": "multiple_choice",
        "MultiRC": "grouped_binary", "ReCoRD": "entity_scoring", "RTE": "classification",
        "WiC": "classification", "WSC": "classification", "AX-b": "classification",
        "AX-g": "classification", "MNLI": "classification"}
    assert sg.get_task("axb").name == "AX-b" and sg.get_task("cb").name == "CB"
    with pytest.raises(ConfigError, match="--task SQuAD: unknown task"):
        sg.get_task("SQuAD")


def test_label_spaces_support_starting_from_mnli():
    mnli = sg.get_task("MNLI")
    assert mnli.label_names == ("contradiction", "neutral", "entailment")
    # CB keeps MNLI's order, so the MNLI classifier carries over row for row
    assert sg.get_task("CB").label_names == mnli.label_names
    assert sg.get_task("CB").mnli_head_rows == mnli.label_names
    rte = sg.get_task("RTE")
    assert rte.label_names == ("not_entailment", "entailment")
    assert dict(zip(rte.label_names, rte.mnli_head_rows))["entailment"] == "entailment"
    for name in ("RTE", "CB", "COPA"):
        task = sg.get_task(name)
        assert task.start_from == "MNLI"
        assert len(task.mnli_head_rows) == task.num_labels
        assert set(task.mnli_head_rows) <= set(mnli.label_names)
    assert sg.get_task("COPA").num_labels == 1          # one score per choice
    assert sg.get_task("AX-b").predicted_by == sg.get_task("AX-g").predicted_by == "RTE"


# --- parsing and input formats ----------------------------------------------------------------------

def test_boolq_reads_passage_then_question_and_json_bool_labels():
    examples = load("BoolQ")
    assert [ex.label for ex in examples] == [0, 1, 1]          # false, true, true
    passage, question = examples[1].inputs[0]
    assert passage.startswith("Water is a liquid") and question == "is water wet"
    assert [ex.label for ex in load("BoolQ", "test")] == [None, None]


def test_cb_and_rte_labels_map_to_indices():
    assert [ex.label for ex in load("CB")] == [0, 2, 1, 2]      # contradiction, entailment, neutral, entailment
    assert [ex.label for ex in load("RTE")] == [0, 1]           # not_entailment, entailment


def test_copa_puts_the_cause_first():
    train, val = load("COPA", "train"), load("COPA")
    # "cause": [choice, premise]
    assert train[0].inputs == [("The sun was rising.", "My body cast a shadow over the grass."),
                               ("The grass was cut.", "My body cast a shadow over the grass.")]
    # "effect": [premise, choice]
    assert val[0].inputs[1] == ("The man turned on the faucet.", "Water flowed from the spout.")
    assert [ex.label for ex in val] == [1, 1, 0]


def test_wic_marks_the_target_occurrence_in_both_sentences():
    first, second = load("WiC")
    assert first.inputs == [("Room and [board].", "He nailed [boards] across the windows.")]
    assert second.inputs[0][0] == "[Circulate] a rumor."
    assert [first.label, second.label] == [0, 1]


def test_wsc_marks_noun_phrase_and_pronoun():
    examples = load("WSC")
    assert examples[0].inputs == [
        ("The [city councilmen] refused the demonstrators a permit because *they* feared violence.", None)]
    assert examples[0].label == 1 and examples[1].label == 0


def test_wsc_keeps_punctuation_outside_markers_and_handles_pronoun_first(tmp_path):
    record = {"text": "When he arrived, John said hello to him.", "idx": 7, "label": True,
              "target": {"span1_index": 3, "span1_text": "John", "span2_index": 7, "span2_text": "him"}}
    write_jsonl(str(tmp_path / "WSC" / "train.jsonl"), [record])
    (example,) = sg.get_task("WSC").load("train", str(tmp_path))
    assert example.inputs[0][0] == "When he arrived, [John] said hello to *him*."
    record["target"].update(span1_index=7, span1_text="him.", span2_index=1, span2_text="he")
    write_jsonl(str(tmp_path / "WSC" / "train.jsonl"), [record])
    (example,) = sg.get_task("WSC").load("train", str(tmp_path))
    assert example.inputs[0][0] == "When *he* arrived, John said hello to [him]."
    record["target"]["span1_index"] = 8                        # the text has 8 words: 0..7
    write_jsonl(str(tmp_path / "WSC" / "train.jsonl"), [record])
    with pytest.raises(DataError, match=r"train.jsonl:1: span1 index 8 is outside the text \(8 words\)"):
        sg.get_task("WSC").load("train", str(tmp_path))


def test_multirc_has_one_example_per_answer_grouped_by_question():
    examples = load("MultiRC")
    assert [ex.key for ex in examples] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 3), (0, 1, 4), (1, 2, 5)]
    assert [ex.group for ex in examples] == [(0, 0)] * 3 + [(0, 1)] * 2 + [(1, 2)]
    assert [ex.label for ex in examples] == [1, 1, 0, 1, 0, 1]
    passage, question_answer = examples[3].inputs[0]
    # HTML markup is gone; the answer follows the question
    assert passage == "Ann has a red car and a blue bike. She rides the bike to work."
    assert question_answer == "How does Ann get to work? By bike"


def test_record_candidates_answers_and_placeholder():
    first, second, third = load("ReCoRD")
    # entities are unique (first-seen order) and their "end" offset is inclusive
    assert first.candidates == ("Paris Agreement", "United States", "China", "Barack Obama", "U.S.", "Obama")
    assert first.answers == ("United States", "U.S.")
    assert (first.key, second.key, third.key) == (0, 1, 2)
    (passage, query), = first.inputs
    assert query == "@placeholder signed the agreement with China"
    # @highlight lines become sentences, and the mentions' spans move with the text
    assert passage.endswith("role. Obama hails the deal. China joins the pact")
    assert [(first.candidates[c], passage[start:end]) for c, start, end in first.mentions if c in (2, 5)] == [
        ("China", "China"), ("Obama", "Obama"), ("Obama", "Obama"), ("China", "China")]
    assert all(passage[start:end] == first.candidates[c] for c, start, end in first.mentions)
    assert load("ReCoRD", "test")[0].answers == ()


def test_diagnostics_read_the_official_file_names():
    axb, axg = load("AX-b", "test"), load("AX-g", "test")
    assert [ex.label for ex in axb] == [0, 1, 1]
    assert [ex.group for ex in axg] == [0, 0, 1, 1]     # consecutive lines; their pair_ids differ, as officially
    assert axg[0].inputs[0][0].startswith("The taxpayer met")          # [premise, hypothesis]


def test_mnli_reads_glue_tsv():
    examples = load("MNLI", "train")
    assert [ex.label for ex in examples] == [1, 2, 2, 0]        # neutral, entailment, entailment, contradiction
    # quotes are text, not CSV quoting
    assert examples[2].inputs[0][1] == 'A member of my team will execute your orders with "immense" precision.'
    assert [ex.label for ex in load("MNLI", "val")] == [1, 0]


# --- bad input ----------------------------------------------------------------------------------------

def test_missing_split_names_the_expected_file(tmp_path):
    with pytest.raises(DataError, match=r"BoolQ train split not found: expected .*BoolQ/train\.jsonl"):
        sg.get_task("BoolQ").load("train", str(tmp_path))
    with pytest.raises(DataError, match="AX-b has no 'train' split"):
        sg.get_task("AX-b").load("train", FIXTURES)


def test_missing_field_names_file_and_line(tmp_path):
    path = str(tmp_path / "CB" / "train.jsonl")
    write_jsonl(path, [{"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 0},
                       {"premise": "a", "label": "neutral", "idx": 1}])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'hypothesis'"):
        sg.get_task("CB").load("train", str(tmp_path))


def test_unknown_label_names_file_and_line(tmp_path):
    path = str(tmp_path / "RTE" / "val.jsonl")
    write_jsonl(path, ["", {"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 0}])
    with pytest.raises(DataError, match=rf"{path}:2: unknown RTE label 'maybe' \(expected one of not_entailment, entailment\)"):
        sg.get_task("RTE").load("val", str(tmp_path))
    # BoolQ wants JSON booleans, not strings
    write_jsonl(str(tmp_path / "BoolQ" / "val.jsonl"), [{"question": "q", "passage": "p", "idx": 0, "label": "yes"}])
    with pytest.raises(DataError, match=r"val.jsonl:1: unknown BoolQ label 'yes'"):
        sg.get_task("BoolQ").load("val", str(tmp_path))


def test_unlabelled_line_outside_test_and_broken_json_are_errors(tmp_path):
    path = str(tmp_path / "WiC" / "train.jsonl")
    write_jsonl(path, [{"word": "w", "sentence1": "a w", "sentence2": "w b", "idx": 0,
                        "start1": 2, "end1": 3, "start2": 0, "end2": 1}])
    with pytest.raises(DataError, match=rf"{path}:1: missing label in the train split"):
        sg.get_task("WiC").load("train", str(tmp_path))
    write_jsonl(path, ['{"word": "w", '])
    with pytest.raises(DataError, match=rf"{path}:1: not valid JSON"):
        sg.get_task("WiC").load("train", str(tmp_path))


def test_bad_offsets_and_nested_fields_are_reported(tmp_path):
    path = str(tmp_path / "WiC" / "val.jsonl")
    write_jsonl(path, [{"word": "w", "sentence1": "a w", "sentence2": "w b", "idx": 0, "label": True,
                        "start1": 2, "end1": 9, "start2": 0, "end2": 1}])
    with pytest.raises(DataError, match=rf"{path}:1: target span 1 \[2, 9\) is outside the sentence"):
        sg.get_task("WiC").load("val", str(tmp_path))
    path = str(tmp_path / "MultiRC" / "val.jsonl")
    write_jsonl(path, [{"idx": 3, "passage": {"text": "t", "questions": [
        {"idx": 4, "question": "q", "answers": [{"idx": 5, "label": 1}]}]}}])
    with pytest.raises(DataError, match=rf"{path}:1 \(question 4\) \(answer 5\): missing field 'text'"):
        sg.get_task("MultiRC").load("val", str(tmp_path))


# --- features and collation ---------------------------------------------------------------------------

def truncate_one_at_a_time(ids_a, ids_b, budget):
    """The reference rule: drop the last token of the longer segment (b on a tie) until it fits."""
    ids_a, ids_b = list(ids_a), list(ids_b)
    while len(ids_a) + len(ids_b) > budget:
        if len(ids_a) > len(ids_b):
            ids_a.pop()
        else:
            ids_b.pop()
    return ids_a, ids_b


def test_truncate_longest_first_matches_the_one_at_a_time_rule():
    # by hand: a 10, b 3, budget 8 -> a loses 5 -> (5, 3)
    a, b = truncate_longest_first(list(range(10)), [7, 8, 9], 8)
    assert (a, b) == ([0, 1, 2, 3, 4], [7, 8, 9])
    for len_a in range(8):
        for len_b in range(8):
            for budget in range(12):
                got = truncate_longest_first(list(range(len_a)), list(range(len_b)), budget)
                assert got == truncate_one_at_a_time(range(len_a), range(len_b), budget), (len_a, len_b, budget)
    assert truncate_longest_first([1, 2, 3], None, 2) == ([1, 2], None)


def test_classification_features_are_cls_a_sep_b_sep():
    examples = load("RTE")
    features = build_features(sg.get_task("RTE"), examples, TOK, max_seq_len=512)
    premise, hypothesis = examples[0].inputs[0]
    assert features[0]["input_ids"] == [1] + TOK.encode(premise) + [2] + TOK.encode(hypothesis) + [2]
    assert [f["label"] for f in features] == [0, 1]
    assert [f["example_index"] for f in features] == [0, 1]


def test_features_respect_max_seq_len_by_cutting_the_longer_segment():
    examples = load("BoolQ")            # long passage, short question
    features = build_features(sg.get_task("BoolQ"), examples, TOK, max_seq_len=12)
    question_ids = TOK.encode(examples[0].inputs[0][1])          # 8 words
    ids = features[0]["input_ids"]
    # budget 12 − 3 specials = 9 tokens for a 21-word passage and an 8-word question: 29 − 9 = 20 to cut.
    # Longest first: 13 from the passage evens them out (8, 8); the other 7 alternate, question first on
    # a tie: question −4, passage −3 -> passage 5, question 4.
    assert len(ids) == 12
    assert ids[-5:] == question_ids[:4] + [2]
    assert all(len(f["input_ids"]) <= 12 for f in features)


def test_test_split_features_carry_the_ignore_label():
    features = build_features(sg.get_task("CB"), load("CB", "test"), TOK, 64)
    assert [f["label"] for f in features] == [sg.IGNORE_LABEL]


def test_copa_features_and_multiple_choice_collate():
    task = sg.get_task("COPA")
    examples = load("COPA")
    features = task.build_features(examples, TOK, max_seq_len=136)
    assert [len(f["choices"]) for f in features] == [2, 2, 2]
    batch = collate(features)
    longest = max(len(ids) for f in features for ids in f["choices"])
    assert batch["input_ids"].shape == (3, 2, longest) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (3, 2, longest)
    assert batch["labels"].tolist() == [1, 1, 0]
    first_choice = features[0]["choices"][0]
    assert batch["input_ids"][0, 0, :len(first_choice)].tolist() == first_choice
    assert batch["attention_mask"][0, 0].sum().item() == len(first_choice)


def test_collate_pads_to_the_longest_and_masks_padding():
    features = [{"input_ids": [1, 5, 2], "label": 1, "example_index": 0},
                {"input_ids": [1, 5, 6, 7, 2], "label": 0, "example_index": 1}]
    batch = collate(features)
    assert batch["input_ids"].tolist() == [[1, 5, 2, 0, 0], [1, 5, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_record_encodes_each_query_once_with_its_candidates():
    task = sg.get_task("ReCoRD")
    examples = load("ReCoRD")
    features = task.build_features(examples, TOK, max_seq_len=64)
    assert [f["example_index"] for f in features] == [0, 1, 2]          # one sequence per query
    first = features[0]
    assert [c for c, _ in first["entities"]] == list(range(6))
    # candidates "United States" and "U.S." are gold answers
    assert first["entity_labels"] == [0, 1, 0, 0, 1, 0]
    # the query follows the passage, with [MASK] for @placeholder; each candidate points at its mentions
    ids = first["input_ids"]
    assert ids[ids.index(TOK.sep_id) + 1] == TOK.mask_id
    china = dict(first["entities"])[2]
    assert len(china) == 2 and {ids[p] for p in china} == set(TOK.encode("China"))
    test_features = task.build_features(load("ReCoRD", "test"), TOK, 64)
    assert {label for f in test_features for label in f["entity_labels"]} == {sg.IGNORE_LABEL}


# --- decoding, scoring --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EIGHT_TASKS + ("AX-b", "AX-g", "MNLI"))
def test_perfect_logits_score_one(name):
    task = sg.get_task(name)
    split = "test" if name.startswith("AX") else "val"
    examples = task.load(split, FIXTURES)
    features = task.build_features(examples, TOK, 128)
    scores = task.score(examples, task.decode(examples, features, perfect_logits(task, examples, features)))
    assert scores["score"] == pytest.approx(1.0)
    assert set(scores) - {"score"} == {
        "CB": {"f1", "accuracy"}, "MultiRC": {"f1a", "em"}, "ReCoRD": {"f1", "em"}, "AX-b": {"mcc"},
        "AX-g": {"accuracy", "gender_parity"}}.get(name, {"accuracy"})


def test_cb_score_from_logits():
    task = sg.get_task("CB")
    examples = load("CB")                                       # gold: 0, 2, 1, 2
    features = task.build_features(examples, TOK, 64)
    logits = torch.tensor([[3.0, 0, 0], [0, 0, 1.0], [0, 0, 2.0], [0, 1.0, 0]])   # predicts 0, 2, 2, 1
    predictions = task.decode(examples, features, logits)
    assert predictions == {0: 0, 1: 2, 2: 2, 3: 1}
    # class 0: TP1 -> F1 1; class 1: TP0 FP1 FN1 -> 0; class 2: TP1 FP1 FN1 -> 2/4 = 0.5
    # F1 = 1.5/3 = 0.5 ; accuracy 2/4 = 0.5 ; score 0.5
    assert task.score(examples, predictions) == {"f1": pytest.approx(0.5), "accuracy": 0.5, "score": pytest.approx(0.5)}


def test_cb_macro_f1_averages_over_the_labels_in_gold_or_predictions():
    """sklearn's f1_score(average="macro"), which the leaderboard uses: a class absent from both is not a 0."""
    task = sg.get_task("CB")
    examples = load("CB")                                       # gold: 0, 2, 1, 2
    for example in examples:
        example.label = 0 if example.label == 1 else example.label    # gold 0, 2, 0, 2: no neutral
    scores = task.score(examples, {0: 0, 1: 2, 2: 0, 3: 2})
    assert scores["f1"] == 1.0 and scores["accuracy"] == 1.0     # over 3 classes it would be 2/3
    from sklearn.metrics import f1_score
    golds, preds = [0, 2, 0, 2, 1], [0, 2, 2, 2, 0]
    assert sg.metrics.macro_f1(golds, preds, sorted(set(golds) | set(preds))) == pytest.approx(
        f1_score(golds, preds, average="macro"))


def test_axg_lines_that_are_no_minimal_pair_are_refused(tmp_path):
    lines = [json.loads(line) for line in open(os.path.join(FIXTURES, "AX-g", "AX-g.jsonl"))]
    lines[3]["premise"] = "Someone else entirely wrote this sentence."
    os.makedirs(tmp_path / "AX-g")
    (tmp_path / "AX-g" / "AX-g.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError, match=r"AX-g.jsonl:4: this example and the one before it are not a minimal pair"):
        sg.get_task("AX-g").load("test", str(tmp_path))
    (tmp_path / "AX-g" / "AX-g.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    with pytest.raises(DataError, match="3 AX-g examples, an odd number"):
        sg.get_task("AX-g").load("test", str(tmp_path))


def test_invalid_utf8_in_a_task_file_names_the_line(tmp_path):
    os.makedirs(tmp_path / "RTE")
    (tmp_path / "RTE" / "val.jsonl").write_bytes(b'{"premise": "a", "hypothesis": "b", "idx": 0, "label": "entailment"}\n'
                                                 b'{"premise": "caf\xe9", "hypothesis": "b", "idx": 1}\n')
    with pytest.raises(DataError, match=r"val.jsonl:2: invalid UTF-8"):
        sg.get_task("RTE").load("val", str(tmp_path))


def test_multirc_decode_and_score():
    task = sg.get_task("MultiRC")
    examples = load("MultiRC")                                  # gold 1 1 0 | 1 0 | 1
    features = task.build_features(examples, TOK, 128)
    assert [f["group"] for f in features] == [(0, 0)] * 3 + [(0, 1)] * 2 + [(1, 2)]
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [0, 1]])   # predicts 1 0 0 | 1 0 | 1
    predictions = task.decode(examples, features, logits)
    # F1a: TP 3, FP 0, FN 1 -> 6/7; EM: question (0,0) wrong, others right -> 2/3
    scores = task.score(examples, predictions)
    assert scores["f1a"] == pytest.approx(6 / 7) and scores["em"] == pytest.approx(2 / 3)
    assert scores["score"] == pytest.approx((6 / 7 + 2 / 3) / 2)


def test_record_decode_takes_the_best_candidate_per_query():
    task = sg.get_task("ReCoRD")
    examples = load("ReCoRD")
    features = task.build_features(examples, TOK, 64)
    # query 0: best "U.S." (alias of the gold); query 1: best "Obama"; query 2: best "Madrid" (wrong)
    best = {0: "U.S.", 1: "Obama", 2: "Madrid"}
    logits = [np.array([5.0 if examples[f["example_index"]].candidates[c] == best[f["example_index"]] else 1.0
                        for c, _ in f["entities"]]) for f in features]
    predictions = task.decode(examples, features, logits)
    assert predictions == {0: "U.S.", 1: "Obama", 2: "Madrid"}
    # EM: 1, 1, 0 -> 2/3. F1: 1, 1, "Madrid" vs "Real Madrid" = 2·1·0.5/1.5 = 2/3 -> (8/3)/3 = 8/9
    scores = task.score(examples, predictions)
    assert scores["em"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(8 / 9)


def test_axg_parity_and_axb_mcc_from_rte_style_predictions():
    axg = sg.get_task("AX-g")
    examples = load("AX-g", "test")                             # gold 0 0 1 1, pairs (0,1) (2,3)
    scores = axg.score(examples, {0: 0, 1: 1, 2: 1, 3: 1})
    # accuracy 3/4; pair (0, 1) differs, pair (2, 3) agrees -> parity 1/2 (pair_id would make every line a pair: 1.0)
    assert scores["accuracy"] == 0.75 and scores["gender_parity"] == 0.5
    axb = sg.get_task("AX-b")
    examples = load("AX-b", "test")                             # gold 0 1 1
    # predictions 0 1 0: TP 1 (idx 1), TN 1 (idx 0), FP 0, FN 1 (idx 2)
    # -> (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (1 − 0) / sqrt(1·2·1·2) = 1/2
    assert axb.score(examples, {0: 0, 1: 1, 2: 0}) == {"mcc": pytest.approx(0.5), "score": pytest.approx(0.5)}


def test_scoring_without_gold_or_with_missing_predictions_fails():
    task = sg.get_task("BoolQ")
    with pytest.raises(ValueError, match="no gold label"):
        task.score(load("BoolQ", "test"), {0: 1, 1: 0})
    with pytest.raises(ValueError, match="no prediction for 1 examples, e.g. idx 2"):
        task.score(load("BoolQ"), {0: 1, 1: 0})
    with pytest.raises(ValueError, match="3 rows of logits for 2 features"):
        task.decode(load("BoolQ", "test"), task.build_features(load("BoolQ", "test"), TOK, 32), np.zeros((3, 2)))


# --- submission files ---------------------------------------------------------------------------------

def read_lines(path):
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name, predictions, expected", [
    ("BoolQ", {1: 0, 0: 1}, [{"idx": 0, "label": "true"}, {"idx": 1, "label": "false"}]),
    ("CB", {0: 0, 1: 1, 2: 2}, [{"idx": 0, "label": "contradiction"}, {"idx": 1, "label": "neutral"},
                                 {"idx": 2, "label": "entailment"}]),
    ("COPA", {0: 1, 1: 0}, [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}]),
    ("RTE", {0: 1, 1: 0}, [{"idx": 0, "label": "entailment"}, {"idx": 1, "label": "not_entailment"}]),
    ("WiC", {0: 1, 1: 0}, [{"idx": 0, "label": "true"}, {"idx": 1, "label": "false"}]),
    ("WSC", {0: 1, 1: 0}, [{"idx": 0, "label": "True"}, {"idx": 1, "label": "False"}]),
    ("AX-b", {0: 0}, [{"idx": 0, "label": "not_entailment"}]),
    ("AX-g", {0: 1}, [{"idx": 0, "label": "entailment"}]),
    ("ReCoRD", {3: "Barack Obama", 1: "U.S."}, [{"idx": 1, "label": "U.S."}, {"idx": 3, "label": "Barack Obama"}]),
])
def test_submission_files_use_the_official_labels(tmp_path, name, predictions, expected):
    path = write_submission(sg.get_task(name), predictions, str(tmp_path))
    assert os.path.basename(path) == f"{name}.jsonl"
    assert read_lines(path) == expected
    assert os.listdir(tmp_path) == [f"{name}.jsonl"]          # no temporary file left behind


def test_multirc_submission_is_nested_by_passage_question_answer(tmp_path):
    task = sg.get_task("MultiRC")
    examples = load("MultiRC")
    predictions = {ex.key: label for ex, label in zip(examples, [1, 0, 0, 1, 0, 1])}
    path = write_submission(task, predictions, str(tmp_path))
    assert read_lines(path) == [
        {"idx": 0, "passage": {"questions": [
            {"idx": 0, "answers": [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}, {"idx": 2, "label": 0}]},
            {"idx": 1, "answers": [{"idx": 3, "label": 1}, {"idx": 4, "label": 0}]}]}},
        {"idx": 1, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 5, "label": 1}]}]}},
    ]


def test_submission_replaces_an_old_file_and_refuses_mnli(tmp_path):
    task = sg.get_task("RTE")
    write_submission(task, {0: 0, 1: 0, 2: 0}, str(tmp_path))
    write_submission(task, {0: 1}, str(tmp_path))
    assert read_lines(str(tmp_path / "RTE.jsonl")) == [{"idx": 0, "label": "entailment"}]
    with pytest.raises(ValueError, match="MNLI is the intermediate task"):
        write_submission(sg.get_task("MNLI"), {0: 1}, str(tmp_path))


def test_end_to_end_test_split_to_submission(tmp_path):
    """What `deberta-ds predict` will do: test split -> features -> logits -> file."""
    task = sg.get_task("ReCoRD")
    examples = task.load("test", FIXTURES)
    features = task.build_features(examples, TOK, 64)
    logits = collate(features)["entity_tokens"].new_zeros(len(features), len(features[0]["entities"])).float()
    logits[0, 2] = 1.0                                          # third candidate: "Barcelona"
    write_submission(task, task.decode(examples, features, logits), str(tmp_path))
    assert read_lines(str(tmp_path / "ReCoRD.jsonl")) == [{"idx": 0, "label": "Barcelona"}]


# --- the `datasets` path (rows as the super_glue builder yields them; no network) ---------------------

def test_datasets_rows_give_the_same_examples_as_the_official_files():
    def same(name, rows, label_names, split="val"):
        task = sg.get_task(name)
        from_rows = task_data.examples_from_rows(task, split, rows, label_names, "datasets:test")
        return from_rows == task.load(split, FIXTURES)

    cb_rows = [{"premise": ex["premise"], "hypothesis": ex["hypothesis"], "idx": ex["idx"],
                "label": ["entailment", "contradiction", "neutral"].index(ex["label"])}
               for ex in read_lines(os.path.join(FIXTURES, "CB", "val.jsonl"))]
    assert same("CB", cb_rows, ["entailment", "contradiction", "neutral"])
    boolq_rows = [{"question": ex["question"], "passage": ex["passage"], "idx": ex["idx"], "label": -1}
                  for ex in read_lines(os.path.join(FIXTURES, "BoolQ", "test.jsonl"))]
    assert same("BoolQ", boolq_rows, ["False", "True"], split="test")
    wsc_rows = [{"text": ex["text"], **ex["target"], "idx": ex["idx"], "label": int(ex["label"])}
                for ex in read_lines(os.path.join(FIXTURES, "WSC", "val.jsonl"))]
    assert same("WSC", wsc_rows, ["False", "True"])
    copa_rows = [{**{k: v for k, v in ex.items() if k != "label"}, "label": ex["label"]}
                 for ex in read_lines(os.path.join(FIXTURES, "COPA", "val.jsonl"))]
    assert same("COPA", copa_rows, ["choice1", "choice2"])
    multirc_rows = [{"paragraph": record["passage"]["text"], "question": q["question"], "answer": a["text"],
                     "idx": {"paragraph": record["idx"], "question": q["idx"], "answer": a["idx"]}, "label": a["label"]}
                    for record in read_lines(os.path.join(FIXTURES, "MultiRC", "val.jsonl"))
                    for q in record["passage"]["questions"] for a in q["answers"]]
    assert same("MultiRC", multirc_rows, ["False", "True"])
    record_rows = []
    for record in read_lines(os.path.join(FIXTURES, "ReCoRD", "val.jsonl")):
        text = record["passage"]["text"]
        entities = [text[e["start"]:e["end"] + 1] for e in record["passage"]["entities"]]
        for qa in record["qas"]:
            record_rows.append({"passage": text, "query": qa["query"], "entities": entities,
                                "answers": [a["text"] for a in qa["answers"]],
                                "idx": {"passage": record["idx"], "query": qa["idx"]}})
    assert same("ReCoRD", record_rows, [])


def test_load_from_datasets_reads_classlabel_names(monkeypatch):
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
    rows = [{"premise": "p0", "hypothesis": "h0", "idx": 0, "label": 1},
            {"premise": "p1", "hypothesis": "h1", "idx": 1, "label": 0}]
    calls = []

    def fake_load_dataset(*args, split):
        calls.append((args, split))
        return datasets.Dataset.from_list(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = sg.get_task("RTE").load("val")                 # no data_dir -> `datasets`
    assert calls == [(("super_glue", "rte"), "validation")]
    # HF's ids (0 entailment, 1 not_entailment) become our indices (0 not_entailment, 1 entailment)
    assert [ex.label for ex in examples] == [0, 1]
    assert examples[0].inputs == [("p0", "h0")]


def test_datasets_axg_without_pair_id_pairs_neighbours():
    rows = [{"premise": f"p {'his' if i % 2 else 'her'} x", "hypothesis": "h", "idx": i, "label": 0} for i in range(4)]
    examples = task_data.examples_from_rows(sg.get_task("AX-g"), "test", rows, ["entailment", "not_entailment"], "d")
    assert [ex.group for ex in examples] == [0, 0, 1, 1]
    assert [ex.label for ex in examples] == [1, 1, 1, 1]       # "entailment" is index 1 in our order


def test_datasets_train_rows_without_labels_are_an_error():
    rows = [{"premise": "p", "hypothesis": "h", "idx": 0, "label": -1}]
    with pytest.raises(DataError, match="datasets:test: missing label in the train split"):
        task_data.examples_from_rows(sg.get_task("RTE"), "train", rows, ["entailment", "not_entailment"], "datasets:test")


# --- presets -------------------------------------------------------------------------------------------

def test_presets_cover_every_trained_task_within_the_paper_grid():
    with open(PRESETS_PATH, encoding="utf-8") as presets_file:
        presets = json.load(presets_file)
    grid = presets["grid"]
    assert set(presets["tasks"]) == set(EIGHT_TASKS) | {"MNLI"}
    for name in presets["tasks"]:
        preset = load_preset(name)
        official = " ".join(presets["tasks"][name]["_source"].get("official", []))
        assert preset["epochs"] <= grid["max_epochs"]
        assert preset["sift"] == {"enabled": True, "vat_lambda": 5.0, "vat_init_perturbation": 1e-2,
                                  "vat_learning_rate": 1e-4, "vat_loss_fn": "symmetric-kl"}
        for key, allowed in (("lr", grid["lr"]), ("batch_size", grid["batch_size"]),
                             ("warmup_steps", grid["warmup_steps"]), ("cls_drop_out", grid["cls_drop_out"])):
            # values from an official script may sit outside the paper's grid (COPA: batch 24)
            assert preset[key] in allowed or key in official, (name, key, preset[key])
        assert not any(key.startswith("_") for key in preset)


def test_presets_match_the_official_copa_and_record_scripts():
    copa = load_preset("COPA")
    assert {k: copa[k] for k in ("epochs", "lr", "batch_size", "warmup_steps", "cls_drop_out", "max_seq_len",
                                 "start_from")} == {"epochs": 8, "lr": 1e-6, "batch_size": 24, "warmup_steps": 30,
                                                    "cls_drop_out": 0.1, "max_seq_len": 136, "start_from": "MNLI"}
    record = load_preset("ReCoRD")
    assert {k: record[k] for k in ("epochs", "lr", "batch_size", "warmup_steps", "cls_drop_out", "max_seq_len",
                                   "start_from")} == {"epochs": 3, "lr": 3e-6, "batch_size": 64, "warmup_steps": 1000,
                                                      "cls_drop_out": 0.15, "max_seq_len": 512,
                                                      "start_from": "pretrained"}
    for name in ("RTE", "CB", "COPA"):
        assert load_preset(name)["start_from"] == sg.get_task(name).start_from == "MNLI"


def test_invalid_utf8_in_an_mnli_tsv_names_the_line(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "MNLI"), tmp_path / "MNLI")
    train = tmp_path / "MNLI" / "train.tsv"
    lines = train.read_bytes().split(b"\n")
    train.write_bytes(b"\n".join(lines[:2] + [lines[2].replace(b"\t", b"\xff\t", 1)] + lines[3:]))
    with pytest.raises(DataError, match=r"train.tsv:3: invalid UTF-8"):
        sg.get_task("MNLI").load("train", str(tmp_path))
