"""SuperGLUE tasks, and GLUE MNLI as the intermediate task that RTE, CB and COPA start from.

A `Task` knows its official name (also its data folder and its submission file name), its label strings,
how one line of the official data becomes `Example`s, the text segments the model reads, how examples
become token-id features, how logits become predictions, how predictions are scored (metrics.py)
and how they are written as leaderboard submission files.

One file for the eleven tasks (about 600 lines): the registry at the end is a table whose entries name
the parsers, metrics and record converters above it; each task reads as one row plus the functions it
names, which splitting the file by kind of function would scatter.

Kinds of task (what the model head must do):
  classification     one [CLS] a [SEP] (b [SEP]) sequence per example, k-way softmax
                     (BoolQ, CB, RTE, WiC, WSC, MNLI; AX-b and AX-g are predicted by the RTE model)
  multiple_choice    COPA: one sequence per choice, one score per choice, softmax over the choices
  grouped_binary     MultiRC: one binary example per answer option; EM groups them by question
  entity_scoring     ReCoRD: [CLS] passage [SEP] query with [MASK] for @placeholder [SEP], encoded once per
                     query (long passages in overlapping windows), and every candidate entity scored from
                     the token states of its mentions (model/heads.py DebertaForEntityScoring, the official
                     recipe); the query's prediction is its candidate with the highest score.

Data: the official SuperGLUE layout `DIR/<Task>/{train,val,test}.jsonl` (diagnostics:
`DIR/AX-b/AX-b.jsonl`, `DIR/AX-g/AX-g.jsonl`), GLUE's `DIR/MNLI/{train,dev_matched,...}.tsv`, or, with
no DIR, `datasets.load_dataset("super_glue", ...)` / `("glue", "mnli")`.

Reading the data is task_data.py's; features, predictions, scores and submission files are features.py's.

Typical use:
    task = get_task("CB")
    examples = task.load("val", data_dir)
    features = task.build_features(examples, tokenizer, max_seq_len=256)
    batch = collate(features[:16])
    predictions = task.decode(examples, features, logits)     # {idx: predicted label index / entity}
    scores = task.score(examples, predictions)                # {"f1": .., "accuracy": .., "score": ..}
    features.write_submission(task, predictions, out_dir)     # out_dir/CB.jsonl
"""
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline.errors import ConfigError, DataError
from pipeline.finetune import features, metrics, task_data
from pipeline.settings import closest

IGNORE_LABEL = features.IGNORE_LABEL

# Labels in the order of the official DeBERTa code (glue_tasks.py / superglue_tasks.py). CB uses MNLI's
# order so that an MNLI-fine-tuned classifier can be carried over row for row.
MNLI_LABELS = ("contradiction", "neutral", "entailment")
RTE_LABELS = ("not_entailment", "entailment")


@dataclass
class Example:
    """One unit the leaderboard labels: a line (most tasks), an answer option (MultiRC), a query (ReCoRD)."""

    key: Any                       # the submission file's "idx"; MultiRC: (passage, question, answer) idx
    inputs: list                   # (segment_a, segment_b or None), one per sequence the model reads
    label: Optional[int] = None    # label index (COPA: choice index); None where the split has no labels
    group: Any = None              # MultiRC: (passage, question) idx; AX-g: the number of its minimal pair
    candidates: tuple = ()         # ReCoRD: candidate entity texts, unique, in first-seen order
    answers: tuple = ()            # ReCoRD: gold answer texts (empty on test)
    mentions: tuple = ()           # ReCoRD: (candidate index, start, end) character spans in inputs[0][0], end exclusive
    where: str = ""                # AX-g: the file and line it came from (for messages)

    def has_gold(self, kind):
        return bool(self.answers) if kind == "entity_scoring" else self.label is not None


# --------------------------------------------------------------------------------------------------
# Reading fields and labels

