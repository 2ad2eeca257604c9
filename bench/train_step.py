"""Training and inference throughput: our DeBERTa-v2 against transformers' DebertaV2ForMaskedLM.

Both models are built from the same config and run on the same batch, sequence length and precision in
one process. On the CPU the variants alternate (round 1: A B C..., round 2: A B C...), so that load from
other processes on a shared machine hits all of them alike; the reported time is the median over rounds.
On CUDA each variant is built, timed and freed in turn (two 1.5B models with AdamW states do not fit on
one GPU side by side, and a GPU is not shared).

Training variants (forward, backward, AdamW step):
  theirs        transformers' DebertaV2ForMaskedLM: the head and the loss over all B*N positions
  ours_emd      ours as pretrained in the paper: Enhanced Mask Decoder, head at the masked positions
  ours_mlm      like for like: head on the last layer (emd=False), at the masked positions only
  ours_mlm_all  strictly like for like: head on the last layer at all positions, loss as transformers
Inference variants (encoder forward, no head): theirs, ours.

Allocator (CPU): the timed process runs with glibc's malloc told to keep what it frees
(MALLOC_MMAP_THRESHOLD_=32 MiB, glibc's own ceiling for its moving threshold, and MALLOC_TRIM_THRESHOLD_
= 16 GiB), the steady state of a long training or serving process. With glibc's defaults every step of
either model pays the kernel's page faults for its fresh [B, H, N, N] tensors again, how many depending on
what ran before in the process: the same run gave transformers' bf16 inference 0.62 s or 1.9 s per step.
--default-malloc times with the defaults instead. The memory runs always use the defaults.

Peak memory: on the CPU each variant runs again in a fresh subprocess and reports its own peak resident
set (VmHWM: the process peak, so it includes the interpreter, torch and the weights; 'above base' leaves
out what the process held before building the model); on CUDA torch.cuda.max_memory_allocated.
MFU: the matmul FLOPs a variant needs (analytic, below) per second, over a matmul peak measured here.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from model import DebertaForMaskedLM, preset
from model.fast import convert
from pipeline.cli import Parser
from pipeline.cli_types import at_least, fraction, names_from, positive_int
from tests.helpers.launch import ROOT

# "cpu": the 6-layer base-width model of the issue (fits 2 cores); "xxlarge": the 1.5B model.
SIZES = {
    "cpu": dict(name="base", num_hidden_layers=6, vocab_size=32000),
    "xxlarge": dict(name="xxlarge"),
    "tiny": dict(name="tiny"),
}
TRAIN_VARIANTS = ("theirs", "ours_emd", "ours_mlm", "ours_mlm_all")
INFER_VARIANTS = ("theirs", "ours")
IGNORE = -100
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2 ** 30)}


def parse_args(argv=None):
    p = Parser(prog="python -m bench.train_step", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--preset", default=None, choices=sorted(SIZES),
                   help="model size: 'cpu' (6 layers, hidden 768, vocab 32000; default on cpu) or 'xxlarge' (1.5B; default on cuda)")
    p.add_argument("--batch", type=positive_int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=at_least(8), default=512, help="tokens per sequence (default 512)")
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"],
                   help="fp32, bf16 autocast (fp32 weights, as mixed-precision training), or both (default)")
    p.add_argument("--mode", default="both", choices=["train", "infer", "both"], help="what to time (default both)")
    p.add_argument("--variants", type=names_from(sorted(set(TRAIN_VARIANTS + INFER_VARIANTS))), default=None,
                   help=f"comma-separated subset; train: {','.join(TRAIN_VARIANTS)}; infer: {','.join(INFER_VARIANTS)}")
    p.add_argument("--mask-prob", type=fraction, default=0.15, help="fraction of positions with an MLM label (default 0.15)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed steps per variant before timing (default 1)")
    p.add_argument("--steps", type=positive_int, default=1, help="timed steps per variant per round (default 1)")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds; the median round counts (default 3)")
    p.add_argument("--attention-impl", default=None, choices=["auto", "math", "eager", "sdpa", "fused", "blockwise"],
                   help="our attention path: math (the plain formula), eager, sdpa, fused or blockwise (model/fast/"
                        "attention_paths.py); default: the config's, auto")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory runs")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--default-malloc", action="store_true",
                   help="time with glibc malloc's default settings (see Allocator above)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--probe", default=None,
                   help="internal: run only this variant (with --mode train|infer and --dtype fp32|bf16) and print "
                        "its peak memory as JSON; used for the fresh-subprocess memory runs")
    args = p.parse_args(argv)
    args.preset = args.preset or ("xxlarge" if args.device == "cuda" else "cpu")
    return args


def make_config(args):
    size = dict(SIZES[args.preset])
    config = preset(size.pop("name"), **size)
    if args.attention_impl:
        config = config.replace(attention_impl=args.attention_impl)
    return config


def make_batch(config, args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.batch, args.seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < args.mask_prob, ids, IGNORE)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


# ---------------------------------------------------------------- models
def build(variant, config, mode, device):
    # built (and initialised) on the device itself: initialising 1.5B parameters on the CPU first
    # would take longer than the whole GPU benchmark
    with torch.device(device):
        if variant == "theirs":
            import transformers
            values = config.to_dict()
            values["legacy"] = False  # the official head layout, as ours
            model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**values))
        else:
            model = convert.apply(DebertaForMaskedLM(config, emd=variant == "ours_emd"), config.attention_impl)
    if mode == "infer":
        return model.eval(), None
    # the fused AdamW (CPU and CUDA): the optimizer is the same for every variant, and the fastest one
    # keeps a fixed cost from blurring the model's own speed
    return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_step(variant, model, opt, batch, autocast):
    ids, mask, labels = batch
    opt.zero_grad(set_to_none=True)
    with autocast():
        if variant == "ours_mlm_all":  # the head at every position, the loss as transformers computes it
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=IGNORE)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()


def infer_step(variant, model, batch, autocast):
    ids, mask, _ = batch
    with torch.inference_mode(), autocast():
        model.deberta(input_ids=ids, attention_mask=mask)


def runner(variant, model, opt, batch, autocast, mode):
    if mode == "train":
        return lambda: train_step(variant, model, opt, batch, autocast)
    return lambda: infer_step(variant, model, batch, autocast)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n, device):
    if n == 0:
        return 0.0
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


# ---------------------------------------------------------------- FLOPs and peaks
def layer_flops(config, n_query, n_key, batch, kv_rows_computed=True):
    """Matmul FLOPs of one layer forward for `batch` sequences: n_query query rows attend to n_key keys."""
    d, inner, inter, span2 = config.hidden_size, config.num_attention_heads * config.head_size, \
        config.intermediate_size, 2 * config.att_span
    f = 2 * n_query * d * inner  # query projection
    f += 2 * 2 * n_key * d * inner if kv_rows_computed else 0  # key and value projections
    f += 2 * 2 * n_query * n_key * inner  # scores and context
    if config.relative_attention:
        f += 2 * n_query * span2 * inner * ("c2p" in config.pos_att_type)  # Q·Krᵀ
        f += 2 * n_key * span2 * inner * ("p2c" in config.pos_att_type)  # K·Qrᵀ
    f += 2 * n_query * inner * d + 2 * 2 * n_query * d * inter  # attention output, FFN
    f *= batch
    if config.relative_attention:  # the position table's projections: once per layer, not per sequence
        f += 2 * span2 * d * inner * len(config.pos_att_type)
    return f


def model_flops(variant, config, args, mode):
    """Matmul FLOPs one step of `variant` needs (training: 3x the forward)."""
    B, N, L, D = args.batch, args.seq, config.num_hidden_layers, config.hidden_size
    masked = round(args.mask_prob * N)
    conv = 2 * N * D * D * config.conv_kernel_size // config.conv_groups * B if config.conv_kernel_size else 0
    if mode == "infer":
        return L * layer_flops(config, N, N, B) + conv
    head = lambda rows: 2 * rows * (D * config.embed_size + config.embed_size * config.vocab_size)  # noqa: E731
    if variant == "ours_emd":  # L-1 layers, then the last layer twice with the masked query rows only
        fwd = (L - 1) * layer_flops(config, N, N, B) + conv + 2 * layer_flops(config, masked, N, B) + head(B * masked)
    elif variant == "ours_mlm":
        fwd = L * layer_flops(config, N, N, B) + conv + head(B * masked)
    else:
        fwd = L * layer_flops(config, N, N, B) + conv + head(B * N)
    return 3 * fwd


def matmul_peak(dtype, device, size=None, reps=5):
    """Best FLOP/s of a square matmul: the machine's practical peak for this dtype."""
    size = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        best = min(best, time_steps(lambda: torch.matmul(a, b), 1, device))
    return 2 * size ** 3 / best


