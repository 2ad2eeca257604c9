"""From examples to the model and back: token-id features, padded batches, predictions from logits, the
task's scores and the leaderboard submission file."""
import functools
import json
import os

import numpy as np

from pipeline.finetune import metrics
from pipeline.io import atomic_file
from pipeline.errors import ConfigError, DataError

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
        # MultiRC repeats its passage for every answer option: encode each text once.
        self.encode_text = functools.lru_cache(maxsize=4096)(lambda text: tuple(tokenizer.encode(text)))
        self.specials_single = len(tokenizer.build_inputs([]))
        self.specials_pair = len(tokenizer.build_inputs([], []))
        if max_seq_len <= self.specials_pair:
            raise ConfigError(f"max_seq_len {max_seq_len} leaves no room for text")

    def __call__(self, text_a, text_b=None):
        ids_a = list(self.encode_text(text_a))
        ids_b = None if text_b is None else list(self.encode_text(text_b))
        specials = self.specials_single if ids_b is None else self.specials_pair
        ids_a, ids_b = truncate_longest_first(ids_a, ids_b, self.max_seq_len - specials)
        return self.tokenizer.build_inputs(ids_a, ids_b)


def _label_or_ignore(label):
    return IGNORE_LABEL if label is None else label


def build_features(task, examples, tokenizer, max_seq_len):
    """Token-id features in example order. Every feature has "example_index"; also
      classification / grouped_binary: "input_ids", "label" (MultiRC: "group" = (passage, question) idx)
      multiple_choice: "choices" (one id list per choice), "label"
      entity_scoring: one feature per (query, passage window): "input_ids", "entities" = [(candidate index,
                      its mentions' token positions in input_ids)], "entity_labels" (1.0 for a gold
                      candidate, else 0.0), "window"
    Labels are IGNORE_LABEL (-100) where the split has none.
    """
    if task.kind == "entity_scoring":
        return entity_features(examples, tokenizer, max_seq_len)
    encode = _SequenceEncoder(tokenizer, max_seq_len)
    features = []
    for index, example in enumerate(examples):
        if task.kind == "multiple_choice":
            features.append({"choices": [encode(a, b) for a, b in example.inputs],
                             "label": _label_or_ignore(example.label), "example_index": index})
        else:
            (a, b), = example.inputs
            feature = {"input_ids": encode(a, b), "label": _label_or_ignore(example.label), "example_index": index}
            if task.kind == "grouped_binary":
                feature["group"] = example.group
            features.append(feature)
    return features


# --------------------------------------------------------------------------------------------------
# ReCoRD: one encoder pass per (query, passage window), every candidate entity scored from it

def passage_tokens(tokenizer, passage, mentions):
    """Token ids of the passage and each mention's token span: [(candidate index, first, end)].

    The text is cut at every mention boundary and the pieces are encoded one by one (as the official code
    encodes word by word), so each mention starts and ends on a token boundary; nested and overlapping
    mentions ("Barack Obama", "Obama") are both kept."""
    cuts = sorted({0, len(passage)} | {m[1] for m in mentions} | {m[2] for m in mentions})
    pieces = [tokenizer.encode(passage[a:b]) for a, b in zip(cuts, cuts[1:])]
    token_at, ids = {cuts[0]: 0}, []
    for cut, piece in zip(cuts[1:], pieces):
        ids.extend(piece)
        token_at[cut] = len(ids)
    spans = [(candidate, token_at[start], token_at[end]) for candidate, start, end in mentions]
    return ids, [span for span in spans if span[2] > span[1]]