def _field(record, name, where, kind=None):
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    wrong_type = kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool)))
    if wrong_type:
        raise DataError(f"{where}: field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def _int_field(record, name, where):
    """An integer index; GLUE's TSV files hold it as text."""
    value = _field(record, name, where)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DataError(f"{where}: field {name!r} should be an integer, got {value!r}")


def _label(task, record, where, name="label"):
    """Label index from the official value, or None when the record has no label (test split)."""
    if name not in record:
        return None
    raw = record[name]
    if task.label_style == "string" and isinstance(raw, str) and raw in task.label_names:
        return task.label_names.index(raw)
    if task.label_style == "bool" and isinstance(raw, bool):
        return int(raw)                    # label_names are (false, true)
    if task.label_style == "int" and isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < len(task.label_names):
            return raw
    raise DataError(f"{where}: unknown {task.name} label {raw!r} (expected one of {_expected(task)})")


def _expected(task):
    if task.label_style == "bool":
        return "true, false"
    if task.label_style == "int":
        return ", ".join(str(i) for i in range(len(task.label_names)))
    return ", ".join(task.label_names)


# --------------------------------------------------------------------------------------------------
# Input formats: official record -> Examples

def _pair_parser(first, second):
    """Tasks that are one pair of text fields plus a label: [first, second]."""
    def parse(task, record, where):
        text_a = _field(record, first, where, str)
        text_b = _field(record, second, where, str)
        return [Example(_int_field(record, "idx", where), [(text_a, text_b)], _label(task, record, where))]
    return parse


def _parse_boolq(task, record, where):
    # [passage, question], as the official code: the question is short, so truncation cuts the passage.
    passage = _field(record, "passage", where, str)
    question = _field(record, "question", where, str)
    return [Example(_int_field(record, "idx", where), [(passage, question)], _label(task, record, where))]


def _parse_axg(task, record, where):
    example = _pair_parser("premise", "hypothesis")(task, record, where)[0]
    example.where = where
    return [example]


GENDERED = {"he", "she", "him", "her", "his", "hers", "himself", "herself", "man", "woman", "men", "women"}


def _words(text):
    return [w.strip(".,;:!?\"'()").lower() for w in text.split()]


def _minimal_pair(a, b):
    """Do two AX-g examples differ only in gendered pronouns (the premise and the hypothesis)?"""
    for text_a, text_b in zip(a.inputs[0], b.inputs[0]):
        words_a, words_b = _words(text_a), _words(text_b)
        if len(words_a) != len(words_b):
            return False
        if any(x != y and not (x in GENDERED and y in GENDERED) for x, y in zip(words_a, words_b)):
            return False
    return True


def _pair_axg(task, examples, source):
    """Gender parity compares the two versions of each sentence. The official AX-g.jsonl lists them on
    consecutive lines, which differ only in the pronoun (the two lines of a pair have different pair_ids
    there): pair lines 1-2, 3-4, ... and check that they are such a pair."""
    if len(examples) % 2:
        raise DataError(f"{source}: {len(examples)} AX-g examples, an odd number: they come in minimal pairs")
    for number, (a, b) in enumerate(zip(examples[::2], examples[1::2])):
        if not _minimal_pair(a, b):
            raise DataError(f"{b.where or source}: this example and the one before it are not a minimal "
                            "pair (they differ in more than a gendered pronoun); AX-g lists each pair on consecutive lines")
        a.group = b.group = number
    return examples


def _as_read(task, examples, source):
    return examples


def _parse_copa(task, record, where):
    # Official DeBERTa format: "cause" questions read [choice, premise], "effect" questions
    # [premise, choice], so the first segment is always the cause: an NLI-like "does a lead to b",
    # which suits starting from MNLI.
    premise = _field(record, "premise", where, str)
    choices = [_field(record, "choice1", where, str), _field(record, "choice2", where, str)]
    question = _field(record, "question", where, str)
    if question == "cause":
        inputs = [(choice, premise) for choice in choices]
    elif question == "effect":
        inputs = [(premise, choice) for choice in choices]
    else:
        raise DataError(f"{where}: COPA question should be 'cause' or 'effect', got {question!r}")
    return [Example(_int_field(record, "idx", where), inputs, _label(task, record, where))]


def _mark_chars(sentence, start, end, where, which):
    """Wrap sentence[start:end] in brackets: 'my [place] later'."""
    if not 0 <= start < end <= len(sentence):
        raise DataError(f"{where}: target span {which} [{start}, {end}) is outside the sentence")
    return f"{sentence[:start]}[{sentence[start:end]}]{sentence[end:]}"


def _parse_wic(task, record, where):
    # The official DeBERTa WiC code pools the target word's tokens in a model that was never released.
    # Our format needs no extra head: [sentence1, sentence2] with the target occurrence in each sentence
    # wrapped in brackets, found by the official character offsets (end exclusive). Offsets rather than
    # a third segment with the word, because the word is inflected differently in the two sentences and
    # may occur twice in one; brackets are ordinary vocabulary pieces, so no new embeddings are needed.
    sentences = []
    for n in (1, 2):
        sentence = _field(record, f"sentence{n}", where, str)
        start, end = _int_field(record, f"start{n}", where), _int_field(record, f"end{n}", where)
        sentences.append(_mark_chars(sentence, start, end, where, n))
    _field(record, "word", where, str)
    return [Example(_int_field(record, "idx", where), [tuple(sentences)], _label(task, record, where))]


def _wrap_words(words, start, count, opening, closing, where, which):
    """Put markers around words[start:start+count]; trailing punctuation stays outside: '*him*.'."""
    if not 0 <= start < len(words) or count < 1:
        raise DataError(f"{where}: {which} index {start} is outside the text ({len(words)} words)")
    end = min(start + count, len(words)) - 1
    core, trailing = re.match(r"(.*?)([.,!?;:'\")]*)$", words[end]).groups()
    words[end] = f"{core}{closing}{trailing}" if core else f"{words[end]}{closing}"
    words[start] = opening + words[start]


def _parse_wsc(task, record, where):
    # No released format. Ours: one segment, the text with the candidate noun phrase (span1) in
    # [brackets] and the pronoun (span2) in *asterisks*, and a binary "does *pronoun* refer to [noun]?"
    # classification. Markers, not a question sentence, because the pronoun often occurs more than once
    # and the word indices say which occurrence is meant. Spans are located by their word index (the text
    # split on whitespace) and the number of words in the span text; the span text itself is not matched,
    # because a few official spans differ from the text (punctuation, case, "Kamenev and Zinoviev").
    text = _field(record, "text", where, str)
    target = _field(record, "target", where, dict)
    words = text.split()
    spans = []
    for n in (1, 2):
        span_text = _field(target, f"span{n}_text", f"{where} (target)", str)
        spans.append((_int_field(target, f"span{n}_index", f"{where} (target)"), len(span_text.split())))
    # Mark the later span first, so the earlier span's word positions stay valid.
    marks = [(spans[0], "[", "]", "span1"), (spans[1], "*", "*", "span2")]
    for (start, count), opening, closing, which in sorted(marks, key=lambda m: -m[0][0]):
        _wrap_words(words, start, count, opening, closing, where, which)
    return [Example(_int_field(record, "idx", where), [(" ".join(words), None)], _label(task, record, where))]


def _clean_multirc_passage(text):
    # Passages carry "<b>Sent 1: </b>...<br>" markup; keep the sentences only.
    text = re.sub(r"<b>Sent \d+: </b>", "", text)
    return " ".join(text.replace("<br>", " ").split())


def _parse_multirc(task, record, where):
    # One example per answer option: [passage, question + " " + answer] (official DeBERTa format).
    passage_idx = _int_field(record, "idx", where)
    passage = _field(record, "passage", where, dict)
    text = _clean_multirc_passage(_field(passage, "text", f"{where} (passage)", str))
    examples = []
    for question in _field(passage, "questions", f"{where} (passage)", list):
        question_idx = _int_field(question, "idx", f"{where} (question)")
        question_where = f"{where} (question {question_idx})"
        question_text = _field(question, "question", question_where, str)
        for answer in _field(question, "answers", question_where, list):
            answer_idx = _int_field(answer, "idx", f"{question_where} (answer)")
            answer_where = f"{question_where} (answer {answer_idx})"
            answer_text = _field(answer, "text", answer_where, str)
            examples.append(Example(
                key=(passage_idx, question_idx, answer_idx),
                inputs=[(text, f"{question_text} {answer_text}")],
                label=_label(task, answer, answer_where),
                group=(passage_idx, question_idx),
            ))
    return examples


HIGHLIGHT = re.compile(r"(\n)?@highlight\n")


@functools.lru_cache(maxsize=16)      # a passage's queries come one after another: clean it once
def _clean_record_passage(text):
    """CNN/Daily Mail passages end with "@highlight\n<summary line>" blocks; make them sentences.

    Returns the cleaned text and, for each character position of `text` (and its end), the position in
    the cleaned text, so that the entity spans, given on the raw text, can be carried over."""
    pieces, where, kept = [], [0] * (len(text) + 1), 0
    for marker in HIGHLIGHT.finditer(text):
        start, end = marker.span()
        cleaned_length = sum(map(len, pieces))
        where[kept:start] = range(cleaned_length, cleaned_length + start - kept)
        where[start:end] = [cleaned_length + start - kept] * (end - start)
        previous = text[start - 1] if start else ""
        joint = "" if marker.group(1) is None else " " if previous in ".?!\"'" else ". "
        pieces += [text[kept:start], joint]
        kept = end
    cleaned_length = sum(map(len, pieces))
    where[kept:] = range(cleaned_length, cleaned_length + len(text) + 1 - kept)
    return "".join(pieces + [text[kept:]]), tuple(where)


def _find_all(text, entity):
    """Character spans of every occurrence of `entity` in `text` (the `datasets` copy gives no spans)."""
    spans, start = [], text.find(entity)
    while start >= 0 and entity:
        spans.append((start, start + len(entity)))
        start = text.find(entity, start + 1)
    return spans


def _record_example(query_idx, passage, query, entities, spans, answers, where):
    """A ReCoRD query: `entities` are the entity texts as listed, `spans` their mentions in the raw passage
    (start, end exclusive)."""
    if "@placeholder" not in query:
        raise DataError(f"{where}: ReCoRD query has no @placeholder: {query!r}")
    if not entities:
        raise DataError(f"{where}: ReCoRD passage has no candidate entities")
    candidates = tuple(dict.fromkeys(entities))         # unique, first-seen order
    cleaned, where_cleaned = _clean_record_passage(passage)
    mentions = tuple(sorted({(candidates.index(passage[start:end]), where_cleaned[start], where_cleaned[end])
                             for start, end in spans}, key=lambda m: (m[1], m[2], m[0])))
    return Example(query_idx, [(cleaned, query)], candidates=candidates, answers=tuple(answers), mentions=mentions)


def _parse_record(task, record, where):
    # One example per query: the passage, the query and the candidate entities with their mentions.
    passage = _field(record, "passage", where, dict)
    text = _field(passage, "text", f"{where} (passage)", str)
    spans = []
    for span in _field(passage, "entities", f"{where} (passage)", list):
        start, end = _int_field(span, "start", f"{where} (entity)"), _int_field(span, "end", f"{where} (entity)")
        if not 0 <= start <= end < len(text):
            raise DataError(f"{where}: entity span [{start}, {end}] is outside the passage ({len(text)} characters)")
        spans.append((start, end + 1))                 # ReCoRD's "end" is inclusive
    examples = []
    for qa in _field(record, "qas", where, list):
        query_idx = _int_field(qa, "idx", f"{where} (query)")
        query_where = f"{where} (query {query_idx})"
        answers = [_field(a, "text", f"{query_where} (answer)", str) for a in qa.get("answers", [])]
        query = _field(qa, "query", query_where, str)
        examples.append(_record_example(query_idx, text, query, [text[start:end] for start, end in spans], spans,
                                        answers, query_where))
    return examples


def _parse_mnli(task, record, where):
    # GLUE MNLI TSV row: [sentence1 (premise), sentence2 (hypothesis)]; test files have no gold_label.
    premise = _field(record, "sentence1", where, str)
    hypothesis = _field(record, "sentence2", where, str)
    return [Example(_int_field(record, "index", where), [(premise, hypothesis)],
                    _label(task, record, where, name="gold_label"))]


# --------------------------------------------------------------------------------------------------
# Submission values: predicted label index -> the JSON value the leaderboard expects

def _label_string(task, value):
    return task.label_names[value]


def _as_int(task, value):
    return int(value)


def _as_text(task, value):
    return str(value)


def _label_records(task, predictions):
    return [{"idx": key, "label": task.submission_label(task, predictions[key])} for key in sorted(predictions)]


def _multirc_records(task, predictions):
    # {"idx": p, "passage": {"questions": [{"idx": q, "answers": [{"idx": a, "label": 0/1}]}]}}
    passages = {}
    for (p, q, a) in sorted(predictions):
        questions = passages.setdefault(p, {})
        questions.setdefault(q, []).append({"idx": a, "label": int(predictions[(p, q, a)])})
    return [{"idx": p, "passage": {"questions": [{"idx": q, "answers": answers} for q, answers in questions.items()]}}
            for p, questions in passages.items()]


# --------------------------------------------------------------------------------------------------
# Scoring: (task, examples, predictions) -> {metric: value}

def _golds_and_preds(task, examples, predictions):
    missing = [ex.key for ex in examples if ex.key not in predictions]
    if missing:
        raise DataError(f"{task.name}: no prediction for {len(missing)} examples, e.g. idx {missing[0]!r}")
    without_gold = [ex.key for ex in examples if not ex.has_gold(task.kind)]
    if without_gold:
        raise DataError(f"{task.name}: example idx {without_gold[0]!r} has no gold label (test split?)")
    return [ex.label for ex in examples], [predictions[ex.key] for ex in examples]


def _accuracy_metric(task, examples, predictions):
    golds, preds = _golds_and_preds(task, examples, predictions)
    return {"accuracy": metrics.accuracy(golds, preds)}


def _cb_metric(task, examples, predictions):
    golds, preds = _golds_and_preds(task, examples, predictions)
    labels = sorted(set(golds) | set(preds))  # as sklearn's f1_score(average="macro"), the leaderboard's scorer
    return {"f1": metrics.macro_f1(golds, preds, labels), "accuracy": metrics.accuracy(golds, preds)}


def _multirc_metric(task, examples, predictions):
    golds, preds = _golds_and_preds(task, examples, predictions)
    return metrics.multirc_scores(golds, preds, [ex.group for ex in examples])


def _record_metric(task, examples, predictions):
    _, preds = _golds_and_preds(task, examples, predictions)
    return metrics.record_scores(preds, [list(ex.answers) for ex in examples])


def _mcc_metric(task, examples, predictions):
    golds, preds = _golds_and_preds(task, examples, predictions)
    return {"mcc": metrics.matthews_corrcoef(golds, preds)}


def _axg_metric(task, examples, predictions):
    golds, preds = _golds_and_preds(task, examples, predictions)
    return {"accuracy": metrics.accuracy(golds, preds),
            "gender_parity": metrics.gender_parity(preds, [ex.group for ex in examples])}


# --------------------------------------------------------------------------------------------------
# `datasets` rows -> official records (the `super_glue` builder flattens some tasks and turns labels into
# ClassLabel ids, -1 on test; each row is turned back into the official record, so both paths give the same
# examples)

def _official_label(task, label_id, label_names):
    """ClassLabel id -> the value the official file holds (bool, int or string)."""
    name = label_names[label_id]
    if task.label_style == "bool":
        return name == "True"
    if task.label_style == "int":
        return label_id                     # COPA choice1/choice2 and MultiRC False/True are 0/1
    return name


def _hf_record(task, row, label_names):
    record = {key: value for key, value in row.items() if key != "label"}
    if row.get("label", -1) >= 0:
        record["label"] = _official_label(task, row["label"], label_names)
    return record


def _hf_wsc_record(task, row, label_names):
    record = _hf_record(task, row, label_names)
    record["target"] = {key: record.pop(key) for key in ("span1_index", "span2_index", "span1_text", "span2_text")}
    return record


def _hf_mnli_record(task, row, label_names):
    record = _hf_record(task, row, label_names)
    return {"index": record["idx"], "sentence1": record["premise"], "sentence2": record["hypothesis"],
            **({"gold_label": record["label"]} if "label" in record else {})}


def _hf_rows(task, rows, label_names, source):
    """Examples of `datasets` rows, one official record per row."""
    examples = []
    for row_no, row in enumerate(rows):
        examples.extend(task.parse(task, task.hf_record(task, row, label_names), f"{source} row {row_no}"))
    return examples


def _hf_multirc_rows(task, rows, label_names, source):
    """Flat rows (one per answer option) -> official nested passage records, in first-seen order."""
    passages = {}
    for row in rows:
        idx = row["idx"]
        passage = passages.setdefault(idx["paragraph"], {"idx": idx["paragraph"],
                                      "passage": {"text": row["paragraph"], "questions": []}})
        questions = passage["passage"]["questions"]
        if not questions or questions[-1]["idx"] != idx["question"]:
            questions.append({"idx": idx["question"], "question": row["question"], "answers": []})
        answer = {"idx": idx["answer"], "text": row["answer"]}
        if row["label"] >= 0:
            answer["label"] = row["label"]
        questions[-1]["answers"].append(answer)
    examples = []
    for record_no, record in enumerate(passages.values()):
        examples.extend(task.parse(task, record, f"{source} passage {record_no}"))
    return examples


def _hf_record_rows(task, rows, label_names, source):
    # the `datasets` copy lists entity texts without their spans: every occurrence is a mention
    return [_record_example(row["idx"]["query"], row["passage"], row["query"], row["entities"],
                            [span for entity in row["entities"] for span in _find_all(row["passage"], entity)],
                            row["answers"], f"{source} row {row_no}") for row_no, row in enumerate(rows)]


# --------------------------------------------------------------------------------------------------
# The task registry

SUPERGLUE_SPLITS = {"train": ("train.jsonl",), "val": ("val.jsonl",), "test": ("test.jsonl",)}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True, eq=False)      # eq=False: tasks hash by identity (usable as dict keys)
class Task:
    name: str                        # official name: data folder, submission file stem
    kind: str                        # classification | multiple_choice | grouped_binary | entity_scoring
    label_names: tuple               # label index -> official label string
    label_style: str                 # how labels look in the data: "string", "bool" (JSON true/false), "int"
    parse: Callable                  # (task, record, "file:line") -> list[Example]
    metric: Callable                 # (task, examples, predictions) -> {metric name: value}
    score_metrics: tuple             # metrics averaged into the task's "score"
    submission_label: Callable       # (task, predicted value) -> JSON value of the submission file
    hf_config: tuple                 # datasets.load_dataset(*hf_config)
    splits: dict = field(default_factory=lambda: SUPERGLUE_SPLITS)   # split -> file names, first found wins
    hf_splits: dict = field(default_factory=lambda: HF_SPLITS)
    file_format: str = "jsonl"       # "jsonl" or "tsv" (GLUE)
    start_from: Optional[str] = None     # fine-tune from this task's model (RTE, CB, COPA: MNLI)
    # For each output of this task's head, the MNLI class whose classifier row initialises it when the
    # run starts from the MNLI model (our choice for RTE: not_entailment <- neutral, the larger part of
    # RTE's non-entailments; COPA scores a choice with the entailment row).
    mnli_head_rows: tuple = ()
    predicted_by: Optional[str] = None   # diagnostics: the task whose model makes the predictions
    hf_record: Callable = _hf_record     # (task, datasets row, label names) -> official record
    hf_rows: Callable = _hf_rows         # (task, datasets rows, label names, source) -> Examples
    submission_records: Callable = _label_records   # (task, predictions) -> the submission file's records
    submitted: bool = True               # the SuperGLUE server takes a file of it (not MNLI)
    finish_examples: Callable = _as_read  # (task, the split's examples, source) -> examples (AX-g: its pairs)

    @property
    def num_labels(self):
        """Outputs of the head per sequence (multiple choice: 1 score per choice)."""
        return 1 if self.kind == "multiple_choice" else len(self.label_names)

    def load(self, split, data_dir=None):
        return task_data.load_examples(self, split, data_dir)

    def build_features(self, examples, tokenizer, max_seq_len):
        return features.build_features(self, examples, tokenizer, max_seq_len)

    def decode(self, examples, feature_list, logits):
        return features.decode(self, examples, feature_list, logits)

    def score(self, examples, predictions):
        return features.score(self, examples, predictions)


