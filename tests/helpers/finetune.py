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
