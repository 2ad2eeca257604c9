"""A whole pretraining step on long sequences, without and with sequence parallelism, on 2 CPU ranks:
`python -m bench.sequence_parallel [--seq-len 4096] [--steps 5]`.

Both runs train the same global batch of 2 sequences of --seq-len tokens with the tiny config (hidden 64,
4 heads, 2 layers; the EMD's position table sized to the length; --set changes it):
  SP=1  2 data-parallel ranks, each one whole sequence per step
  SP=2  one sequence group of 2 ranks, each half of every sequence (2 micro-batches a step)
and the table gives the median step time (the first step left out) and rank 0's peak memory as the run logs them
(metrics.jsonl: step_time_s, memory_gb; on the CPU the process's peak RSS, about 0.6 GB of it the process itself).

`--model-memory` measures the model alone instead: one sequence of --seq-len tokens, forward + backward of the MLM
model (the run's model settings from --set; blockwise attention), its peak resident memory above the start of the
step (Linux VmHWM, reset first), without SP on each of 2 ranks and split over the 2 ranks."""
import argparse
import os
import shutil
import statistics
import tempfile

from bench.runs import demo_shards, pretrain_metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sequence_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    parser.add_argument("--attention-impl", default="auto", help="model attention_impl (default auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run setting for both runs, e.g. model_overrides.hidden_size=256 (repeatable)")
    parser.add_argument("--model-memory", action="store_true", help="the model alone's peak memory (see above)")
    parser.add_argument("--child", choices=("whole", "split"), help=argparse.SUPPRESS)  # a torchrun rank of --model-memory
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    return parser.parse_args(argv)


def measure(args, data_dir, sp, work):
    micro = 1
    sets = [f"sequence_parallel_size={sp}", "global_batch_size=2", f"micro_batch_size={micro}",
            f"max_steps={args.steps}", "log_interval=1", f"save_interval={args.steps + 1}",
            f"model_overrides.attention_impl={args.attention_impl}"] + args.set
    out = os.path.join(work, f"sp{sp}")
    shutil.rmtree(out, ignore_errors=True)  # a new run each time (the work directory keeps only the shards)
    records = [r for r in pretrain_metrics(sets, "cpu_zero3_fp32", data_dir, out)
               if "step_time_s" in r]
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    return statistics.median(times), max(r.get("memory_gb", 0.0) for r in records)


def model_config(args):
    """The run config's model (configs/pretrain_tiny_cpu.json with --set), at --seq-len positions, blockwise."""
    from pipeline.train.config import RunConfig
    run = RunConfig.from_file("tiny_cpu", args.set).fitted_to(args.seq_len)[0]
    return run.model_config().replace(attention_impl="blockwise")


def model_memory_child(args):
    """One rank of --model-memory: prints (rank 0) the step's peak memory above its start."""
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist

    from bench.long_attention import peak_resident_bytes, reset_peak
    from model.fast import convert
    from model.heads import DebertaForMaskedLM
    from pipeline.train import sequence_parallel

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = model_config(args)
    model = convert.apply(DebertaForMaskedLM(config), "blockwise")
    if args.child == "split":
        sequence_parallel.apply(model, sequence_parallel.SequenceGroup(dist.get_world_size()))
    ids = torch.randint(5, config.vocab_size, (1, args.seq_len))
    labels = torch.full_like(ids, -100)
    labels[:, ::7] = ids[:, ::7]  # one token in 7 predicted
    for _ in range(2):  # the second step: the first one's one-time allocations are behind it
        model.zero_grad(set_to_none=True)
        gc.collect()
        reset_peak()
        start = peak_resident_bytes()
        model(input_ids=ids, labels=labels).loss.backward()
        dist.barrier()
        peak = (peak_resident_bytes() - start) / 2 ** 30
    if dist.get_rank() == 0:
        print(f"PEAK {peak:.3f}")


def model_memory(args):
    import subprocess
    import sys

    from tests.helpers.launch import ROOT, free_port, run_env
    print(f"\nthe MLM model alone ({' '.join(args.set) or 'tiny config'}), 1 x {args.seq_len} tokens, blockwise, "
          "forward + backward, peak resident memory above the step's start (rank 0)\n")
    print("| | peak (GiB) |\n|---|---|")
    for mode, label in (("whole", "whole sequence on each rank"), ("split", "SP=2: half on each rank")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "bench.sequence_parallel", "--child", mode, "--seq-len", str(args.seq_len)]
        cmd += [item for setting in args.set for item in ("--set", setting)]
        result = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        peaks = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK")]
        if result.returncode != 0 or not peaks:
            sys.exit(f"error: {mode} failed:\n{result.stderr[-3000:]}")
        print(f"| {label} | {peaks[0]} |")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return model_memory_child(args)
    if args.model_memory:
        return model_memory(args)
    work = args.work or tempfile.mkdtemp(prefix="bench_sp_")
    data_dir = demo_shards(work, args.seq_len)
    rows = [(sp, *measure(args, data_dir, sp, work)) for sp in (1, 2)]
    changed = f" with {' '.join(args.set)}" if args.set else ""
    print(f"\ntiny config{changed}, {args.seq_len} tokens, global batch 2, 2 CPU ranks, attention_impl {args.attention_impl}, "
          f"{args.steps} steps\n")
    print("| sequence_parallel_size | step time (s, median) | peak memory per rank (GB) |")
    print("|---|---|---|")
    for sp, seconds, memory in rows:
        print(f"| {sp} | {seconds:.2f} | {memory:.2f} |")


if __name__ == "__main__":
    main()
