"""Long sequences on the CPU: one disentangled attention layer's forward + backward (fp32, no dropout, no
padding) per path and sequence length, its time and its peak memory. For the choice of `auto`'s threshold on
the CPU (model/fast/attention_paths.py BLOCKWISE_FROM) and the check that the blockwise path's memory grows
linearly with the length.

    nice -n 10 python -m bench.long_attention
    python -m bench.long_attention --lengths 1024,2048 --paths eager,blockwise --reps 3

Paths: ours (attention_impl math: the plain module; eager, blockwise: converted) and `transformers` (transformers'
DisentangledSelfAttention on the same weights). Config: hidden 256, 4 heads of 64, 256 position buckets
(a table of 512 rows), batch 1 (options).

Each (path, length) runs in a fresh subprocess: the peak memory is the process's peak resident set during
the steps minus its resident set just before the first step, after the module, the inputs and the relative
index (ours: [N, N] int64; transformers': its relative positions) are built: the memory the step itself
needs. The peak is Linux's VmHWM, reset after building (clear_refs); where it cannot be reset, getrusage's
ru_maxrss, a lower bound (marked ≥) when building peaked higher than the steps. A length whose predicted
peak (the path's peak at its previous length, times the square of the length ratio: quadratic, pessimistic
for blockwise) exceeds --cap-gib is printed as skipped. Time: median seconds of --reps steps after one
warm-up step. The first step of a process also pays ~0.07 GiB of one-time allocations (thread pools,
kernels' buffers), which dominate the figures at 512 and 1024.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("math", "eager", "blockwise", "transformers")


def parse_args(argv=None):
    from pipeline.cli import Parser
    from pipeline.cli_types import names_from, positive_int
    p = Parser(prog="python -m bench.long_attention", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lambda s: [positive_int(n) for n in s.split(",")],
                   default=[512, 1024, 2048, 4096, 8192], help="comma-separated (default 512,1024,2048,4096,8192)")
    p.add_argument("--paths", type=names_from(PATHS), default=list(PATHS),
                   help=f"comma-separated, from {','.join(PATHS)} (default all)")
    p.add_argument("--hidden", type=positive_int, default=256, help="hidden size (default 256)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4: head size 64)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--reps", type=positive_int, default=2, help="timed steps after one warm-up (default 2)")
    p.add_argument("--cap-gib", type=float, default=8.0, help="skip a run predicted to need more (default 8)")
    p.add_argument("--timeout", type=positive_int, default=1800, help="seconds per run (default 1800)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", nargs=2, metavar=("PATH", "LENGTH"), default=None,
                   help="(internal) measure one path at one length in this process and print a JSON row")
    return p.parse_args(argv)


def bench_config(args):
    from model import preset
    return preset("tiny", hidden_size=args.hidden, num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                  position_buckets=256, max_relative_positions=512, max_position_embeddings=512,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def resident_bytes():
    """The process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    """Sets the peak resident set (VmHWM) to the resident set now; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes():
    """The process's peak resident set: VmHWM (since reset_peak), or getrusage's (since the start)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def layer_step(path, config, N, batch):
    """A function running one forward + backward of the path's attention layer at length N, its inputs built."""
    import torch
    from model.attention import DisentangledSelfAttention, relative_position_index
    from model.fast import convert
    torch.manual_seed(0)
    ours = DisentangledSelfAttention(config).train()
    hidden = torch.randn(batch, N, config.hidden_size, requires_grad=True)
    rel = torch.randn(2 * config.att_span, config.hidden_size, requires_grad=True)
    grad = torch.randn(batch, N, config.hidden_size)
    if path == "transformers":
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as Theirs
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
        module = Theirs(DebertaV2Config(**config.to_dict())).train()
        module.load_state_dict(ours.state_dict())
        positions = torch.empty(N, 1)  # build_relative_position reads the lengths and the device only
        relative_pos = build_relative_position(positions, positions, config.position_buckets, config.max_relative)
        mask = torch.ones(batch, 1, N, N, dtype=torch.bool)  # transformers takes no "no padding"
        return lambda: module(hidden, mask, relative_pos=relative_pos, rel_embeddings=rel)[0].backward(grad)
    module = ours if path == "math" else convert.apply(ours, path)
    rel_index = relative_position_index(N, N, config)
    return lambda: module(hidden, None, rel_index, rel).backward(grad)


def measure_one(args, path, N):
    """One row, in this process: seconds per step and the peak memory above the resident set before it."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    step = layer_step(path, bench_config(args), N, args.batch)
    reset = reset_peak()
    before, peak_before = resident_bytes(), peak_resident_bytes()
    step()  # warm-up
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_resident_bytes()
    # a peak no higher than the one before the step (imports, building) is a lower bound only
    return dict(path=path, length=N, seconds=statistics.median(times), peak_gib=(peak - before) / 2 ** 30,
                peak_is_lower_bound=not reset and peak <= peak_before)


def run_one(args, path, N):
    """measure_one in a fresh subprocess, or a row saying why there is none."""
    command = [sys.executable, "-m", "bench.long_attention", "--one", path, str(N), "--hidden", str(args.hidden),
               "--heads", str(args.heads), "--batch", str(args.batch), "--reps", str(args.reps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(path=path, length=N, failed=f"over {args.timeout} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(path=path, length=N, failed=f"exit {done.returncode}: {last[:200]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(row):
    if "skipped" in row:
        return f"skipped (needs ~{row['skipped']:.1f} GiB)"
    if "failed" in row:
        return f"failed: {row['failed']}"
    bound = "≥ " if row["peak_is_lower_bound"] else ""
    return f"{row['seconds']:.2f} s, {bound}{row['peak_gib']:.2f} GiB"


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args, args.one[0], int(args.one[1]))))
        return 0
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one attention layer, fp32, forward + "
          f"backward, no dropout, no padding: hidden {config.hidden_size}, {config.num_attention_heads} heads of "
          f"{config.head_size}, {2 * config.att_span} relative positions, batch {args.batch}; "
          f"seconds per step (median of {args.reps}), peak memory above the step's start", flush=True)
    rows = []
    for path in args.paths:
        previous = None  # (length, peak GiB) of the path's last measured length
        for N in args.lengths:
            predicted = None if previous is None else previous[1] * (N / previous[0]) ** 2
            if predicted is not None and predicted > args.cap_gib:
                row = dict(path=path, length=N, skipped=predicted)
            else:
                row = run_one(args, path, N)
                if "peak_gib" in row:
                    previous = (N, row["peak_gib"])
            rows.append(row)
            print(f"{path:12} {N:6d}  {cell(row)}", flush=True)
            if args.json:
                from pipeline.io import atomic_json
                atomic_json(args.json, rows)
    print()
    print("| L | " + " | ".join(args.paths) + " |")
    print("|---:|" + "---|" * len(args.paths))
    for N in args.lengths:
        cells = [cell(next(r for r in rows if r["path"] == p and r["length"] == N)) for p in args.paths]
        print(f"| {N} | " + " | ".join(cells) + " |")
    peaks = {r["length"]: r["peak_gib"] for r in rows if r["path"] == "blockwise" and "peak_gib" in r}
    for N in args.lengths:
        if N in peaks and N // 2 in peaks:
            print(f"blockwise peak memory {N}/{N // 2}: {peaks[N] / peaks[N // 2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