# ---------------------------------------------------------------- running
def autocast_for(dtype_name, device):
    if dtype_name == "bf16":
        return lambda: torch.autocast(device, dtype=torch.bfloat16)
    return lambda: torch.autocast(device, enabled=False)


def peak_memory_subprocess(args, variant, mode, dtype_name):
    cmd = [sys.executable, "-m", "bench.train_step", "--device", args.device, "--preset", args.preset,
           "--batch", str(args.batch), "--seq", str(args.seq), "--mask-prob", str(args.mask_prob),
           "--mode", mode, "--dtype", dtype_name, "--probe", variant, "--warmup", "1", "--steps", "1"]
    if args.attention_impl:
        cmd += ["--attention-impl", args.attention_impl]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}  # memory: glibc's defaults
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss():
    """This process's peak resident set. VmHWM belongs to the address space, which exec replaces; ru_maxrss
    would carry over the parent's peak into a child started by fork + exec, as the memory runs are."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(args):
    """One variant in this (fresh) process: its peak memory, and the process's size before the model
    (interpreter, torch, transformers: imported for every variant so that the baselines are equal)."""
    transformers_available()
    base = peak_rss()
    config = make_config(args)
    model, opt = build(args.probe, config, args.mode, args.device)
    step = runner(args.probe, model, opt, make_batch(config, args, args.device), autocast_for(args.dtype, args.device),
                  args.mode)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        step()
    if args.device == "cuda":
        base, peak = 0, torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss()
    print(json.dumps({"peak_bytes": peak, "base_bytes": base}))


def bench_mode(args, config, mode, dtype_name, peaks):
    variants = TRAIN_VARIANTS if mode == "train" else INFER_VARIANTS
    if args.variants:
        variants = [v for v in variants if v in args.variants]
    if not transformers_available():
        variants = [v for v in variants if v != "theirs"]
    autocast = autocast_for(dtype_name, args.device)
    batch = make_batch(config, args, args.device)
    times = {v: [] for v in variants}
    memory = {}
    if args.device == "cpu":
        built = {v: build(v, config, mode, args.device) for v in variants}
        steps = {v: runner(v, *built[v], batch, autocast, mode) for v in variants}
        for v in variants:
            time_steps(steps[v], args.warmup, args.device)
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(time_steps(steps[v], args.steps, args.device))
        del built, steps
        if not args.no_memory:
            memory = {v: peak_memory_subprocess(args, v, mode, dtype_name) for v in variants}
    else:
        for v in variants:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model, opt = build(v, config, mode, args.device)
            step = runner(v, model, opt, batch, autocast, mode)
            time_steps(step, args.warmup, args.device)
            for _ in range(args.rounds):
                times[v].append(time_steps(step, args.steps, args.device))
            memory[v] = dict(peak_bytes=torch.cuda.max_memory_allocated(), base_bytes=0)
            del model, opt, step
    peak = peaks["bf16" if dtype_name == "bf16" else "fp32"]
    tokens = args.batch * args.seq
    results = {}
    for v in variants:
        t = statistics.median(times[v])
        results[v] = dict(step_s=t, tokens_per_s=tokens / t, mfu=model_flops(v, config, args, mode) / t / peak,
                          peak_gb=memory[v]["peak_bytes"] / 1e9 if v in memory else None,
                          model_gb=(memory[v]["peak_bytes"] - memory[v]["base_bytes"]) / 1e9 if v in memory else None,
                          rounds_s=times[v])
    return results


def report(mode, dtype_name, results, emit):
    """tokens/s, MFU and peak memory per variant, and ours/theirs ratios. 'above base' is the peak less
    the process's size before the model was built (on CUDA the two are the same)."""
    lines = [f"\n== {mode} {dtype_name}",
             f"{'variant':14s} {'tokens/s':>9s} {'x theirs':>8s} {'MFU':>6s} {'peak GB':>8s} {'x theirs':>8s} "
             f"{'above base':>10s} {'x theirs':>8s}  s/step per round"]
    base = results.get("theirs")

    def ratio(r, key):
        return f"{r[key] / base[key]:8.2f}" if base and r[key] and base[key] else f"{'':8s}"

    for v, r in results.items():
        mem = f"{r['peak_gb']:8.2f} {ratio(r, 'peak_gb')} {r['model_gb']:10.2f} {ratio(r, 'model_gb')}" \
            if r["peak_gb"] is not None else f"{'-':>8s} {'':8s} {'-':>10s} {'':8s}"
        rounds = " ".join(f"{t:.2f}" for t in r["rounds_s"])
        lines.append(f"{v:14s} {r['tokens_per_s']:9.1f} {ratio(r, 'tokens_per_s')} {100 * r['mfu']:5.1f}% {mem}  {rounds}")
    emit("\n".join(lines))


