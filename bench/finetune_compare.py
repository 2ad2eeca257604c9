"""Fine-tuning throughput: `deberta-ds finetune` against transformers' Trainer.

    python -m bench.finetune_compare [--tasks BoolQ,RTE,CB] [--rounds 3] [--json OUT]
    ... --quick: 48 examples, 1 epoch, 1 round (a smoke run)

Ours (`python -m pipeline.cli finetune`, the real command) against `transformers.Trainer` with
DebertaV2ForSequenceClassification, like for like:
  - the same DeepSpeed config (--deepspeed, default ds_configs/finetune_cpu.json: ZeRO-2, fp32). Ours fills
    its "auto" fields itself; the Trainer gets the same dict through TrainingArguments(deepspeed=...), which
    fills them from its arguments. Each Trainer run checks that it really trained under a DeepSpeedEngine
    with the config's ZeRO stage, and stops otherwise. The Trainer process gets RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0, MASTER_ADDR, MASTER_PORT (what `torchrun --nproc_per_node 1` sets): with LOCAL_RANK, accelerate
    joins the process group itself through deepspeed.init_distributed (gloo on the CPU); without it,
    deepspeed.initialize falls back to MPI discovery, which needs mpi4py.
  - the same initial weights: one random MLM model ("pretrained") is saved as a release, and for each label
    count a release with that encoder plus a seeded pooler and classifier. Both sides load every weight from
    it (ours: --release, transformers: from_pretrained), so neither draws a head of its own.
  - the same token ids: the training set is encoded once with our Tokenizer and task.build_features (the
    function our command calls); the Trainer reads those ids ([CLS] a [SEP] b [SEP]) and pads each batch
    to its longest sequence, as our collate does.
  - the same settings: global batch size, peak learning rate, warmup steps, epochs, max_seq_len, seed,
    classifier dropout; weight decay, Adam's betas and epsilon and gradient clipping are our task preset's
    (pipeline/finetune/presets/superglue.json), given to the Trainer as its arguments. Differences left: the
    Trainer's schedule rises as s/warmup where ours rises as (s+1)/warmup (pipeline/optim.py); the two
    shuffle with different generators; ours completes its last global batch by wrapping around to the
    start of the epoch, the Trainer's last batch is short.
Variants: ours (our default batching, grouped by length), ours_sift (--sift on), the Trainer with
group_by_length=False (its default) and =True; `--variants` also offers ours_ungrouped
(--set group_by_length=false).

Data: synthetic tasks in the official SuperGLUE jsonl layout (DIR/<Task>/{train,val}.jsonl), words drawn from
a Zipf-distributed vocabulary of made-up words, a keyword in the text deciding the label (so the loss falls),
and the number of words per example drawn from a lognormal fitted to the 10th and 90th percentiles measured
on the real tasks (WORDS in tests/helpers/superglue.py; its median is sqrt(p10 * p90), within 10% of the measured median for every
task but WSC, 23.5 against 20). The tokenizer is a sentencepiece model trained on that text by
`deberta-ds tokenizer train`.

What is measured, per task and variant, each run in its own subprocess, alternating (round 1: every variant,
round 2: every variant, ...) so that load from other processes hits all alike; the median over rounds:
  - training time: ours, each epoch's "train_s" in OUT/metrics.json (the loop over the epoch's batches; no
    startup, evaluation or saving); where the tree's metrics.json has no "train_s", the differences of
    "elapsed_s", which also hold the epoch's evaluation of the (small) val split and the best-model save:
    the table marks those rows with "~". The Trainer: on_epoch_begin to on_epoch_end of a callback (its
    train() also builds the DeepSpeed engine, which this leaves out; it evaluates and saves nothing).
  - examples/s: training examples x epochs / training time; tokens/s: the training set's non-pad tokens x
    epochs / training time (the same count for both sides).
  - padding: padded positions / all positions of the training batches (ours: its metrics.json
    "padding_fraction" where present; the Trainer: counted in its collator).
  - peak memory: the subprocess's peak resident set (ru_maxrss from wait4; the bench's own process imports
    no torch, so its size does not leak into the children's peaks). It includes the interpreter, torch,
    the data and, for ours, the evaluation and the save.
  - the first and last epoch's mean training loss (a sanity check: the sides should start alike and fall).
  - SiFT's cost: ours_sift's training time over ours' (same steps).

Bad input is one line; a run that fails shows as failed in the table (with its log) and the bench exits 1.
No timing is asserted. Shared pieces: bench/finetune_common.py; the data: tests/helpers/superglue.py.
"""
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time

