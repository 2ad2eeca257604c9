"""`deberta-ds predict`: leaderboard submission files from a fine-tuned release.

    deberta-ds predict --task CB --model OUT/best --data-dir DIR --output-dir SUBMIT [--split test]
    deberta-ds predict --task AX-b --model RTE_OUT/best --data-dir DIR --output-dir SUBMIT

Writes SUBMIT/<Task>.jsonl in the leaderboard format (official label strings / values). The diagnostics
AX-b and AX-g are predicted by the RTE model (same labels). The release must have been fine-tuned for the
task (its config.json names the task: `deberta-ds finetune` writes it); a pretraining release, whose task
head would be random, or one fine-tuned for another task is refused. When the split has gold labels (val),
the scores are printed too. Plain PyTorch, one process (inference needs no DeepSpeed): on a GPU when there
is one, in the release's dtype or --dtype.

Exit codes: 0 done; 1 bad input (data, release, settings), printed as one line; 2 usage.
"""
import json
import os

from pipeline.errors import ConfigError, ReleaseError
from pipeline.cli_types import at_least, positive_int

DEFAULT_MAX_SEQ_LEN = 256


def add_arguments(parser):
    from model.config import ATTENTION_IMPLS
    parser.add_argument("--task", required=True,
                        help="task to predict: a SuperGLUE task, or AX-b / AX-g with an RTE model")
    parser.add_argument("--model", required=True, help="fine-tuned release directory (e.g. OUT/best of finetune)")
    parser.add_argument("--data-dir", help="official SuperGLUE layout DIR/<Task>/<split>.jsonl (AX-b: DIR/AX-b/AX-b.jsonl); "
                        "without it the data come from `datasets`")
    parser.add_argument("--output-dir", required=True,
                        help="where <Task>.jsonl is written (predictions of a split other than test: OUT/<split>/)")
    parser.add_argument("--split", default="test", help="split to predict (default: test)")
    parser.add_argument("--tokenizer", help="sentencepiece model (default: spm.model in the model directory)")
    parser.add_argument("--max-seq-len", type=at_least(4),
                        help="tokens per sequence (default: the preset of the task, or of the task whose model "
                        f"predicts it; {DEFAULT_MAX_SEQ_LEN} without one)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sequences per forward (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="attention implementation (default: the release's; model/attention.py)")


def default_max_seq_len(task):
    from pipeline.finetune.config import load_preset
    try:
        return int(load_preset(task.predicted_by or task.name)["max_seq_len"])
    except (ConfigError, KeyError):
        return DEFAULT_MAX_SEQ_LEN


def check_trained_for(model_dir, task):
    """The release's head was fine-tuned for this task (or, for a diagnostic, for the task that predicts it)."""
    from pipeline.release import Release
    wanted = task.predicted_by or task.name
    trained = Release(model_dir).values.get("finetuning_task")
    if trained is None:
        raise ReleaseError(f"{model_dir}: has no trained head for {wanted} (no finetuning_task in config.json: a "
                           f"pretraining release, whose {wanted} head would be random); fine-tune it first with "
                           f"`deberta-ds finetune --task {wanted}` and predict with its OUT/best")
    if trained != wanted:
        raise ReleaseError(f"{model_dir}: fine-tuned for {trained}, not {wanted}"
                           + (f" (the model that predicts {task.name})" if task.predicted_by else ""))


def predict(args):
    import torch

    from pipeline.data.tokenizer import Tokenizer
    from pipeline.finetune.features import write_submission
    from pipeline.finetune.start import check_length, head_task
    from pipeline.finetune.inference import predict_logits
    from pipeline.finetune.tasks import get_task
    from pipeline.release import load_release
    task = get_task(args.task)
    if not task.submitted:
        raise ConfigError(f"{task.name} is the intermediate task: the SuperGLUE server takes no {task.name} file")
    if args.batch_size < 1 or (args.max_seq_len is not None and args.max_seq_len < 4):
        raise ConfigError("--batch-size must be at least 1 and --max-seq-len at least 4")
    check_trained_for(args.model, task)
    spm_path = args.tokenizer or os.path.join(args.model, "spm.model")
    if not os.path.isfile(spm_path):
        raise ConfigError(f"no tokenizer at {spm_path}: pass --tokenizer SPM_MODEL")
    examples = task.load(args.split, args.data_dir)
    max_seq_len = args.max_seq_len or default_max_seq_len(task)
    features = task.build_features(examples, Tokenizer(spm_path), max_seq_len)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = load_release(args.model, task=head_task(task), num_labels=task.num_labels, dtype=dtype,
                         attention_impl=args.attention_impl).to(device)
    check_length(model.config, max_seq_len, args.model)
    logits = predict_logits(model, features, args.batch_size, device)
    predictions = task.decode(examples, features, logits)
    # Only test predictions are the submission; other splits go to a sub-folder so they never replace it.
    out_dir = args.output_dir if args.split.startswith("test") or task.predicted_by else os.path.join(args.output_dir, args.split)
    path = write_submission(task, predictions, out_dir)
    print(f"{task.name} {args.split}: {len(predictions)} predictions -> {path}")
    if all(example.has_gold(task.kind) for example in examples):
        scores = task.score(examples, predictions)
        print(f"{task.name} {args.split} scores: " + json.dumps({k: round(v, 4) for k, v in scores.items()}))
    return 0


def run(args):
    return predict(args)
