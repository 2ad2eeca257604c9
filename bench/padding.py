"""Padding in fine-tuning batches, with and without length grouping, for the eight SuperGLUE tasks.

    python -m bench.padding [--micro-batch-size N] [--json OUT]

No training: for each task, sequence lengths are drawn at the size of its official training set, and an epoch
of batches is formed by pipeline/finetune/batches.py exactly as `deberta-ds finetune` forms it (the task
preset's batch size and max_seq_len; micro-batches of --micro-batch-size, default the whole batch: one GPU),
with group_by_length off and on. Padding fraction = padded positions / all positions of the micro-batches.

Lengths: words per example from a lognormal fitted to the 10th and 90th percentiles measured on the official
training lines (WORDS in tests/helpers/superglue.py; MultiRC per answer row, ReCoRD per query, COPA per choice), times
TOKENS_PER_WORD, plus the [CLS]/[SEP] tokens, cut at max_seq_len. ReCoRD is one sequence per query, as the
entity-scoring format encodes it (the candidate rows it replaced padded alike: every row of a query has about
the passage's length). COPA's two choices of an example are padded together.
"""
import argparse
import json
import random

from pipeline.cli import Parser
from pipeline.cli_types import positive_int
from pipeline.finetune.batches import epoch_micro_batches, feature_length, padding_fraction
from pipeline.finetune.config import FinetuneConfig, load_preset
from tests.helpers.superglue import WORDS, lognormal_words

TRAIN_SIZE = {"BoolQ": 9427, "CB": 250, "COPA": 400, "MultiRC": 27243, "ReCoRD": 100730, "RTE": 2490,
              "WiC": 5428, "WSC": 554}   # MultiRC: answer rows; ReCoRD: queries
TOKENS_PER_WORD = 1.3  # sentencepiece pieces per word on English text of this kind (about 1.2-1.4)


def draw_length(rng, task, max_seq_len):
    return min(max_seq_len, 3 + round(lognormal_words(rng, task, low=1) * TOKENS_PER_WORD))


def task_features(task, max_seq_len, seed):
    rng = random.Random(seed)
    if task == "COPA":
        return [{"choices": [[0] * draw_length(rng, task, max_seq_len) for _ in range(2)]}
                for _ in range(TRAIN_SIZE[task])]
    return [{"input_ids": [0] * draw_length(rng, task, max_seq_len)} for _ in range(TRAIN_SIZE[task])]


def padding_of(task, micro_batch_size, grouped, seed):
    preset = load_preset(task)
    settings = FinetuneConfig(lr=preset["lr"], batch_size=preset["batch_size"], epochs=1, warmup_steps=0,
                              cls_drop_out=0.0, max_seq_len=preset["max_seq_len"], seed=seed,
                              micro_batch_size=micro_batch_size or preset["batch_size"], group_by_length=grouped)
    features = task_features(task, settings.max_seq_len, seed)
    lengths = [feature_length(f) for f in features]
    _, _, pieces = epoch_micro_batches(lengths, settings, epoch=1, rank=0, world_size=1)
    return padding_fraction([[features[i] for i in piece] for piece in pieces]), settings


def main():
    parser = Parser(prog="python -m bench.padding", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=positive_int, default=None,
                        help="sequences per forward (default: the task preset's whole batch size)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    rows = []
    print("| task | train size | batch | micro-batch | max_seq_len | padding, shuffled | padding, grouped |")
    print("|---|---|---|---|---|---|---|")
    for task in WORDS:
        plain, settings = padding_of(task, args.micro_batch_size, False, args.seed)
        grouped, _ = padding_of(task, args.micro_batch_size, True, args.seed)
        rows.append({"task": task, "train_size": TRAIN_SIZE[task], "batch_size": settings.batch_size,
                     "micro_batch_size": settings.micro_batch_size, "max_seq_len": settings.max_seq_len,
                     "padding_shuffled": plain, "padding_grouped": grouped})
        print(f"| {task} | {TRAIN_SIZE[task]} | {settings.batch_size} | {settings.micro_batch_size} | "
              f"{settings.max_seq_len} | {plain:.1%} | {grouped:.1%} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
