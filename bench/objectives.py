"""MLM + EMD (DeBERTa-v2) against RTD + GDES (DeBERTa-v3, decoupled and joint training) for the same wall-clock
time on the demo corpus, each then fine-tuned on the demo's BoolQ-format task with several seeds: a measured
comparison, no threshold.

    python -m bench.objectives [--work /tmp/bench-objectives] [--seconds 300] [--seeds 1 2 3]
                               [--objectives mlm rtd rtd-joint]

The data are the demo's (scripts/demo.py: the corpus, a 1000-piece tokenizer, 128-token shards, the last corpus
file held out, the BoolQ-format "does the passage say return" task). Each objective pretrains the demo's tiny
model (configs/pretrain_tiny_cpu.json; rtd: its 2 layers are the discriminator, a 1-layer generator) with
ZeRO-3 on 2 CPU ranks; --seconds after its first step is logged, each rank gets SIGUSR1, finishes its step
and saves (the run's own stop path). The checkpoint is converted to a release (rtd: the discriminator, v3
layout) and fine-tuned with the demo's settings once per seed. Printed: per objective the steps reached, the
last logged losses, and the best val accuracy per seed with their mean; for rtd (decoupled training, the default)
and rtd-joint also what says whether the discriminator learned more than the base rate: its loss over the last 10
log lines against the entropy of the replaced share (the loss of always predicting that share), its accuracy
against 1 - the replaced share (always answering "original"), the share of logged steps whose gradient norm exceeded the
DeepSpeed config's clipping (joint: the one norm over both networks; decoupled: G's and D's own), and for every
release the spread of its [CLS] vectors: the mean pairwise cosine of the final [CLS] states of 64 held-out
sequences (near 1: every input gets about the same [CLS]). For rtd also: the released G and D on 128 held-out
sequences (discriminator_probe: D's loss, accuracy and threshold-free AUC, with G's replacements and with random
ones), and the discriminator's trajectory: per WINDOW log lines, its loss over the entropy, its accuracy minus the
base rate's, G's MLM loss and G's share of samples equal to the original (is D ahead early, behind as G improves?).

To compare run settings: `--set KEY=VALUE` (repeatable) is passed to every pretraining after the objective's own
items (e.g. --set rtd_lambda=50 --set generator_layers=1 --set model_overrides.num_hidden_layers=4), --label
names the run, release and log (run-OBJECTIVE-LABEL), and --seeds with no seed skips the fine-tuning.
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from pipeline.cli import Parser
from pipeline.cli_types import positive_float
from tests.helpers import launch
from tests.helpers.launch import ROOT, or_exit, pretrain_command, run_env
from tests.helpers.superglue import boolq_from_corpus


def cli(*args):
    """`deberta-ds ARGS`; the bench stops with the command's error if it fails."""
    return or_exit(launch.cli(*args, timeout=None), f"deberta-ds {args[0]}")


def prepare_data(work):
    corpus, superglue = os.path.join(work, "corpus"), os.path.join(work, "superglue")
    if os.path.exists(os.path.join(superglue, "BoolQ", "test.jsonl")):
        return
    cli("corpus", "--output", corpus)
    cli("tokenizer", "train", "--input", os.path.join(corpus, "*"), "--output", os.path.join(work, "spm"),
        "--vocab-size", "1000")
    files = sorted(os.path.join(corpus, name) for name in os.listdir(corpus))
    spm = os.path.join(work, "spm.model")
    cli("preprocess", "--input", *files[:-1], "--tokenizer", spm, "--output-dir", os.path.join(work, "shards"),
        "--max-seq-len", "128", "--no-progress")
    cli("preprocess", "--input", files[-1], "--tokenizer", spm, "--output-dir", os.path.join(work, "valid"),
        "--max-seq-len", "128", "--no-progress")
    boolq_from_corpus(corpus, superglue)


OBJECTIVES = {"mlm": ["objective=mlm"], "rtd": ["objective=rtd", "rtd_training=decoupled"],
              "rtd-joint": ["objective=rtd", "rtd_training=joint"]}
CLIPPING = 1.0  # ds_configs/cpu_zero3_fp32.json's gradient_clipping, which the bench's runs use
WINDOW = 10  # log lines (of 25 steps) the discriminator's loss and accuracy are averaged over