def transformers_available():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv=None, emit=print):
    """Runs the benchmark; `emit` receives each section's text as soon as it is measured."""
    args = parse_args(argv)
    if args.device == "cpu" and not args.probe and not args.default_malloc and argv is None \
            and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # malloc reads these once, at start: run again with them (see Allocator above)
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # finds bench from anywhere
        os.execve(sys.executable, [sys.executable, "-m", "bench.train_step"] + sys.argv[1:],
                  {**os.environ, **STEADY_MALLOC, "PYTHONPATH": path})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args)
    config = make_config(args)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    modes = ["train", "infer"] if args.mode == "both" else [args.mode]
    peaks = {"fp32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    header = (f"device {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, preset {args.preset} "
              f"(layers {config.num_hidden_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
              f"vocab {config.vocab_size}, attention_impl {config.attention_impl}), batch {args.batch} x seq {args.seq}, "
              f"labels at {args.mask_prob:.0%} of positions, load average {os.getloadavg()[0]:.2f}\n"
              f"malloc: {'glibc defaults' if args.default_malloc or args.device != 'cpu' else 'steady state (MALLOC_MMAP_THRESHOLD_ 32 MiB, MALLOC_TRIM_THRESHOLD_ 16 GiB)'}\n"
              f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    emit(header)
    if not transformers_available():
        emit("transformers is not installed: ours only, no ratios")
    everything = {}
    for dtype_name in dtypes:
        for mode in modes:
            results = bench_mode(args, config, mode, dtype_name, peaks)
            report(mode, dtype_name, results, emit)
            everything[f"{mode}_{dtype_name}"] = results
    emit(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, results=everything), f, indent=2)


if __name__ == "__main__":
    main()