def query_tokens(tokenizer, query, budget):
    """The query's ids with [MASK] in place of @placeholder (official), at most `budget` of them, kept around
    the mask."""
    before, after = query.split("@placeholder", 1)
    ids_before, ids_after = tokenizer.encode(before), tokenizer.encode(after)
    ids = ids_before + [tokenizer.mask_id] + ids_after
    if len(ids) <= budget:
        return ids
    first = max(0, min(len(ids_before) - budget // 2, len(ids) - budget))
    return ids[first:first + budget]


def window_starts(num_tokens, window):
    """Start of each window of `window` passage tokens; consecutive windows overlap by half a window, so a
    mention up to half a window long lies whole in at least one of them."""
    stride = max(window // 2, 1)
    starts = [0]
    while starts[-1] + window < num_tokens:
        starts.append(starts[-1] + stride)
    return starts


def entity_features(examples, tokenizer, max_seq_len):
    """ReCoRD features: [CLS] passage window [SEP] query [SEP] per window, with the candidates it mentions.

    A passage longer than the room left by the query is cut into overlapping windows, each with the query.
    A mention lies in every window that holds it whole; one that no window holds whole (longer than half a
    window) is scored in the window where it starts, cut at that window's end. So every mention of every
    candidate is scored somewhere, and no gold answer is lost to the length limit."""
    room = max_seq_len - 3                                   # [CLS] window [SEP] query [SEP]
    if room < 2:
        raise ConfigError(f"max_seq_len {max_seq_len} leaves no room for a passage and a query")
    by_passage = functools.lru_cache(maxsize=64)(lambda text, mentions: passage_tokens(tokenizer, text, mentions))
    features = []
    for index, example in enumerate(examples):
        (passage, query), = example.inputs
        ids, spans = by_passage(passage, example.mentions)
        query_ids = query_tokens(tokenizer, query, room // 2)
        window = room - len(query_ids)
        starts = window_starts(len(ids), window)
        placed = [{} for _ in starts]
        for candidate, first, end in spans:
            homes = [i for i, start in enumerate(starts) if start <= first and end <= start + window]
            if not homes:
                homes = [max(i for i, start in enumerate(starts) if start <= first)]
            for i in homes:
                stop = min(end, starts[i] + window)
                placed[i].setdefault(candidate, set()).update(range(first - starts[i] + 1, stop - starts[i] + 1))
        gold = set(example.answers)
        for number, (start, entities) in enumerate(zip(starts, placed)):
            if not entities:
                continue                                     # nothing to score in this window
            candidates = sorted(entities)
            features.append({
                "input_ids": tokenizer.build_inputs(ids[start:start + window], query_ids),
                "entities": [(c, sorted(entities[c])) for c in candidates],
                "entity_labels": [float(example.candidates[c] in gold) if gold else float(IGNORE_LABEL)
                                  for c in candidates],
                "example_index": index, "window": number})
    return features


def collate(features, pad_id=0):
    """Pad to the longest sequence in the batch -> LongTensors input_ids / attention_mask [B, N]
    (multiple choice: [B, C, N]) and labels [B]. attention_mask is 1 on tokens, 0 on padding."""
    import torch

    if "choices" in features[0]:
        choice_counts = {len(f["choices"]) for f in features}
        if len(choice_counts) != 1:
            raise DataError(f"multiple-choice batch mixes choice counts {sorted(choice_counts)}")
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
    if "entities" in features[0]:
        return {"input_ids": input_ids, "attention_mask": attention_mask, **collate_entities(features)}
    labels = torch.tensor([f["label"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_entities(features):
    """entity_tokens [B, E, S]: each candidate's token positions, 0 (the [CLS] position, never a mention)
    as padding; labels [B, E] float, IGNORE_LABEL on padding and where the split has no gold."""
    import torch

    most_entities = max(len(f["entities"]) for f in features)
    most_tokens = max(len(positions) for f in features for _, positions in f["entities"])
    entity_tokens = torch.zeros((len(features), most_entities, most_tokens), dtype=torch.long)
    labels = torch.full((len(features), most_entities), float(IGNORE_LABEL))
    for row, feature in enumerate(features):
        for column, (_, positions) in enumerate(feature["entities"]):
            entity_tokens[row, column, :len(positions)] = torch.tensor(positions, dtype=torch.long)
        labels[row, :len(feature["entity_labels"])] = torch.tensor(feature["entity_labels"])
    return {"entity_tokens": entity_tokens, "labels": labels}


# --------------------------------------------------------------------------------------------------
# Predictions and scores

def _as_array(logits):
    if hasattr(logits, "detach"):                 # torch tensor
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float64)


def decode(task, examples, features, logits):
    """Model outputs, one row per feature in feature order, -> {example key: prediction}.

    The prediction is a label index (COPA: choice index; MultiRC: 0/1 per answer option), or for
    ReCoRD the text of the best-scoring candidate entity of each query.
    """
    if len(logits) != len(features):
        raise DataError(f"{len(logits)} rows of logits for {len(features)} features")
    if task.kind == "entity_scoring":
        return best_entities(examples, features, logits)
    best = _as_array(logits).argmax(axis=-1)
    return {examples[f["example_index"]].key: int(choice) for f, choice in zip(features, best)}


def best_entities(examples, features, logits):
    """{query key: the text of its best candidate}. A candidate's score is the highest logit it gets in any
    window: the window that holds the sentence the query is about gives the evidence, the others at most
    a weaker mention; averaging them would penalise an entity for being named elsewhere in a long passage.
    Ties go to the candidate named first; a query with no scored candidate gets its first one."""
    scores = {}
    for feature, row in zip(features, logits):
        row = _as_array(row).reshape(-1)
        query = scores.setdefault(feature["example_index"], {})
        for column, (candidate, _) in enumerate(feature["entities"]):
            query[candidate] = max(query.get(candidate, -np.inf), float(row[column]))
    predictions = {}
    for index, example in enumerate(examples):
        query = scores.get(index, {})
        best = max(sorted(query), key=lambda c: query[c]) if query else 0
        predictions[example.key] = example.candidates[best]
    return predictions


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
        raise ConfigError(f"{task.name} is the intermediate task; the SuperGLUE server takes no {task.name} file")
    if not predictions:
        raise DataError(f"{task.name}: no predictions to write")
    path = os.path.join(out_dir, f"{task.name}.jsonl")
    with atomic_file(path) as out:
        for record in task.submission_records(task, predictions):
            out.write(json.dumps(record) + "\n")
    return path


