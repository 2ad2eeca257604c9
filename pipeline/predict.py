"""`deberta-ds predict`: leaderboard submission files from a fine-tuned release.

    deberta-ds predict --task CB --model OUT/best --data-dir DIR --output-dir SUBMIT [--split test]
    deberta-ds predict --task AX-b --model RTE_OUT/best --data-dir DIR --output-dir SUBMIT

Writes SUBMIT/<Task>.jsonl with `superglue.write_submission` (official label strings / values). The
diagnostics AX-b and AX-g are predicted by the RTE model (same labels). When the split has gold labels
(val), the scores are printed too. Plain PyTorch, one process (inference needs no DeepSpeed): on a GPU
when there is one, in the release's dtype or --dtype.

Exit codes: 0 done; 1 bad input (data, release, settings), printed as one line.
"""
import json
import os
import sys

import torch

from model import CheckpointError, load_release
from pipeline import superglue as sg
from pipeline.finetune import head_task, predict_logits
from pipeline.tokenizer import Tokenizer

PROG = "deberta-ds predict"
DEFAULT_MAX_SEQ_LEN = 256


class UsageError(ValueError):
    """Options that cannot work; the message says what to change."""


def add_arguments(parser):
    parser.add_argument("--task", required=True,
                        help="task to predict: a SuperGLUE task, or AX-b / AX-g with an RTE model")
    parser.add_argument("--model", required=True, help="fine-tuned release directory (e.g. OUT/best of finetune)")
    parser.add_argument("--data-dir", help="official SuperGLUE layout DIR/<Task>/<split>.jsonl (AX-b: DIR/AX-b/AX-b.jsonl); "
                        "without it the data come from `datasets`")
    parser.add_argument("--output-dir", required=True,
                        help="where <Task>.jsonl is written (predictions of a split other than test: OUT/<split>/)")
    parser.add_argument("--split", default="test", help="split to predict (default: test)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: spm.model in the model directory)")
    parser.add_argument("--max-seq-len", type=int,
                        help="tokens per sequence (default: the preset of the task, or of the task whose model "
                        f"predicts it; {DEFAULT_MAX_SEQ_LEN} without one)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")


def default_max_seq_len(task):
    try:
        return int(sg.load_preset(task.predicted_by or task.name)["max_seq_len"])
    except KeyError:
        return DEFAULT_MAX_SEQ_LEN


def predict(args):
    task = sg.get_task(args.task)
    if task.name == "MNLI":
        raise UsageError("MNLI is the intermediate task: the SuperGLUE server takes no MNLI file")
    spm_path = args.tokenizer or os.path.join(args.model, "spm.model")
    if not os.path.isfile(spm_path):
        raise UsageError(f"no tokenizer at {spm_path}: pass --tokenizer SPM_MODEL")
    examples = task.load(args.split, args.data_dir)
    max_seq_len = args.max_seq_len or default_max_seq_len(task)
    features = task.build_features(examples, Tokenizer(spm_path), max_seq_len)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = load_release(args.model, task=head_task(task), num_labels=task.num_labels, dtype=dtype).to(device)
    logits = predict_logits(model, features, args.batch_size, device)
    predictions = task.decode(examples, features, logits)
    # Only test predictions are the submission; other splits go to a sub-folder so they never replace it.
    out_dir = args.output_dir if args.split.startswith("test") or task.predicted_by else os.path.join(args.output_dir, args.split)
    path = sg.write_submission(task, predictions, out_dir)
    print(f"{task.name} {args.split}: {len(predictions)} predictions -> {path}")
    if all(example.has_gold(task.kind) for example in examples):
        scores = task.score(examples, predictions)
        print(f"{task.name} {args.split} scores: " + json.dumps({k: round(v, 4) for k, v in scores.items()}))
    return 0


def run(args):
    try:
        return predict(args)
    except (sg.DataError, CheckpointError, UsageError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    except KeyError as error:  # unknown task
        print(f"{PROG}: error: {error.args[0] if error.args else error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
