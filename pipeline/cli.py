"""The `deberta-ds` command. Each subcommand lives in its own module, imported only when chosen, so
`deberta-ds --help` is fast and a missing optional dependency only breaks its own command.

A command module provides `add_arguments(parser)` and `run(args) -> int | None`. A failure the user can
cause (pipeline/errors.py, or an OSError on a path they gave) ends as one line `error: ...` and exit code 1;
a bad option as one line and exit code 2; anything else is a bug and keeps its traceback.
"""
import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Order is the order of the data flow.
COMMANDS = {
    "corpus": ("pipeline.data.corpus", "build the embedded demo corpus (Python standard-library docstrings)"),
    "tokenizer": ("pipeline.data.tokenizer", "train or inspect the sentencepiece tokenizer"),
    "preprocess": ("pipeline.data.preprocess", "tokenize and pack a corpus into memory-mapped shards"),
    "plan": ("pipeline.train.plan", "estimate per-GPU memory of a run for a cluster shape"),
    "pretrain": ("pipeline.train.pretrain", "pretraining on DeepSpeed: MLM + EMD (v2) or RTD (v3)"),
    "convert": ("pipeline.release.convert", "convert training checkpoints to release directories"),
    "finetune": ("pipeline.finetune.finetune", "fine-tune on a SuperGLUE/GLUE task (optionally with SiFT)"),
    "predict": ("pipeline.finetune.predict", "write SuperGLUE leaderboard submission files"),
    "hostfile": ("pipeline.launch.hostfile", "write a deepspeed hostfile from the Slurm allocation"),
    "launch": ("pipeline.launch.check", "show or smoke-test what this process finds about its launch"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the option and the problem, then where the help is (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = Parser(prog="deberta-ds", description="Pretrain (DeBERTa-v2 MLM + EMD, DeBERTa-v3 "
                    "RTD) and fine-tune DeBERTa up to 1.5B parameters on DeepSpeed. Run `deberta-ds COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def take_local_rank(argv):
    """The deepspeed launcher passes --local_rank=N (before the command when it starts `-m pipeline.cli`): drop
    it from argv; the environment says the same (LOCAL_RANK), which pipeline/launch/ reads."""
    kept, local_rank = [], None
    for item in argv:
        if item.startswith(("--local_rank=", "--local-rank=")):
            local_rank = item.split("=", 1)[1]
        else:
            kept.append(item)
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    return kept


def main(argv=None):
    from pipeline.errors import DebertaDSError
    argv = take_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"deberta-ds {name}", description=(module.__doc__ or help_text).strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.run(args)
    except DebertaDSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a path the user gave that cannot be read or written
        if error.filename is None:
            raise
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
