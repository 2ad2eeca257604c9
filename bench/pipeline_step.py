"""Pipeline mode's training step time: `deberta-ds pretrain --set mode=pipeline` on 2 CPU ranks (2 stages).

    python -m bench.pipeline_step [--work /tmp/bench-pipe] [--steps 30] [--layers 4] [--hidden 256] [--seq 256]

Builds the demo corpus, a 1000-piece tokenizer and shards of --seq tokens in --work (once; reused when
present), then runs the real command under torchrun with 2 ranks and 2 pipeline stages, fp32, no dropout,
and reports the median `step_time_s` of metrics.jsonl over the logged intervals after the first (each
interval's value is the mean step time over its steps). The model is the tiny preset widened to --hidden
(heads of 64) with --layers layers; the global batch is 4 micro-batches of 4 sequences (1F1B over 2 stages).
"""
import argparse
import json
import os
import statistics
import time

from bench.runs import demo_shards, pretrain_metrics
from pipeline.cli import Parser
from pipeline.cli_types import at_least


def main(argv=None):
    p = Parser(prog="python -m bench.pipeline_step", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-pipeline-step", help="work directory (default %(default)s)")
    p.add_argument("--steps", type=at_least(10), default=30, help="training steps (default 30; logged every 5)")
    p.add_argument("--layers", type=at_least(2), default=4, help="encoder layers (default 4; 2 stages)")
    p.add_argument("--hidden", type=at_least(64), default=256, help="hidden size, heads of 64 (default 256)")
    p.add_argument("--seq", type=at_least(16), default=256, help="tokens per sequence (default 256)")
    args = p.parse_args(argv)
    shards = demo_shards(args.work, args.seq)
    out = os.path.join(args.work, f"run-{time.time():.0f}")
    overrides = {"num_hidden_layers": args.layers, "hidden_size": args.hidden,
                 "num_attention_heads": max(1, args.hidden // 64), "intermediate_size": 4 * args.hidden,
                 "max_position_embeddings": args.seq, "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}
    sets = ["mode=pipeline", "pipeline_stages=2", f"max_steps={args.steps}", "save_interval=100000",
            "log_interval=5", "global_batch_size=16", "micro_batch_size=4", "warmup_steps=2",
            f"model_overrides={json.dumps(dict(overrides, vocab_size=1100))}"]
    records = pretrain_metrics(sets, "cpu_pipeline_fp32", shards, out)
    times = [r["step_time_s"] for r in records if "step_time_s" in r][1:]
    print(json.dumps({"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "steps": args.steps,
                      "step_time_s_median": statistics.median(times), "step_time_s": times}))


if __name__ == "__main__":
    main()