from bench.finetune_common import (LABEL_COUNTS, ROOT, add_common_arguments, child_env, fill_defaults, fmt_loss,
                                   internal, last_line, must, ours_command, ours_epochs, parser, ratio, run_bench,
                                   run_internal, run_logged, setup, write_spec)
from pipeline.cli_types import names_from
from tests.helpers.launch import single_rank

TASKS = ("BoolQ", "CB", "RTE", "WiC", "WSC")  # sequence classification: the Trainer can run them
VARIANTS = ("ours", "ours_sift", "trainer", "trainer_grouped", "ours_ungrouped")
DEFAULT_VARIANTS = VARIANTS[:4]
MODULE = "bench.finetune_compare"  # its children run it again: python -m MODULE --internal ACTION SPEC
NORMAL = dict(train_examples=512, val_examples=32, epochs=2, rounds=3)
QUICK = dict(train_examples=48, val_examples=8, epochs=1, rounds=1)


def parse_args(argv=None):
    p = parser("python -m bench.finetune_compare", __doc__)
    p.add_argument("--tasks", type=names_from(TASKS), default=["BoolQ", "RTE", "CB"],
                   help=f"comma-separated tasks from {','.join(TASKS)} (default BoolQ,RTE,CB)")
    p.add_argument("--variants", type=names_from(VARIANTS), default=list(DEFAULT_VARIANTS),
                   help=f"comma-separated from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    add_common_arguments(p, dict(NORMAL, max_seq_len=256))
    return fill_defaults(p.parse_args(argv), p, NORMAL, QUICK)


# ---------------------------------------------------------------- the Trainer's input (in a subprocess)
def encode_features(spec):
    """The training set of each task as our command encodes it, for the Trainer: [{"input_ids", "label"}]."""
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.finetune.tasks import get_task
    tokenizer = Tokenizer(spec["spm"])
    for name in spec["tasks"]:
        task = get_task(name)
        examples = task.load("train", spec["data_dir"])
        features = task.build_features(examples, tokenizer, spec["max_seq_len"])
        rows = [{"input_ids": list(f["input_ids"]), "label": int(f["label"])} for f in features]
        stats = {"examples": len(examples), "features": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows)}
        with open(os.path.join(spec["out"], f"{name}.features.json"), "w", encoding="utf-8") as f:
            json.dump({"stats": stats, "features": rows}, f)


