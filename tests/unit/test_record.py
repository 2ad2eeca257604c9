"""ReCoRD as the official recipe computes it: the entity-scoring head against a loop-by-loop recomputation
of the official formula, and the passage windows (every candidate scored, answers beyond the first window
found and predicted)."""
import math

import numpy as np
import pytest
import torch

from model import DebertaForEntityScoring, preset
from pipeline.finetune import tasks as sg
from pipeline.finetune.features import collate, window_starts
from tests.unit.test_superglue import TOK


def official_entity_logits(hidden, entity_tokens, proj, classifier):
    """The official ReCoRDQAModel head, one entity at a time: attention of each entity token's state with the
    [CLS] state / √D, softmax over the entity's tokens, the weighted sum of their states, proj, GELU,
    classifier; -10000 for an entity without tokens (dropout off)."""
    B, E, _ = entity_tokens.shape
    logits = torch.full((B, E), -10000.0)
    for b in range(B):
        query = hidden[b, 0] / math.sqrt(hidden.shape[-1])
        for e in range(E):
            positions = [int(p) for p in entity_tokens[b, e] if p > 0]
            if not positions:
                continue
            states = hidden[b, positions]                              # [S, D]
            weights = torch.softmax(states @ query, dim=0)
            pooled = (weights[:, None] * states).sum(0)
            logits[b, e] = classifier(torch.nn.functional.gelu(proj(pooled)))[0]
    return logits


def test_entity_head_computes_the_official_formula():
    torch.manual_seed(0)
    model = DebertaForEntityScoring(preset("tiny", vocab_size=200)).eval()
    input_ids = torch.randint(4, 200, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    entity_tokens = torch.tensor([[[1, 2, 0], [5, 0, 0], [7, 8, 9]],
                                  [[3, 0, 0], [0, 0, 0], [0, 0, 0]],          # one entity, two padding rows
                                  [[2, 6, 0], [4, 5, 0], [8, 0, 0]]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, -100.0, -100.0], [0.0, 1.0, -100.0]])
    out = model(input_ids, attention_mask, entity_tokens, labels=labels)
    hidden = model.deberta(input_ids, attention_mask).last_hidden_state
    expected = official_entity_logits(hidden, entity_tokens, model.proj, model.classifier)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    keep = labels >= 0
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(expected[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.proj.weight.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0


def long_record(tmp_path, filler_words):
    """One ReCoRD query whose gold entity ("Zurich") is named only after `filler_words` of text."""
    passage = "Oslo is cold . " + " ".join(["word"] * filler_words) + " and Zurich won the prize ."
    start = passage.index("Zurich")
    record = {"idx": 0, "passage": {"text": passage, "entities": [
        {"start": 0, "end": 3}, {"start": start, "end": start + 5}]},
        "qas": [{"idx": 5, "query": "@placeholder won", "answers": [{"start": start, "end": start + 5, "text": "Zurich"}]}]}
    (tmp_path / "ReCoRD").mkdir(exist_ok=True)
    (tmp_path / "ReCoRD" / "val.jsonl").write_text(__import__("json").dumps(record) + "\n")
    return sg.get_task("ReCoRD").load("val", str(tmp_path))


def test_an_answer_beyond_the_first_window_is_scored_and_predicted(tmp_path):
    task = sg.get_task("ReCoRD")
    examples = long_record(tmp_path, filler_words=60)
    features = task.build_features(examples, TOK, max_seq_len=24)
    # windows that name no candidate are not encoded: Oslo's (the first) and Zurich's
    assert len(features) >= 2 and all(len(f["input_ids"]) <= 24 for f in features)
    zurich = [f for f in features if 1 in dict(f["entities"])]
    assert zurich and all(f["window"] > 0 for f in zurich)                 # not in the first window
    assert all(f["entity_labels"][[c for c, _ in f["entities"]].index(1)] == 1.0 for f in zurich)
    for feature in zurich:                                                  # its positions hold its tokens
        positions = dict(feature["entities"])[1]
        assert [feature["input_ids"][p] for p in positions] == TOK.encode("Zurich")
    # each window carries the whole query ([MASK] won) after its passage part
    assert all(f["input_ids"][-3:] == [TOK.mask_id] + TOK.encode("won") + [TOK.sep_id] for f in features)
    logits = [np.array([3.0 if c == 1 else -1.0 for c, _ in f["entities"]]) for f in features]
    predictions = task.decode(examples, features, logits)
    assert predictions == {5: "Zurich"} and task.score(examples, predictions)["em"] == 1.0
    batch = collate(features)
    assert batch["entity_tokens"].shape[:2] == batch["labels"].shape == (len(features), 1)


def test_windows_overlap_by_half_and_cover_the_passage():
    assert window_starts(10, 16) == [0]
    starts = window_starts(100, 20)
    assert starts[:3] == [0, 10, 20] and starts[-1] + 20 >= 100 and starts[-2] + 20 < 100


def test_a_mention_longer_than_half_a_window_is_still_scored(tmp_path):
    task = sg.get_task("ReCoRD")
    name = "Grand Duchy of Very Long Names"
    passage = "a b c d e f g " + name + " h i j k l m n o p q r s t"
    start = passage.index(name)
    record = {"idx": 0, "passage": {"text": passage, "entities": [{"start": start, "end": start + len(name) - 1}]},
              "qas": [{"idx": 0, "query": "x @placeholder", "answers": [{"start": start, "end": start + len(name) - 1,
                                                                          "text": name}]}]}
    (tmp_path / "ReCoRD").mkdir()
    (tmp_path / "ReCoRD" / "val.jsonl").write_text(__import__("json").dumps(record) + "\n")
    examples = task.load("val", str(tmp_path))
    features = task.build_features(examples, TOK, max_seq_len=14)          # windows of 9 tokens, the name has 6
    assert features and all(dict(f["entities"]).get(0) for f in features)
    assert task.decode(examples, features, [np.zeros(1) for _ in features]) == {0: name}


@pytest.mark.parametrize("filler_words", [0, 40])
def test_every_candidate_is_scored_in_some_window(tmp_path, filler_words):
    task = sg.get_task("ReCoRD")
    examples = long_record(tmp_path, filler_words)
    features = task.build_features(examples, TOK, max_seq_len=24)
    scored = {c for f in features for c, _ in f["entities"]}
    assert scored == set(range(len(examples[0].candidates)))


def test_a_longer_max_seq_len_takes_a_passage_in_fewer_windows(tmp_path):
    """8192 tokens hold the whole passage: one window, both candidates in it, the answer as before."""
    task = sg.get_task("ReCoRD")
    examples = long_record(tmp_path, filler_words=3000)
    short, long = (task.build_features(examples, TOK, max_seq_len=n) for n in (512, 8192))
    assert len(short) >= 2 and len(long) == 1 and sorted(dict(long[0]["entities"])) == [0, 1]
    assert len(long[0]["input_ids"]) > 3000
    logits = [np.array([3.0 if c == 1 else -1.0 for c, _ in f["entities"]]) for f in long]
    assert task.decode(examples, long, logits) == {5: "Zurich"}