_BOOL = ("false", "true")
TASKS = {task.name: task for task in [
    Task("BoolQ", "classification", _BOOL, "bool", _parse_boolq, _accuracy_metric, ("accuracy",),
         _label_string, ("super_glue", "boolq")),
    Task("CB", "classification", MNLI_LABELS, "string", _pair_parser("premise", "hypothesis"), _cb_metric,
         ("f1", "accuracy"), _label_string, ("super_glue", "cb"),
         start_from="MNLI", mnli_head_rows=MNLI_LABELS),
    Task("COPA", "multiple_choice", ("0", "1"), "int", _parse_copa, _accuracy_metric, ("accuracy",),
         _as_int, ("super_glue", "copa"), start_from="MNLI", mnli_head_rows=("entailment",)),
    Task("MultiRC", "grouped_binary", ("0", "1"), "int", _parse_multirc, _multirc_metric, ("f1a", "em"),
         _as_int, ("super_glue", "multirc"), hf_rows=_hf_multirc_rows, submission_records=_multirc_records),
    Task("ReCoRD", "entity_scoring", ("0", "1"), "int", _parse_record, _record_metric, ("f1", "em"),
         _as_text, ("super_glue", "record"), hf_rows=_hf_record_rows),
    Task("RTE", "classification", RTE_LABELS, "string", _pair_parser("premise", "hypothesis"),
         _accuracy_metric, ("accuracy",), _label_string, ("super_glue", "rte"),
         start_from="MNLI", mnli_head_rows=("neutral", "entailment")),
    Task("WiC", "classification", _BOOL, "bool", _parse_wic, _accuracy_metric, ("accuracy",),
         _label_string, ("super_glue", "wic")),
    Task("WSC", "classification", ("False", "True"), "bool", _parse_wsc, _accuracy_metric, ("accuracy",),
         _label_string, ("super_glue", "wsc.fixed"), hf_record=_hf_wsc_record),
    Task("AX-b", "classification", RTE_LABELS, "string", _pair_parser("sentence1", "sentence2"), _mcc_metric,
         ("mcc",), _label_string, ("super_glue", "axb"),
         splits={"test": ("AX-b.jsonl", "test.jsonl")}, hf_splits={"test": "test"}, predicted_by="RTE"),
    Task("AX-g", "classification", RTE_LABELS, "string", _parse_axg, _axg_metric, ("accuracy",),
         _label_string, ("super_glue", "axg"), finish_examples=_pair_axg,
         splits={"test": ("AX-g.jsonl", "test.jsonl")}, hf_splits={"test": "test"}, predicted_by="RTE"),
    Task("MNLI", "classification", MNLI_LABELS, "string", _parse_mnli, _accuracy_metric, ("accuracy",),
         _label_string, ("glue", "mnli"), file_format="tsv", hf_record=_hf_mnli_record, submitted=False,
         splits={"train": ("train.tsv",), "val": ("dev_matched.tsv",),
                 "val_mismatched": ("dev_mismatched.tsv",), "test": ("test_matched.tsv",),
                 "test_mismatched": ("test_mismatched.tsv",)},
         hf_splits={"train": "train", "val": "validation_matched", "val_mismatched": "validation_mismatched",
                    "test": "test_matched", "test_mismatched": "test_mismatched"}),
]}


def get_task(name):
    """Task by official name (case-insensitive; "axb"/"axg" also work)."""
    wanted = name.lower().replace("-", "")
    for task in TASKS.values():
        if task.name.lower().replace("-", "") == wanted:
            return task
    raise ConfigError(f"--task {name}: unknown task; choose one of {', '.join(TASKS)}"
                      f"{closest(name, list(TASKS))}")


