"""`make demo`: the whole flow on the embedded corpus, on this machine's CPUs, in a few minutes.

  1. corpus      the Python standard library's docstrings (real text every machine has)
  2. tokenizer   a sentencepiece model with DeBERTa's special ids
  3. shards      packed 128-token sequences, memory-mapped, with checksums; the last corpus file apart,
                 as validation shards
  4. pretrain    the tiny DeBERTa (MLM + Enhanced Mask Decoder), ZeRO-3 on 2 CPU ranks (torchrun, gloo),
                 with the held-out loss every quarter of the run; DEMO_OBJECTIVE=rtd pretrains DeBERTa-v3's way
                 instead (a generator and a discriminator, replaced token detection, gdes embedding sharing)
  5. convert     the ZeRO-3 checkpoint -> a release directory that transformers loads (--verify)
  6. finetune    a BoolQ-format task made from the corpus, with SiFT, under DeepSpeed
  7. predict     the leaderboard-format submission file

Run from the repository root as `python -m scripts.demo` (`make demo`). Everything goes to demo_out/ (or
$DEMO_OUT); each step is a `deberta-ds` command, printed before it runs.
Shorter: DEMO_PRETRAIN_STEPS (default 600), DEMO_FINETUNE_EPOCHS (default 6).
"""
import json
import os
import shutil
import subprocess
import sys
import time

from tests.helpers.launch import ROOT, cli_command as cli, run_env, torchrun_command
from tests.helpers.superglue import boolq_from_corpus

OUT = os.path.abspath(os.environ.get("DEMO_OUT", os.path.join(ROOT, "demo_out")))


def count_from_env(name, default, least):
    """An integer setting from the environment, at least `least`; a bad value stops the demo in one line."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        sys.exit(f"error: {name}={text!r}: expected a whole number, at least {least}")
    return value


# at least 4 steps: the demo evaluates every quarter of the run and saves at its half
PRETRAIN_STEPS = count_from_env("DEMO_PRETRAIN_STEPS", 600, 4)
OBJECTIVE = os.environ.get("DEMO_OBJECTIVE", "mlm")  # mlm (DeBERTa-v2) or rtd (DeBERTa-v3)
FINETUNE_EPOCHS = count_from_env("DEMO_FINETUNE_EPOCHS", 6, 1)
ENV = run_env()


def step(title, args, log_name):
    """Run one command with its output in logs/LOG_NAME, showing where that is and, while it runs, its latest
    line (in place on a terminal, every 15 s otherwise)."""
    log_path = os.path.join(OUT, "logs", log_name)
    print(f"\n== {title}\n$ {' '.join(args)}\n   log: {log_path}", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        shown = time.time()
        while process.poll() is None:
            time.sleep(1)
            latest = last_line(log_path)
            if sys.stdout.isatty():
                print(f"\r   {time.time() - started:4.0f} s  {latest[:100]:<100}", end="", flush=True)
            elif time.time() - shown >= 15:
                print(f"   {time.time() - started:4.0f} s  {latest[:100]}", flush=True)
                shown = time.time()
    if sys.stdout.isatty():
        print("\r" + " " * 112 + "\r", end="")
    if process.returncode != 0:
        print(f"failed (exit {process.returncode}); the end of {log_path}:")
        with open(log_path) as log:
            print("".join(log.readlines()[-40:]))
        sys.exit(1)
    print(f"   done in {time.time() - started:.0f} s")


def last_line(path):
    """The log's last line with text (progress bars rewrite their line with carriage returns)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4000))
        text = f.read().decode("utf-8", "replace").replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output yet)"


