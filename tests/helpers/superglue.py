"""Synthetic SuperGLUE data in the official jsonl layouts (DIR/<Task>/<split>.jsonl), for the tests, the
benches and the demo. Each task is learnable: a keyword in the text decides the label.

  write_cb_like, write_record_like   small tasks for the tests: a fixed filler vocabulary, a few words each
  write_tasks                         BoolQ, CB, RTE, WiC, WSC and ReCoRD at the lengths of the real tasks
                                      (bench/finetune_*.py): made-up words with Zipf frequencies, words per
                                      example lognormal through the 10th and 90th percentiles measured on the
                                      official training sets (WORDS)
  boolq_from_corpus                   the demo's BoolQ-format task from corpus paragraphs ("does the passage
                                      say return?")
"""
import json
import math
import os
import random

# Words per example (10th, 50th, 90th percentile) measured on the official SuperGLUE training sets; MultiRC per
# answer row, ReCoRD per query.
WORDS = {"BoolQ": (61, 114, 201), "CB": (38, 59, 104), "RTE": (19, 44, 108), "MultiRC": (159, 303, 387),
         "ReCoRD": (161, 184, 218), "WiC": (9, 14, 26), "WSC": (12, 20, 46), "COPA": (9, 12, 15)}
Z90 = 1.2815515655446004  # the standard normal's 90th percentile
CB_KEYWORDS = {"entailment": "certainly", "contradiction": "never", "neutral": "perhaps"}
RTE_KEYWORDS = {"entailment": "truly", "not_entailment": "falsely"}


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the tests' tasks (small, fixed filler)
FILLER = ("the function returns a list of values from the file and the object is used by the module "
          "when a string or number is given to the method of this class").split()


def write_cb_like(path, count, seed, labelled=True):
    """Official CB jsonl lines; the hypothesis holds exactly one keyword, which decides the label."""
    rng, records = random.Random(seed), []
    for idx in range(count):
        label = rng.choice(sorted(CB_KEYWORDS))
        premise = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 10)))
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), CB_KEYWORDS[label])
        records.append({"premise": premise, "hypothesis": " ".join(words), "idx": idx})
        if labelled:
            records[-1]["label"] = label
    write_jsonl(path, records)


NAMES = ("Oslo", "Paris", "Lima", "Cairo", "Delhi", "Quito", "Rome", "Tokyo", "Berlin", "Madrid", "Dakar", "Hanoi")


def write_record_like(path, count, seed, labelled=True):
    """Official ReCoRD jsonl lines, one query each: 3-5 candidate entities in a passage of filler; the one
    named right after "certainly" is the answer. Passages run up to ~40 words, so a short max_seq_len needs
    several windows."""
    rng, records = random.Random(seed), []
    for idx in range(count):
        names = rng.sample(NAMES, rng.randint(3, 5))
        answer = rng.choice(names)
        words, spans = [], []
        for name in names:
            words += [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
            words += ["certainly"] if name == answer else [rng.choice(FILLER)]
            start = len(" ".join(words + [""]))
            words.append(name)
            spans.append({"start": start, "end": start + len(name) - 1})
        qa = {"idx": idx, "query": "they chose @placeholder"}
        if labelled:
            qa["answers"] = [dict(spans[names.index(answer)], text=answer)]
        records.append({"idx": idx, "passage": {"text": " ".join(words), "entities": spans}, "qas": [qa]})
    write_jsonl(path, records)


# ---------------------------------------------------------------- synthetic text
SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "an", "er", "is", "ol"))


class Vocabulary:
    """Made-up words ("zolaban", "lepi") with Zipf frequencies (the keywords are English words)."""

    def __init__(self, seed, size=6000):
        rng = random.Random(seed)
        words = set()
        while len(words) < size:
            words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        weights = [1.0 / (rank + 1) for rank in range(size)]
        self.cum = [sum(weights[:1])]
        for w in weights[1:]:
            self.cum.append(self.cum[-1] + w)

    def take(self, rng, n):
        return rng.choices(self.words, cum_weights=self.cum, k=max(n, 0))

    def sentence(self, rng, n):
        return " ".join(self.take(rng, n))

    def name(self, rng):
        return " ".join(w.capitalize() for w in rng.sample(self.words[:3000], rng.choice((1, 2))))