def pretrain_for(objective, seconds, work, extra_sets=(), label=""):
    """Pretrain until SIGUSR1 `seconds` after the first logged step; the run directory."""
    name = objective + (f"-{label}" if label else "")
    run = os.path.join(work, f"run-{name}")
    done = os.path.join(run, "bench_stopped.json")
    sets = ["max_steps=100000", "save_interval=100000", "log_interval=25", "eval_interval=100000",
            "warmup_steps=60"] + OBJECTIVES[objective] + list(extra_sets)
    if os.path.exists(done):  # a previous invocation's pretraining, stopped as this one would be
        with open(done) as f:
            if json.load(f) == {"seconds": seconds, "sets": sets}:
                return run
    if os.path.exists(run):
        sys.exit(f"error: {run} exists with other settings or unfinished: remove it (or choose another --work) to "
                 "measure again")
    cmd = pretrain_command(os.path.join(work, "shards"), run, sets=sets,
                           args=["--valid-data-dir", os.path.join(work, "valid")])
    with open(os.path.join(work, f"pretrain-{name}.log"), "w") as log:
        torchrun = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT)
        metrics = os.path.join(run, "metrics.jsonl")
        while not os.path.exists(metrics) and torchrun.poll() is None:
            time.sleep(0.5)
        time.sleep(seconds)
        # the workers, not torchrun: each rank's StopFlag turns SIGUSR1 into "finish the step, save, exit 75"
        workers = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
        for pid in workers:
            os.kill(int(pid), signal.SIGUSR1)
        torchrun.wait()
    # torchrun exits 1 when its workers exit 75 (checkpointed after the signal): read the ranks' codes
    with open(log.name) as f:
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", f.read())
    if torchrun.returncode != 0 and not (codes and set(codes) == {"75"}):
        sys.exit(f"error: pretrain ({name}) exited {torchrun.returncode} (ranks: {codes}): see {log.name}")
    with open(done, "w") as f:
        json.dump({"seconds": seconds, "sets": sets}, f)
    return run


def summary(run, objective):
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    logged = [r for r in records if "step_time_s" in r]
    held_out = [r for r in records if "val_loss" in r]
    keys = ("loss",) if objective == "mlm" else ("loss", "mlm_loss", "rtd_loss", "replaced_rate", "rtd_accuracy")
    out = {"steps": max(r["step"] for r in records), **{f"last_{k}": logged[-1][k] for k in keys}}
    if held_out:
        out["held_out_loss"] = held_out[-1]["val_loss"]
    if objective != "mlm":
        out.update(against_base_rate(logged[-WINDOW:]))
        out["clipped_share"] = clipped_share(logged, "grad_norm")  # joint: both networks'; decoupled: G's
        if "discriminator_grad_norm" in logged[-1]:
            out["discriminator_clipped_share"] = clipped_share(logged, "discriminator_grad_norm")
        out["trajectory"] = trajectory(logged)
    return out


def trajectory(logged):
    """Per WINDOW log lines: [last step, D loss / entropy, D accuracy - base rate's, G's MLM loss, G correct]."""
    rows = []
    for start in range(0, len(logged) - WINDOW + 1, WINDOW):
        records = logged[start:start + WINDOW]
        d = against_base_rate(records)
        rows.append([records[-1]["step"], round(d["rtd_loss_over_entropy"], 3),
                     round(d["window_rtd_accuracy"] - d["base_rate_accuracy"], 4),
                     round(statistics.mean(r["mlm_loss"] for r in records), 2),
                     round(statistics.mean(r["generator_correct"] for r in records), 3)])
    return rows


def against_base_rate(records):
    """The discriminator's loss and accuracy, means over `records` (the last WINDOW log lines: one logged step is
    one noisy sample), beside what answering by the replaced share alone gives."""
    share, loss, accuracy = (statistics.mean(r[key] for r in records) for key in ("replaced_rate", "rtd_loss",
                                                                                   "rtd_accuracy"))
    entropy = -share * math.log(share) - (1 - share) * math.log(1 - share) if 0 < share < 1 else 0.0
    return {"window_rtd_loss": loss, "window_replaced_rate": share, "base_rate_entropy": entropy,
            "rtd_loss_over_entropy": loss / entropy if entropy else None, "window_rtd_accuracy": accuracy,
            "base_rate_accuracy": 1 - share}


def clipped_share(logged, key):
    """The share of logged steps whose gradient norm (before clipping) exceeded the clipping threshold."""
    norms = [r[key] for r in logged if r.get(key) is not None]
    return sum(norm > CLIPPING for norm in norms) / len(norms) if norms else None


