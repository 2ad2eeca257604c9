"""A whole pretraining step on long sequences, without and with sequence parallelism, on 2 CPU ranks:
`python -m bench.sequence_parallel [--seq-len 4096] [--steps 5]`.

Both runs train the same global batch of 2 sequences of --seq-len tokens with the tiny config (hidden 64,
4 heads, 2 layers; the EMD's position table sized to the length):
  SP=1  2 data-parallel ranks, each one whole sequence per step
  SP=2  one sequence group of 2 ranks, each half of every sequence (2 micro-batches a step)
and the table gives the median step time (the first step left out) and the larger rank's peak memory as the run
logs them (metrics.jsonl: step_time_s, memory_gb)."""
import argparse
import os
import statistics
import tempfile

from bench.runs import demo_shards, pretrain_metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sequence_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    parser.add_argument("--attention-impl", default="auto", help="model attention_impl (default auto)")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    return parser.parse_args(argv)


def measure(args, data_dir, sp, work):
    micro = 1
    sets = [f"sequence_parallel_size={sp}", "global_batch_size=2", f"micro_batch_size={micro}",
            f"max_steps={args.steps}", "log_interval=1", f"save_interval={args.steps + 1}",
            f"model_overrides.attention_impl={args.attention_impl}"]
    records = [r for r in pretrain_metrics(sets, "cpu_zero3_fp32", data_dir, os.path.join(work, f"sp{sp}"))
               if "step_time_s" in r]
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    return statistics.median(times), max(r.get("memory_gb", 0.0) for r in records)


def main(argv=None):
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench_sp_")
    data_dir = demo_shards(work, args.seq_len)
    rows = [(sp, *measure(args, data_dir, sp, work)) for sp in (1, 2)]
    print(f"\ntiny config, {args.seq_len} tokens, global batch 2, 2 CPU ranks, attention_impl {args.attention_impl}, "
          f"{args.steps} steps\n")
    print("| sequence_parallel_size | step time (s, median) | peak memory per rank (GB) |")
    print("|---|---|---|")
    for sp, seconds, memory in rows:
        print(f"| {sp} | {seconds:.2f} | {memory:.2f} |")


if __name__ == "__main__":
    main()