def lognormal_words(rng, task, low=3):
    """Words of one example: lognormal through the task's measured 10th and 90th percentiles."""
    p10, _, p90 = WORDS[task]
    mu, sigma = (math.log(p10) + math.log(p90)) / 2, (math.log(p90) - math.log(p10)) / (2 * Z90)
    return max(low, round(rng.lognormvariate(mu, sigma)))


def with_keyword(words, keyword, rng):
    words = list(words)
    words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


# ---------------------------------------------------------------- SuperGLUE records (official layouts)
def boolq_record(vocab, rng, idx):
    n = lognormal_words(rng, "BoolQ", low=6)
    q = max(3, min(9, n // 8))
    label = rng.random() < 0.6
    question = with_keyword(vocab.take(rng, q - 1), "indeed" if label else "hardly", rng)
    return {"question": question, "passage": vocab.sentence(rng, n - q), "idx": idx, "label": label}


def pair_record(vocab, rng, idx, task, keywords):
    n = lognormal_words(rng, task, low=5)
    h = max(3, n // 5)
    label = rng.choice(sorted(keywords))
    return {"premise": vocab.sentence(rng, n - h), "hypothesis": with_keyword(vocab.take(rng, h - 1), keywords[label], rng),
            "idx": idx, "label": label}


def wic_record(vocab, rng, idx):
    n = lognormal_words(rng, "WiC", low=6)
    word, label = rng.choice(vocab.words[:2000]), rng.random() < 0.5
    record = {"word": word, "idx": idx, "label": label}
    for k, count in ((1, n // 2), (2, n - n // 2)):
        words = vocab.take(rng, count - 1 - (k == 1))
        if k == 1:
            words.insert(rng.randint(0, len(words)), "alike" if label else "apart")
        at = rng.randint(0, len(words))
        start = len(" ".join(words[:at])) + (1 if at else 0)
        words.insert(at, word)
        record.update({f"sentence{k}": " ".join(words), f"start{k}": start, f"end{k}": start + len(word)})
    return record


def wsc_record(vocab, rng, idx):
    n = lognormal_words(rng, "WSC", low=6)
    label = rng.random() < 0.5
    noun = vocab.name(rng)
    words = vocab.take(rng, n - 2 - len(noun.split()))
    words.insert(rng.randint(0, len(words)), "because" if label else "although")
    first = rng.randint(0, len(words) // 2)
    words[first:first] = noun.split()
    pronoun_at = rng.randint(first + len(noun.split()), len(words))
    words.insert(pronoun_at, rng.choice(("he", "she", "it")))
    return {"text": " ".join(words), "idx": idx, "label": label,
            "target": {"span1_index": first, "span1_text": noun, "span2_index": pronoun_at,
                       "span2_text": words[pronoun_at]}}


RECORDS = {"BoolQ": boolq_record, "WiC": wic_record, "WSC": wsc_record,
           "CB": lambda v, r, i: pair_record(v, r, i, "CB", CB_KEYWORDS),
           "RTE": lambda v, r, i: pair_record(v, r, i, "RTE", RTE_KEYWORDS)}


class PassageBuilder:
    """Text built piece by piece, remembering the character span of every entity mention."""

    def __init__(self):
        self.text, self.mentions = "", []

    def add(self, piece, entity=False, joint=" "):
        if self.text:
            self.text += joint
        if entity:
            self.mentions.append((piece, len(self.text), len(self.text) + len(piece) - 1))  # inclusive end
        self.text += piece


def candidate_count(rng):
    """Candidate entities of a passage: lognormal with median 12 and sigma 0.35 (mean about 12.7), 2 to 23."""
    return min(23, max(2, round(rng.lognormvariate(math.log(12), 0.35))))


def record_record(vocab, rng, idx, queries=1):
    """One official ReCoRD line: a passage with its entities and `queries` queries. The answer is the entity
    that follows the word "champion" in the passage; the query says "champion" too. Words: passage and query
    together, as measured."""
    count = candidate_count(rng)
    entities = list(dict.fromkeys(vocab.name(rng) for _ in range(3 * count)))[:count]
    answer = rng.choice(entities)
    query_words = [rng.randint(10, 25) for _ in range(queries)]
    highlights = [(rng.choice(entities), vocab.sentence(rng, rng.randint(6, 12))) for _ in range(3)]
    mentions = entities + rng.sample(entities, k=len(entities) // 3)  # every entity, a third of them twice
    fixed = sum(1 + len(e.split()) + len(h.split()) for e, h in highlights) + sum(len(e.split()) for e in mentions) + 1
    body = [(w, False) for w in vocab.take(rng, lognormal_words(rng, "ReCoRD", low=80) - query_words[0] - fixed)]
    for entity in mentions:
        body.insert(rng.randint(0, len(body)), (entity, True))
    at = next(i for i, (piece, is_entity) in enumerate(body) if piece == answer and is_entity)
    body.insert(at, ("champion", False))
    passage = PassageBuilder()
    for piece, is_entity in body:
        passage.add(piece, is_entity)
    passage.text += "."
    for entity, line in highlights:  # "@highlight" lines, each naming an entity
        passage.add("@highlight", joint="\n")
        passage.add(entity, entity=True, joint="\n")
        passage.add(line)
    answer_spans = [m for m in passage.mentions if m[0] == answer]
    qas = []
    for q, words in enumerate(query_words):
        query = with_keyword(vocab.take(rng, words - 2) + ["@placeholder"], "champion", rng)
        qas.append({"query": query, "idx": idx * 10 + q,
                    "answers": [{"start": s, "end": e, "text": t} for t, s, e in answer_spans[:1]]})
    return {"source": "synthetic", "idx": idx, "qas": qas,
            "passage": {"text": passage.text, "entities": [{"start": s, "end": e} for _, s, e in passage.mentions]}}


def write_tasks(data_dir, tasks, train, val, seed):
    """DIR/<Task>/{train,val}.jsonl; returns the text lines the tokenizer is trained on."""
    vocab, lines = Vocabulary(seed), []
    for task in tasks:
        for s, (split, count) in enumerate((("train", train), ("val", val))):
            rng = random.Random(f"{seed} {task} {s}")  # a task's data do not depend on the other tasks chosen
            if task == "ReCoRD":
                records = [record_record(vocab, rng, i) for i in range(count)]
                lines += [r["passage"]["text"].replace("\n", " ") for r in records]
                lines += [qa["query"] for r in records for qa in r["qas"]]
            else:
                records = [RECORDS[task](vocab, rng, i) for i in range(count)]
                lines += [" ".join(v for k, v in r.items() if isinstance(v, str)) for r in records]
            write_jsonl(os.path.join(data_dir, task, f"{split}.jsonl"), records)
    rng = random.Random(seed)  # plus plain text, so that a small task still gives the vocabulary its pieces
    lines += [vocab.sentence(rng, 50) for _ in range(4000)]
    return lines


# ---------------------------------------------------------------- the demo's task
# a keyword question the tiny model can learn: is the word in the passage?
KEYWORD = "return"


def boolq_from_corpus(corpus_dir, out_dir, seed=0):
    """A BoolQ-format task (official jsonl fields) from corpus paragraphs: "does it mention KEYWORD?"."""
    passages = []
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name), encoding="utf-8") as f:
            passages += [line.strip()[:240] for line in f if 80 < len(line.strip())]  # fits 128 tokens
    rng = random.Random(seed)
    rng.shuffle(passages)
    with_word = [p for p in passages if f" {KEYWORD} " in p][:300]
    without = [p for p in passages if KEYWORD not in p][:300]
    rows = [(p, True) for p in with_word] + [(p, False) for p in without]
    rng.shuffle(rows)
    splits = {"train": rows[:400], "val": rows[400:500], "test": rows[500:600]}
    for split, items in splits.items():
        rows = [{"idx": idx, "question": f"does the passage say {KEYWORD}", "passage": passage}
                for idx, (passage, _) in enumerate(items)]
        if split != "test":
            for row, (_, label) in zip(rows, items):
                row["label"] = label
        write_jsonl(os.path.join(out_dir, "BoolQ", f"{split}.jsonl"), rows)
    return {k: len(v) for k, v in splits.items()}