def cls_spread(release, work, count=64):
    """Mean pairwise cosine similarity of the final [CLS] states of `count` held-out sequences."""
    import torch

    from pipeline.data.shards import ShardSet
    from pipeline.release import load_release
    valid = ShardSet(os.path.join(work, "valid"))
    samples = [torch.tensor(valid.sample(i).astype("int64")) for i in range(min(count, len(valid)))]
    ids = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in samples], batch_first=True)
    with torch.no_grad():
        cls = load_release(release, task="base")(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    cls = torch.nn.functional.normalize(cls.float(), dim=-1)
    cosine = cls @ cls.T
    pairs = len(cls) * (len(cls) - 1)
    return float((cosine.sum() - cosine.diagonal().sum()) / pairs)


def auc(scores, labels):
    """The area under the ROC curve of `scores` for the 0/1 `labels` (the Mann-Whitney statistic; ties are rare
    in float logits and are not averaged)."""
    import torch
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[torch.argsort(scores)] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    positive = labels.bool()
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else None


def discriminator_probe(release, work, batches=8, micro_batch=16):
    """The released generator and discriminator on `batches` held-out micro-batches of RTD masking (the run's
    seed's masks, each sample's own seed's draws): D's loss over the base-rate entropy, its accuracy beside
    1 - the replaced share, and its AUC (replaced against original over all valid tokens: does D rank the
    replacements above the rest, whatever its threshold?), with G's replacements and, the same masks filled with
    uniformly random tokens, with replacements that context alone gives away."""
    import torch
    import torch.nn.functional as F

    from model.rtd import RTDModel
    from pipeline.data.mlm_loader import build_pretrain_loader
    from pipeline.release.read import Release
    from pipeline.release.rtd import load_rtd_release_into, read_generator
    config = Release(release).config
    generator_config, generator = read_generator(release, config)
    # the EMD's absolute position table is in the generator's file when the run had emd
    model = RTDModel(config, generator_config, "gdes", emd="deberta.embeddings.position_embeddings.weight" in generator)
    load_rtd_release_into(model, release, stage=0, rank=0)
    model.eval()
    loader = iter(build_pretrain_loader(os.path.join(work, "valid"), os.path.join(work, "spm.model"), micro_batch,
                                        0, 1, 1234, masking="rtd"))
    data, draws, out = [next(loader) for _ in range(batches)], torch.Generator().manual_seed(0), {}
    for replacements in ("generator", "random"):
        logits, labels = [], []
        for batch in data:
            count = int((batch["labels"] != -100).sum())
            how = (dict(sample_seeds=batch["sample_seeds"]) if replacements == "generator" else
                   dict(sampled=torch.randint(5, config.vocab_size - 1, (count,), generator=draws)))
            with torch.no_grad():
                judged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"], **how)
            valid = batch["attention_mask"].bool()
            logits.append(judged.rtd_logits[valid].float())
            labels.append(judged.replaced[valid])
        scores, replaced = torch.cat(logits), torch.cat(labels)
        share = float(replaced.float().mean())
        entropy = -share * math.log(share) - (1 - share) * math.log(1 - share)
        loss = float(F.binary_cross_entropy_with_logits(scores, replaced.float()))
        out[replacements] = {"rtd_loss_over_entropy": loss / entropy,
                             "rtd_accuracy": float(((scores > 0).long() == replaced).float().mean()),
                             "base_rate_accuracy": 1 - share, "auc": auc(scores, replaced)}
    return out


def finetune(release, seed, work, objective):
    out = os.path.join(work, f"finetune-{objective}-seed{seed}")
    cli("finetune", "--task", "BoolQ", "--release", release, "--data-dir", os.path.join(work, "superglue"),
        "--output-dir", out, "--deepspeed", "ds_configs/finetune_cpu.json", "--epochs", "6", "--batch-size", "16",
        "--lr", "1e-3", "--warmup-steps", "10", "--max-seq-len", "128", "--sift", "on", "--sift-lambda", "1",
        "--seed", str(seed))
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)["best"]["val"]["accuracy"]


def main(argv=None):
    p = Parser(prog="python -m bench.objectives", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-objectives", help="work directory, reused (default %(default)s)")
    p.add_argument("--seconds", type=positive_float, default=300,
                   help="pretraining time per objective after its first step (default 300)")
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3],
                   help="fine-tuning seeds (default 1 2 3; none: no fine-tuning)")
    p.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=["mlm", "rtd", "rtd-joint"],
                   help="what to pretrain: mlm, rtd (decoupled training, the default), rtd-joint (default: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting for every pretraining, after the objective's (repeatable)")
    p.add_argument("--label", default="", help="names the runs, releases and logs: run-OBJECTIVE-LABEL")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    prepare_data(args.work)
    report = {"seconds": args.seconds, "sets": args.sets}
    for objective in args.objectives:
        name = objective + (f"-{args.label}" if args.label else "")
        run = pretrain_for(objective, args.seconds, args.work, args.sets, args.label)
        release = os.path.join(args.work, f"release-{name}")
        # --overwrite: a previous invocation's release may be of a run since removed and measured again
        cli("convert", "to-release", "--checkpoint", os.path.join(run, "checkpoints"), "--output", release,
            "--overwrite")
        accuracies = [finetune(release, seed, args.work, name) for seed in args.seeds]
        held_out = {} if objective == "mlm" else {"held_out": discriminator_probe(release, args.work)}
        report[objective] = dict(summary(run, objective), **held_out, cls_cosine=cls_spread(release, args.work),
                                 val_accuracy=accuracies,
                                 val_accuracy_mean=statistics.mean(accuracies) if accuracies else None)
        print(json.dumps({objective: report[objective]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
