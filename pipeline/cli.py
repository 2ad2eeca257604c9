"""The `deberta-ds` command. Each subcommand lives in its own module, imported only when chosen,
so `deberta-ds --help` is fast and a missing optional dependency only breaks its own command.

A command module provides `add_arguments(parser)` and `run(args) -> int | None`.
"""
import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of the data flow.
COMMANDS = {
    "corpus": ("pipeline.corpus", "build the embedded demo corpus (Python standard-library docstrings)"),
    "tokenizer": ("pipeline.tokenizer", "train or inspect the sentencepiece tokenizer"),
    "preprocess": ("pipeline.preprocess", "tokenize and pack a corpus into memory-mapped shards"),
    "plan": ("pipeline.plan", "estimate per-GPU memory of a run for a cluster shape"),
    "pretrain": ("pipeline.pretrain", "MLM + EMD pretraining on DeepSpeed (zero3 or pipeline mode)"),
    "convert": ("pipeline.convert", "convert between training checkpoints and release directories"),
    "finetune": ("pipeline.finetune", "fine-tune on a SuperGLUE/GLUE task (optionally with SiFT)"),
    "predict": ("pipeline.predict", "write SuperGLUE leaderboard submission files"),
    "hostfile": ("pipeline.launch", "write a deepspeed hostfile from the Slurm allocation"),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="deberta-ds",
        description="Pretrain and fine-tune DeBERTa-v2 (up to 1.5B parameters) on DeepSpeed. "
        "Run `deberta-ds COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"deberta-ds {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    code = module.run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