# ---------------------------------------------------------------- the Trainer side (in its subprocess)
def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def trainer_run(spec):
    """transformers.Trainer on the features our command would train on; writes spec["result"]."""
    import torch
    import transformers
    from deepspeed import DeepSpeedEngine

    from pipeline.finetune.config import resolve

    settings = resolve(spec["task"], named={"lr": spec["lr"], "batch_size": spec["batch_size"], "epochs": spec["epochs"],
                                            "warmup_steps": spec["warmup_steps"], "cls_drop_out": spec["cls_drop_out"],
                                            "max_seq_len": spec["max_seq_len"], "seed": spec["seed"]})
    with open(spec["features"], encoding="utf-8") as f:
        features = json.load(f)["features"]
    with open(spec["ds_path"], encoding="utf-8") as f:
        ds_config = json.load(f)
    cuda = torch.cuda.is_available()
    config = transformers.DebertaV2Config.from_pretrained(spec["release"], cls_dropout=settings.cls_drop_out)
    model = transformers.DebertaV2ForSequenceClassification.from_pretrained(spec["release"], config=config)
    collator = CountingCollator()
    timer = epoch_timer()
    training_args = transformers.TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=settings.epochs, learning_rate=settings.lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1], adam_epsilon=settings.adam_eps,
        max_grad_norm=settings.clip_grad_norm, lr_scheduler_type="linear", warmup_steps=settings.warmup_steps,
        seed=settings.seed, **length_grouping(transformers, spec["group_by_length"]), deepspeed=ds_config,
        bf16=bool(ds_config.get("bf16", {}).get("enabled")), fp16=bool(ds_config.get("fp16", {}).get("enabled")),
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_pin_memory=cuda, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=FeatureDataset(features),
                                   data_collator=collator, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    engine = trainer.model_wrapped
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if not (trainer.is_deepspeed_enabled and isinstance(engine, DeepSpeedEngine) and engine.zero_optimization_stage() == stage):
        raise SystemExit(f"the Trainer did not train under DeepSpeed ZeRO-{stage}: {type(engine).__name__}")
    result = {"epochs": timer.epochs, "padding_fraction": collator.padding_fraction(),
              "deepspeed": {"engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
                            "optimizer": type(engine.optimizer).__name__,
                            "backend": torch.distributed.get_backend(), "train_batch_size": engine.train_batch_size(),
                            "gradient_clipping": engine.gradient_clipping()},
              "vm_hwm_bytes": peak_rss(), "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def length_grouping(transformers, grouped):
    """The Trainer's LengthGroupedSampler on or off: train_sampling_strategy in transformers 5, group_by_length
    before."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


class FeatureDataset:
    """Our features as a map-style dataset (LengthGroupedSampler reads each item's input_ids)."""

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"input_ids": self.features[i]["input_ids"], "labels": self.features[i]["label"]}


class CountingCollator:
    """Pads a batch to its longest sequence with [PAD]=0 (as our collate), counting real and padded positions."""

    def __init__(self):
        self.real = self.total = 0

    def __call__(self, items):
        import torch
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, :len(item["input_ids"])] = 1
        self.real += int(mask.sum())
        self.total += mask.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}

    def padding_fraction(self):
        return 1 - self.real / self.total if self.total else None


def epoch_timer():
    """A TrainerCallback (made here: transformers is imported in the Trainer's process only)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Training seconds and mean logged loss per epoch (on_epoch_end comes before any evaluation)."""

        def __init__(self):
            self.epochs, self.started, self.losses = [], None, []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started, self.losses = time.perf_counter(), []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_epoch_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            self.epochs.append({"epoch": len(self.epochs) + 1, "train_s": elapsed,
                                "train_loss": statistics.fmean(self.losses) if self.losses else None})

    return Timer()


