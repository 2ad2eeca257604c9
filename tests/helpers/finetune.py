"""A learnable CB-format task for the fine-tuning tests: the label is given by a keyword in the hypothesis."""
import json
import os
import random

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


NAMES = ("Oslo", "Paris", "Lima", "Cairo", "Delhi", "Quito", "Rome", "Tokyo", "Berlin", "Madrid", "Dakar", "Hanoi")


def write_record_like(path, count, seed, labelled=True):
    """Official ReCoRD jsonl lines, one query each: 3-5 candidate entities in a passage of filler; the one
    named right after "certainly" is the answer. Passages run up to ~40 words, so a short max_seq_len needs
    several windows."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
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
            text = " ".join(words)
            qa = {"idx": idx, "query": "they chose @placeholder"}
            if labelled:
                span = spans[names.index(answer)]
                qa["answers"] = [dict(span, text=answer)]
            out.write(json.dumps({"idx": idx, "passage": {"text": text, "entities": spans}, "qas": [qa]}) + "\n")
