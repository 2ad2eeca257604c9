"""An RTD step (DeBERTa-v3: generator + discriminator) against an MLM + EMD step of the same model (the
discriminator), both `deberta-ds pretrain` under ZeRO-3 on 2 CPU ranks, each in its own torchrun.

    python -m bench.rtd_step [--work /tmp/bench-rtd] [--steps 30] [--layers 4] [--hidden 256] [--seq 256]
                            [--generator-layers 0] [--repeats 1]

Builds the demo corpus, a 1000-piece tokenizer and shards of --seq tokens in --work (once; reused when
present). The model is the tiny preset widened to --hidden (heads of 64) with --layers layers, no dropout,
fp32; with objective rtd the generator has --generator-layers layers (0: half). Each run logs every 5 steps;
the report is, per objective, the median over the logged intervals after the first of `step_time_s` and
`tokens_per_s` (metrics.jsonl) and rank 0's peak resident memory (`memory_gb`: ru_maxrss on CPU,
max_memory_allocated on CUDA), then the ratios rtd / mlm. --repeats N alternates the two N times (mlm, rtd,
mlm, rtd, ...) and reports the median of the runs' medians.
"""
import argparse
import json
import os
import statistics
import time

from bench.runs import demo_shards, pretrain_metrics
from pipeline.cli import Parser
from pipeline.cli_types import at_least, positive_int


def run_once(objective, args, shards):
    """One pretraining run: {step_time_s, tokens_per_s, memory_gb} (medians over the logged intervals)."""
    out = os.path.join(args.work, f"run-{objective}-{time.time():.0f}")
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
                 "num_attention_heads": max(1, args.hidden // 64), "intermediate_size": 4 * args.hidden,
                 "max_position_embeddings": args.seq, "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0,
                 "vocab_size": 1100}
    sets = [f"objective={objective}", f"generator_layers={args.generator_layers}", f"max_steps={args.steps}",
            "save_interval=100000", "log_interval=5", "global_batch_size=16", "micro_batch_size=8",
            "warmup_steps=2", f"model_overrides={json.dumps(overrides)}"]
    records = pretrain_metrics(sets, "cpu_zero3_fp32", shards, out, what=f"pretrain ({objective})")
    logged = [r for r in records if "step_time_s" in r][1:]
    return {key: statistics.median(r[key] for r in logged) for key in ("step_time_s", "tokens_per_s", "memory_gb")}


def main(argv=None):
    p = Parser(prog="python -m bench.rtd_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-rtd-step", help="work directory (default %(default)s)")
    p.add_argument("--steps", type=at_least(10), default=30, help="training steps per run (default 30; logged every 5)")
    p.add_argument("--layers", type=at_least(2), default=4, help="the discriminator's (and the MLM model's) layers")
    p.add_argument("--hidden", type=at_least(64), default=256, help="hidden size, heads of 64 (default 256)")
    p.add_argument("--seq", type=at_least(16), default=256, help="tokens per sequence (default 256)")
    p.add_argument("--generator-layers", type=at_least(0), default=0, help="0: half of --layers (the default recipe)")
    p.add_argument("--repeats", type=positive_int, default=1, help="mlm/rtd alternations (default 1)")
    args = p.parse_args(argv)
    shards = demo_shards(args.work, args.seq)
    runs = {"mlm": [], "rtd": []}
    for _ in range(args.repeats):
        for objective in runs:
            runs[objective].append(run_once(objective, args, shards))
    report = {objective: {key: statistics.median(r[key] for r in results) for key in results[0]}
              for objective, results in runs.items()}
    report["rtd_over_mlm"] = {key: report["rtd"][key] / report["mlm"][key] for key in report["mlm"]}
    report["setup"] = {"layers": args.layers, "generator_layers": args.generator_layers or args.layers // 2,
                       "hidden": args.hidden, "seq": args.seq, "steps": args.steps, "repeats": args.repeats,
                       "ranks": 2, "global_batch": 16}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
