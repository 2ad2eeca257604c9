"""From examples to the model and back: token-id features, padded batches, predictions from logits, the
task's scores and the leaderboard submission file."""
import functools
import json
import os

import numpy as np

from pipeline.finetune import metrics
from pipeline.io import atomic_file

# Label index for positions/rows without a gold label (test split); cross-entropy ignores it.
IGNORE_LABEL = -100


def truncate_longest_first(ids_a, ids_b, budget):
    """Cut tokens from the end of the longer segment until len(a) + len(b) <= budget (ties: cut b).

    Same result as removing one token at a time from the longer one (BERT/HF "longest_first").
    """
    if ids_b is None:
        return ids_a[:max(budget, 0)], None
    excess = len(ids_a) + len(ids_b) - budget
    if excess <= 0:
        return ids_a, ids_b
    len_a, len_b = len(ids_a), len(ids_b)
    cut = min(excess, abs(len_a - len_b))     # first even out the two lengths
    if len_a > len_b:
        len_a -= cut
    else:
        len_b -= cut
    excess -= cut
    len_b -= (excess + 1) // 2                # then alternate, b first on a tie
    len_a -= excess // 2
    return ids_a[:len_a], ids_b[:len_b]


class _SequenceEncoder:
    """[CLS] a [SEP] (b [SEP]) ids of at most max_seq_len tokens, through the project's tokenizer interface."""

    def __init__(self, tokenizer, max_seq_len):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        # ReCoRD repeats its passage for every candidate and query: encode each text once.
        self.encode_text = functools.lru_cache(maxsize=4096)(lambda text: tuple(tokenizer.encode(text)))
        self.specials_single = len(tokenizer.build_inputs([]))
        self.specials_pair = len(tokenizer.build_inputs([], []))
        if max_seq_len <= self.specials_pair:
            raise ValueError(f"max_seq_len {max_seq_len} leaves no room for text")

    def __call__(self, text_a, text_b=None):
        ids_a = list(self.encode_text(text_a))
        ids_b = None if text_b is None else list(self.encode_text(text_b))
        specials = self.specials_single if ids_b is None else self.specials_pair
        ids_a, ids_b = truncate_longest_first(ids_a, ids_b, self.max_seq_len - specials)
        return self.tokenizer.build_inputs(ids_a, ids_b)


def _label_or_ignore(label):
    return IGNORE_LABEL if label is None else label


def build_features(task, examples, tokenizer, max_seq_len):
    """Token-id features in example order. Every feature has "label" and "example_index"; also
      classification / grouped_binary: "input_ids" (MultiRC: "group" = (passage, question) idx)
      multiple_choice: "choices" (one id list per choice)
      candidate_ranking: "input_ids" per candidate row, "group" = query idx, "candidate_index";
                         label 1 when the candidate is a gold answer.
    Labels are IGNORE_LABEL (-100) where the split has none.
    """
    encode = _SequenceEncoder(tokenizer, max_seq_len)
    features = []
    for index, example in enumerate(examples):
        if task.kind == "multiple_choice":
            features.append({"choices": [encode(a, b) for a, b in example.inputs],
                             "label": _label_or_ignore(example.label), "example_index": index})
        elif task.kind == "candidate_ranking":
            for candidate_index, (a, b) in enumerate(example.inputs):
                is_answer = int(example.candidates[candidate_index] in example.answers)
                features.append({"input_ids": encode(a, b),
                                 "label": is_answer if example.answers else IGNORE_LABEL,
                                 "example_index": index, "group": example.key,
                                 "candidate_index": candidate_index})
        else:
            (a, b), = example.inputs
            feature = {"input_ids": encode(a, b), "label": _label_or_ignore(example.label), "example_index": index}
            if task.kind == "grouped_binary":
                feature["group"] = example.group
            features.append(feature)
    return features


def collate(features, pad_id=0):
    """Pad to the longest sequence in the batch -> LongTensors input_ids / attention_mask [B, N]
    (multiple choice: [B, C, N]) and labels [B]. attention_mask is 1 on tokens, 0 on padding."""
    import torch

    if "choices" in features[0]:
        choice_counts = {len(f["choices"]) for f in features}
        if len(choice_counts) != 1:
            raise ValueError(f"multiple-choice batch mixes choice counts {sorted(choice_counts)}")
        sequences = [ids for f in features for ids in f["choices"]]
    else:
        sequences = [f["input_ids"] for f in features]
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    if "choices" in features[0]:
        shape = (len(features), len(features[0]["choices"]), longest)
        input_ids, attention_mask = input_ids.view(shape), attention_mask.view(shape)
    labels = torch.tensor([f["label"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Predictions and scores

def _as_array(logits):
    if hasattr(logits, "detach"):                 # torch tensor
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float64)


def _candidate_scores(logits):
    """One score per ReCoRD row: logit(answer) − logit(not answer) for a 2-way head (same order as the
    softmax probability of "answer"), or the single logit of a 1-output head."""
    if logits.ndim == 2 and logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    return logits.reshape(len(logits))


def decode(task, examples, features, logits):
    """Model outputs, one row per feature in feature order, -> {example key: prediction}.

    The prediction is a label index (COPA: choice index; MultiRC: 0/1 per answer option), or for
    ReCoRD the text of the best-scoring candidate entity of each query.
    """
    logits = _as_array(logits)
    if len(logits) != len(features):
        raise ValueError(f"{len(logits)} rows of logits for {len(features)} features")
    if task.kind != "candidate_ranking":
        best = logits.argmax(axis=-1)
        return {examples[f["example_index"]].key: int(choice) for f, choice in zip(features, best)}
    best_per_query = {}
    for feature, score in zip(features, _candidate_scores(logits)):
        index = feature["example_index"]
        if index not in best_per_query or score > best_per_query[index][0]:
            best_per_query[index] = (score, feature["candidate_index"])
    return {examples[i].key: examples[i].candidates[c] for i, (_, c) in best_per_query.items()}


def score(task, examples, predictions):
    """{metric: value, ..., "score": mean of the task's leaderboard metrics}, fractions in [0, 1]."""
    results = task.metric(task, examples, predictions)
    results["score"] = metrics.mean_score(results[name] for name in task.score_metrics)
    return results


# --------------------------------------------------------------------------------------------------
# Submission files

def write_submission(task, predictions, out_dir):
    """Write `out_dir/<Task>.jsonl` in the leaderboard's format; returns its path.

    Written to a temporary file in out_dir and renamed, so a crash never leaves half a file behind.
    """
    if not task.submitted:
        raise ValueError(f"{task.name} is the intermediate task; the SuperGLUE server takes no {task.name} file")
    if not predictions:
        raise ValueError(f"{task.name}: no predictions to write")
    path = os.path.join(out_dir, f"{task.name}.jsonl")
    with atomic_file(path) as out:
        for record in task.submission_records(task, predictions):
            out.write(json.dumps(record) + "\n")
    return path