# ---------------------------------------------------------------- one run of a variant
def run_variant(args, work, variant, task, data_dir, run_no):
    """One fine-tuning run in a subprocess: its epochs, peak memory and wall time, or the failure."""
    out = os.path.join(work, "runs", f"{task}-{variant}-{run_no}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    log = os.path.join(out, "log.txt")
    release = os.path.join(work, f"release_{LABEL_COUNTS[task]}labels")
    if variant.startswith("ours"):
        sets = ["group_by_length=false"] if variant == "ours_ungrouped" else []
        cmd = ours_command(args, task, release, data_dir, out, sift=variant == "ours_sift", extra_sets=sets)
        code, wall, rss, gpu = run_logged(cmd, log, child_env(args))
        if code != 0:
            return {"failed": f"exit {code}: {last_line(log)}", "log": log}
        epochs = ours_epochs(out)
        shutil.rmtree(os.path.join(out, "best"), ignore_errors=True)  # the best release is no result (1.5B: 6 GB)
        padding = [e["padding_fraction"] for e in epochs]
        padding = statistics.fmean(padding) if None not in padding else None
        return {"epochs": epochs, "padding_fraction": padding, "peak_rss_bytes": rss, "peak_gpu_mib": gpu,
                "wall_s": wall, "log": log}
    spec = write_spec(out, "trainer", task=task, release=release, features=os.path.join(work, f"{task}.features.json"),
                      ds_path=args.ds_path, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      warmup_steps=args.warmup_steps, cls_drop_out=args.cls_drop_out, max_seq_len=args.max_seq_len,
                      seed=args.seed, group_by_length=variant == "trainer_grouped", out=out,
                      result=os.path.join(out, "result.json"))
    # what `torchrun --nproc_per_node 1` sets: accelerate then joins the process group itself (module docstring)
    code, wall, rss, gpu = internal(args, MODULE, "trainer", spec, log, extra_env=single_rank())
    if code != 0:
        return {"failed": f"exit {code}: {last_line(log)}", "log": log}
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        result = json.load(f)
    for e in result["epochs"]:
        e["approx"] = False
    return dict(result, peak_rss_bytes=rss, peak_gpu_mib=gpu, wall_s=wall, log=log)


# ---------------------------------------------------------------- compare
def summarize(runs_of_variant, stats, epochs):
    """The median over rounds of one variant on one task."""
    good = [r for r in runs_of_variant if "failed" not in r]
    if not good:
        return {"failed": runs_of_variant[-1]["failed"], "log": runs_of_variant[-1]["log"]}
    train_s = statistics.median(sum(e["train_s"] for e in r["epochs"]) for r in good)
    median = lambda key: statistics.median(r[key] for r in good) if all(r.get(key) is not None for r in good) else None  # noqa: E731
    first = [r["epochs"][0]["train_loss"] for r in good]
    last = [r["epochs"][-1]["train_loss"] for r in good]
    return {"train_s": train_s, "approx_time": any(e["approx"] for r in good for e in r["epochs"]),
            "examples_per_s": stats["examples"] * epochs / train_s, "tokens_per_s": stats["tokens"] * epochs / train_s,
            "padding_fraction": median("padding_fraction"), "peak_rss_bytes": median("peak_rss_bytes"),
            "peak_gpu_mib": median("peak_gpu_mib"), "first_epoch_loss": statistics.median(first),
            "last_epoch_loss": statistics.median(last), "rounds_train_s": [sum(e["train_s"] for e in r["epochs"]) for r in good],
            "deepspeed": good[0].get("deepspeed"), "failed_rounds": len(runs_of_variant) - len(good),
            "logs": [r["log"] for r in runs_of_variant]}


def compare(args, work, emit):
    data_dir, spm = setup(args, work, args.tasks)
    spec = write_spec(work, "encode", spm=spm, data_dir=data_dir, tasks=args.tasks, max_seq_len=args.max_seq_len, out=work)
    log = os.path.join(work, "encode.log")
    must(internal(args, MODULE, "encode", spec, log), "encoding the tasks", log)
    stats = {}
    for task in args.tasks:
        with open(os.path.join(work, f"{task}.features.json"), encoding="utf-8") as f:
            stats[task] = json.load(f)["stats"]
    emit(header(args, work, stats))
    raw = {t: {v: [] for v in args.variants} for t in args.tasks}
    for run_no in range(args.rounds):
        for task in args.tasks:
            for variant in args.variants:
                result = run_variant(args, work, variant, task, data_dir, run_no)
                raw[task][variant].append(result)
                emit(f"  round {run_no + 1} {task} {variant}: " + (f"FAILED {result['failed']}" if "failed" in result else
                     f"{sum(e['train_s'] for e in result['epochs']):.1f} s training, {result['wall_s']:.0f} s wall"))
    results = {t: {v: summarize(raw[t][v], stats[t], args.epochs) for v in args.variants} for t in args.tasks}
    emit(compare_table(args, results))
    return {"stats": stats, "results": results}


def header(args, work, stats):
    with open(os.path.join(work, "release.log"), encoding="utf-8") as f:
        model = json.loads([line for line in f if line.startswith("{")][-1])
    lines = [(f"model {args.model}: {model['config']}, vocab {model['vocab_size']}, {model['parameters'] / 1e6:.1f}M "
              f"encoder parameters; DeepSpeed config {os.path.relpath(args.ds_path, ROOT)}; {platform.node()}, "
              f"OMP_NUM_THREADS {child_env(args)['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.2f}"),
             (f"batch {args.batch_size}, lr {args.lr}, warmup {args.warmup_steps} steps, max_seq_len {args.max_seq_len}, "
              f"{args.epochs} epoch(s), seed {args.seed}, {args.rounds} round(s) (median)")]
    for task, s in stats.items():
        lines.append(f"  {task}: {s['examples']} train examples, {s['tokens']} non-pad tokens "
                     f"({s['tokens'] / s['examples']:.0f} per example)")
    return "\n".join(lines)


def compare_table(args, results):
    """Markdown: one row per task and variant; 'x T' and 'x Tg' are ratios to the Trainer without and with
    group_by_length; '~' marks training times that include the epoch's evaluation and save."""
    head = ["task", "variant", "train s", "examples/s", "tokens/s", "x T", "x Tg", "padding", "peak RSS GB", "x T",
            "loss ep1", "loss last", "s per round"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, by_variant in results.items():
        base, grouped = by_variant.get("trainer", {}), by_variant.get("trainer_grouped", {})
        for variant, r in by_variant.items():
            if "failed" in r:
                lines.append(f"| {task} | {variant} | failed: {r['failed'][:120]} (log {r['log']}) |")
                continue
            padding = f"{r['padding_fraction']:.1%}" if r["padding_fraction"] is not None else "-"
            lines.append("| " + " | ".join([
                task, variant, f"{r['train_s']:.1f}{'~' if r['approx_time'] else ''}", f"{r['examples_per_s']:.1f}",
                f"{r['tokens_per_s']:.0f}", ratio(r["tokens_per_s"], base.get("tokens_per_s")),
                ratio(r["tokens_per_s"], grouped.get("tokens_per_s")), padding, f"{r['peak_rss_bytes'] / 1e9:.2f}",
                ratio(r["peak_rss_bytes"], base.get("peak_rss_bytes")), fmt_loss(r["first_epoch_loss"]),
                fmt_loss(r["last_epoch_loss"]), " ".join(f"{t:.1f}" for t in r["rounds_train_s"])]) + " |")
    lines += ["", "x T / x Tg: tokens/s (or memory) over the Trainer's with group_by_length False / True."]
    lines += sift_lines(results) + gpu_lines(results)
    if any(r.get("approx_time") for v in results.values() for r in v.values()):
        lines.append("~: no per-epoch train_s in this tree's metrics.json: elapsed_s differences (training + the "
                     "epoch's val evaluation + the best-model save)")
    return "\n".join(lines)


def sift_lines(results):
    lines = []
    for task, r in results.items():
        off, on = r.get("ours", {}), r.get("ours_sift", {})
        if "train_s" in off and "train_s" in on:
            lines.append(f"SiFT on {task}: {on['train_s'] / off['train_s']:.2f}x the training time of SiFT off "
                         f"(same steps)")
    return lines


def gpu_lines(results):
    lines = []
    for task, r in results.items():
        peaks = {v: x["peak_gpu_mib"] for v, x in r.items() if x.get("peak_gpu_mib")}
        if peaks:
            lines.append(f"peak GPU memory on {task} (nvidia-smi, MiB): " + ", ".join(f"{v} {m}" for v, m in peaks.items()))
    return lines


# ---------------------------------------------------------------- main
def main(argv=None, emit=print):
    args = parse_args(argv)
    if args.internal:
        return run_internal(args.internal, {"encode": encode_features, "trainer": trainer_run})
    return run_bench(args, MODULE, compare, emit)


if __name__ == "__main__":
    sys.exit(main())