def logged_values(run_dir, key):
    """({step: KEY} of the training records, {step: val_KEY} of the held-out evaluations)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r[key] for r in records if key in r},
            {r["step"]: r["val_" + key] for r in records if "val_" + key in r})


def curve(run_dir, key):
    """(mean KEY of the first 10 steps it was recorded at, of the last 10, last step, {step: held-out KEY})."""
    values, held_out = logged_values(run_dir, key)
    steps = sorted(values)
    first, last = steps[:10], steps[-10:]
    return (sum(values[s] for s in first) / len(first), sum(values[s] for s in last) / len(last), steps[-1],
            held_out)


def print_pretraining(run):
    first, last, steps, held_out = curve(run, "loss")
    if OBJECTIVE == "mlm":
        print(f"   pretraining {steps} steps: MLM+EMD loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10)"
              f"; checkpoints in run/checkpoints, TensorBoard in run/tensorboard")
        print("               held-out loss (the last corpus file): "
              + ", ".join(f"{loss:.3f} at step {step}" for step, loss in sorted(held_out.items())))
    else:
        print(f"   pretraining {steps} steps of RTD: loss L_MLM + lambda L_RTD {first:.3f} (first 10 steps) -> "
              f"{last:.3f} (last 10); checkpoints in run/checkpoints, TensorBoard in run/tensorboard")
        for key, what in (("mlm_loss", "generator MLM loss"), ("rtd_loss", "discriminator RTD loss"),
                          ("replaced_rate", "share of tokens replaced"), ("rtd_accuracy", "discriminator accuracy")):
            logged, held = logged_values(run, key)
            (start, at_start), (end, at_end) = min(logged.items()), max(logged.items())
            print(f"               {what:<26} {at_start:.3f} at step {start} -> {at_end:.3f} at step {end}"
                  + (f"; held-out {held[max(held)]:.3f}" if held else ""))
    return first, last


def main():
    if OBJECTIVE not in ("mlm", "rtd"):
        sys.exit(f"error: DEMO_OBJECTIVE={OBJECTIVE!r}: use mlm (DeBERTa-v2) or rtd (DeBERTa-v3)")
    started = time.time()
    marker = os.path.join(OUT, ".deberta-ds-demo")
    if os.path.exists(OUT) and os.listdir(OUT) and not os.path.exists(marker):
        sys.exit(f"error: {OUT} holds files the demo did not make; the demo replaces its output directory, so "
                 "choose another DEMO_OUT (or empty this one)")
    shutil.rmtree(OUT, ignore_errors=True)  # a previous demo's output
    os.makedirs(os.path.join(OUT, "logs"))
    open(marker, "w").close()
    corpus, shards, valid, run, release = (os.path.join(OUT, n) for n in ("corpus", "shards", "valid", "run",
                                                                          "release"))
    step("1. corpus", cli("corpus", "--output", corpus), "corpus.log")
    step("2. tokenizer", cli("tokenizer", "train", "--input", os.path.join(corpus, "*"), "--output",
                             os.path.join(OUT, "spm"), "--vocab-size", "1000"), "tokenizer.log")
    # the last corpus file is held out: the validation shards pretraining evaluates on
    corpus_files = sorted(os.path.join(corpus, name) for name in os.listdir(corpus))
    step("3. shards", cli("preprocess", "--input", *corpus_files[:-1], "--tokenizer",
                          os.path.join(OUT, "spm.model"), "--output-dir", shards, "--max-seq-len", "128",
                          "--workers", "2", "--no-progress"), "preprocess.log")
    step("   validation shards", cli("preprocess", "--input", corpus_files[-1], "--tokenizer",
                                     os.path.join(OUT, "spm.model"), "--output-dir", valid, "--max-seq-len", "128",
                                     "--workers", "1", "--no-progress"), "preprocess_valid.log")
    step(f"4. pretrain {'MLM+EMD' if OBJECTIVE == 'mlm' else 'RTD (generator + discriminator)'}"
         " (ZeRO-3, 2 CPU ranks)",
         torchrun_command(2, "pipeline.cli", "pretrain", "--config", "configs/pretrain_tiny_cpu.json", "--deepspeed",
          "ds_configs/cpu_zero3_fp32.json", "--data-dir", shards, "--valid-data-dir", valid, "--output-dir", run,
          "--set", f"eval_interval={PRETRAIN_STEPS // 4}", "--set", f"max_steps={PRETRAIN_STEPS}",
          "--set", f"save_interval={PRETRAIN_STEPS // 2}",
          "--set", f"warmup_steps={PRETRAIN_STEPS // 10}",
          "--set", f"log_interval={max(1, min(50, PRETRAIN_STEPS // 12))}",
          "--set", f"objective={OBJECTIVE}"), "pretrain.log")
    step("5. convert to a release (and verify it in transformers)",
         cli("convert", "to-release", "--checkpoint", os.path.join(run, "checkpoints"), "--output", release,
             "--verify"), "convert.log")
    sizes = boolq_from_corpus(corpus, os.path.join(OUT, "superglue"))
    step("6. fine-tune BoolQ-format task with SiFT",
         cli("finetune", "--task", "BoolQ", "--release", release, "--data-dir", os.path.join(OUT, "superglue"),
             "--output-dir", os.path.join(OUT, "finetune"), "--deepspeed", "ds_configs/finetune_cpu.json",
             "--epochs", str(FINETUNE_EPOCHS), "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "10",
             "--max-seq-len", "128",
             "--sift", "on", "--sift-lambda", "1"), "finetune.log")
    step("7. predict: leaderboard submission file",
         cli("predict", "--task", "BoolQ", "--model", os.path.join(OUT, "finetune", "best"), "--data-dir",
             os.path.join(OUT, "superglue"), "--output-dir", os.path.join(OUT, "submission")), "predict.log")

    with open(os.path.join(OUT, "finetune", "metrics.json")) as f:
        finetune = json.load(f)
    print("\n== what the demo produced (all under", OUT + ")")
    print("   tokenizer   spm.model (1000 pieces + [MASK])")
    print(f"   shards      {shards}")
    first, last = print_pretraining(run)
    with open(os.path.join(OUT, "logs", "convert.log")) as f:
        verified = [line.strip() for line in f if line.startswith("verify:")]
    loads = ("AutoModelForMaskedLM" if OBJECTIVE == "mlm"
             else "AutoModel: the discriminator; the generator in pytorch_model.generator.bin")
    print(f"   release     {release} (loads with transformers.{loads})")
    for line in verified:
        print(f"               {line}")
    print(f"   fine-tuning BoolQ-format task ({sizes['train']} train / {sizes['val']} val): "
          f"best val accuracy {finetune['best']['val']['accuracy']:.2f} (epoch {finetune['best']['epoch']})")
    print(f"   submission  {os.path.join(OUT, 'submission', 'BoolQ.jsonl')}")
    print(f"   total time  {time.time() - started:.0f} s")
    if not last < first:
        print("pretraining loss did not fall", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
