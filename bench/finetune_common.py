"""What the fine-tuning benches share (`python -m bench.finetune_compare`, `python -m bench.finetune_record`):
their common options, the work directory, the synthetic data and tokenizer, the initial releases (one random
MLM model and, per label count, a classification model with its encoder), runs in subprocesses with their
wall time, peak RSS and peak GPU memory, our command's per-epoch records, and the end of a bench (JSON,
failures, exit code).

The initial releases are built in a subprocess: `python -m bench.finetune_common --internal release SPEC`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from pipeline.cli import Parser
from pipeline.cli_types import at_least, fraction, positive_float, positive_int
from tests.helpers.launch import ROOT, cli_command, run_env
from tests.helpers.superglue import write_tasks

LABEL_COUNTS = {"BoolQ": 2, "CB": 3, "RTE": 2, "WiC": 2, "WSC": 2}
# the encoder sizes of --model; vocab_size None: the tokenizer's (padded to a multiple of 100)
MODELS = {
    "small": dict(name="base", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "tiny": dict(name="tiny", max_position_embeddings=512),
    "base": dict(name="base"),
    "xxlarge": dict(name="xxlarge", vocab_size=128100),  # the 1.5B preset, vocabulary included
}
WORK_MARKER = ".deberta-ds-bench"  # a --work-dir holding it was made by a bench, which may replace it


# ---------------------------------------------------------------- command line
def parser(prog, description):
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_arguments(p, defaults):
    """The options both benches take; `defaults` names the bench's own defaults in the help."""
    p.add_argument("--model", default="small", choices=sorted(MODELS),
                   help="encoder size: small (hidden 256, 4 layers, 4 heads, FFN 1024; default), tiny, base, "
                        "xxlarge (the 1.5B preset)")
    p.add_argument("--vocab-size", type=at_least(200), default=3000, help="sentencepiece pieces (default 3000)")
    p.add_argument("--train-examples", type=positive_int, default=None,
                   help=f"training examples (default {defaults['train_examples']})")
    p.add_argument("--val-examples", type=positive_int, default=None,
                   help=f"val examples (default {defaults['val_examples']})")
    p.add_argument("--epochs", type=positive_int, default=None, help=f"epochs (default {defaults['epochs']})")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global batch size (default 16)")
    p.add_argument("--lr", type=positive_float, default=1e-4,
                   help="peak learning rate (default 1e-4: the initial model is untrained)")
    p.add_argument("--warmup-steps", type=at_least(0), default=10, help="warmup optimizer steps (default 10)")
    p.add_argument("--max-seq-len", type=at_least(8), default=defaults["max_seq_len"],
                   help=f"tokens per sequence (default {defaults['max_seq_len']})")
    p.add_argument("--cls-drop-out", type=fraction, default=0.15, help="classifier dropout, in [0, 1) (default 0.15)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data, the weights and the training (default 42)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help=f"alternating rounds; the median counts (default {defaults['rounds']})")
    p.add_argument("--deepspeed", default="finetune_cpu",
                   help="DeepSpeed config: a JSON file or a name in ds_configs/ (default finetune_cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="OMP_NUM_THREADS of every run (default: the CPUs this process may use)")
    p.add_argument("--work-dir", default=None,
                   help="where data, releases and run outputs go (default: a temporary directory, removed at the "
                        "end); a directory a bench made before is replaced, any other must be empty")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer examples, 1 epoch, 1 round")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--internal", nargs=2, metavar=("ACTION", "SPEC"), help=argparse.SUPPRESS)


def fill_defaults(args, p, normal, quick):
    """The bench's defaults (`quick` with --quick) where an option was not given; the DeepSpeed config's path."""
    for name, value in (quick if args.quick else normal).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ds_path = ds_config_path(args.deepspeed, p)
    return args


def ds_config_path(name, p):
    path = name if name.endswith(".json") or os.sep in name else os.path.join(ROOT, "ds_configs", f"{name}.json")
    if not os.path.isfile(path):
        p.error(f"--deepspeed {name}: no such file ({path})")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except ValueError as e:
        p.error(f"--deepspeed {path}: not JSON ({e})")
    return os.path.abspath(path)


# ---------------------------------------------------------------- subprocesses
def child_env(args, tree=ROOT, extra=None):
    """A fine-tuning run's environment (tests/helpers/launch.py run_env): the tree on PYTHONPATH, the accelerator
    DeepSpeed finds (CUDA where there is one), --threads OMP threads (default: the CPUs this process may use),
    no fault injection."""
    env = run_env(dict({"PYTHONUNBUFFERED": "1"}, **(extra or {})), cpu=False,
                  threads=args.threads or len(os.sched_getaffinity(0)), root=tree)
    env.pop("DEBERTA_DS_FAULT", None)
    return env


class GpuPeak(threading.Thread):
    """Peak GPU memory of one process from nvidia-smi every 0.5 s (CUDA runs only; None without nvidia-smi)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.done = pid, None, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10, check=False).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_mib = max(self.peak_mib or 0, int(used))


def run_logged(cmd, log_path, env, cwd=ROOT):
    """Run cmd with its output in log_path: (exit code, wall seconds, peak RSS bytes, peak GPU MiB or None)."""
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        gpu = GpuPeak(process.pid) if shutil.which("nvidia-smi") else None
        if gpu:
            gpu.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if gpu:
            gpu.done.set()
    return process.returncode, wall, usage.ru_maxrss * 1024, gpu.peak_mib if gpu else None


def last_line(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def internal(args, module, action, spec, log_path, tree=ROOT, extra_env=None):
    """`python -m MODULE --internal ACTION SPEC` in a subprocess (torch is imported there, never in the bench's own
    process, so that its size does not count in the children's peaks): (exit code, wall s, peak RSS, GPU MiB)."""
    cmd = [sys.executable, "-m", module, "--internal", action, spec]
    return run_logged(cmd, log_path, child_env(args, tree, extra_env))


def must(result, what, log_path):
    if result[0] != 0:
        sys.exit(f"error: {what} failed (exit {result[0]}): {last_line(log_path)} (log: {log_path})")
    return result


# ---------------------------------------------------------------- setup: data, tokenizer, releases, features
def setup(args, work, tasks):
    data_dir = os.path.join(work, "data")
    lines = write_tasks(data_dir, tasks, args.train_examples, args.val_examples, args.seed)
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log = os.path.join(work, "tokenizer.log")
    prefix = os.path.join(work, "tok", "spm")
    cmd = cli_command("tokenizer", "train", "--input", corpus, "--output", prefix, "--vocab-size",
                      str(args.vocab_size), "--seed", str(args.seed))
    must(run_logged(cmd, log, child_env(args)), "tokenizer train", log)
    spec = write_spec(work, "release", model=args.model, spm=prefix + ".model", seed=args.seed, out=work,
                      label_counts=sorted({LABEL_COUNTS[t] for t in tasks if t in LABEL_COUNTS}))
    log = os.path.join(work, "release.log")
    must(internal(args, "bench.finetune_common", "release", spec, log), "building the initial releases", log)
    return data_dir, prefix + ".model"


def write_spec(work, name, **values):
    path = os.path.join(work, f"{name}.spec.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1)
    return path


def make_releases(spec):
    """An untrained MLM model saved as the 'pretrained' release, and per label count a classification release
    with the same encoder and a seeded pooler and classifier (both sides then load every weight)."""
    import torch

    from model import DebertaForMaskedLM, DebertaForSequenceClassification, preset
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.release import save_release
    size = dict(MODELS[spec["model"]])
    size.setdefault("vocab_size", Tokenizer(spec["spm"]).padded_vocab_size)
    config = preset(size.pop("name"), **size)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the 1.5B model initialises in seconds there
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        mlm = DebertaForMaskedLM(config).cpu()  # the release writer reads CPU tensors
    save_release(mlm, os.path.join(spec["out"], "release_mlm"), spm_path=spec["spm"])
    for count in spec["label_counts"]:
        torch.manual_seed(spec["seed"] + count)
        with torch.device(device):
            model = DebertaForSequenceClassification(config, num_labels=count).cpu()
        wanted = model.deberta.state_dict()  # all but the EMD's absolute position table, which only the MLM has
        model.deberta.load_state_dict({k: v for k, v in mlm.deberta.state_dict().items() if k in wanted})
        save_release(model, os.path.join(spec["out"], f"release_{count}labels"), spm_path=spec["spm"])
        del model
    print(json.dumps({"parameters": sum(p.numel() for p in mlm.deberta.parameters()), "vocab_size": config.vocab_size,
                      "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "intermediate_size")}}))


def ours_command(args, task, release, data_dir, out, sift, extra_sets=(), epochs=None, tree=ROOT):
    cmd = cli_command("finetune", "--task", task, "--release", release, "--data-dir", data_dir, "--output-dir", out,
                      "--deepspeed", args.ds_path, "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                      "--epochs", str(epochs or args.epochs), "--warmup-steps", str(args.warmup_steps),
                      "--max-seq-len", str(args.max_seq_len), "--cls-drop-out", str(args.cls_drop_out),
                      "--seed", str(args.seed), "--sift", "on" if sift else "off")
    for item in extra_sets:
        cmd += ["--set", item]
    return cmd


def ours_epochs(out):
    """Per-epoch records of OUT/metrics.json: training seconds ("train_s", or elapsed_s differences: then
    'approx' is True), the task loss (SiFT's adversarial term left out), padding fraction where recorded."""
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        records = json.load(f)["epochs"]
    epochs, before = [], 0.0
    for r in records:
        seconds, approx = (r["train_s"], False) if "train_s" in r else (r["elapsed_s"] - before, True)
        before = r.get("elapsed_s", before)
        loss = r.get("task_loss", r.get("train_loss"))  # with SiFT, train_loss adds the adversarial term
        epochs.append({"epoch": r["epoch"], "train_s": seconds, "approx": approx, "train_loss": loss,
                       "padding_fraction": r.get("padding_fraction")})
    return epochs


# ---------------------------------------------------------------- reporting
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def fmt_loss(value):
    return f"{value:.4f}" if value is not None else "-"


def failures(summary):
    return json.dumps(summary).count('"failed": "')


def work_directory(args):
    """--work-dir, emptied when a bench made it before (refused when it holds anything else), or a new
    temporary directory."""
    if not args.work_dir:
        work = tempfile.mkdtemp(prefix="bench-finetune-")
    else:
        work = os.path.abspath(args.work_dir)
        if os.path.isdir(work) and os.listdir(work) and not os.path.exists(os.path.join(work, WORK_MARKER)):
            sys.exit(f"error: --work-dir {work} holds files no bench made; the bench replaces its work directory, "
                     "so choose another (or empty this one)")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    open(os.path.join(work, WORK_MARKER), "w").close()
    return work


def run_bench(args, name, body, emit=print):
    """The bench around body(args, work, emit) -> summary: the work directory, the JSON file, the exit code (1 when
    a run failed; then the work directory and its logs stay)."""
    work = work_directory(args)
    emit(f"python -m {name}: work directory {work}")
    summary = body(args, work, lambda text: emit(text) or sys.stdout.flush())
    summary["args"] = {k: v for k, v in vars(args).items() if k != "internal"}
    emit(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    failed = failures(summary)
    if failed:
        emit(f"{failed} run(s) failed; their logs are in {work}")
    elif not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def run_internal(internal, actions):
    """--internal ACTION SPEC: actions[ACTION](the spec's JSON)."""
    action, spec = internal
    with open(spec, encoding="utf-8") as f:
        return actions[action](json.load(f))


if __name__ == "__main__":
    p = parser("python -m bench.finetune_common", __doc__)
    p.add_argument("--internal", nargs=2, metavar=("ACTION", "SPEC"), required=True)
    sys.exit(run_internal(p.parse_args().internal, {"release": make_releases}))
