"""The GPU benchmark's attention part, and where a 1.5B training step spends its GPU time (kernel tables
from torch.profiler), in one short run; bench/gpu_checks.sh runs it with the whole-step comparison
against transformers (bench/train_step.py).

    python3 -m bench.gpu_profile --out $OUT/profile.txt       (needs CUDA; about a minute on an H200)

1. One layer's attention, forward + backward at the training batch, per variant (transformers,
   ours "eager", "sdpa" and "fused" (model/fast/attention_paths.py), and flex attention with the
   relative bias added inside the kernel, in two forms: a dense [B, H, N, N] bias, and the c2p/p2c
   products by distance, [B, H, N, 2N], read at column N-1-i+j): time, peak memory, and the top
   kernels of ours.
2. A whole training step of ours (MLM + EMD, AdamW), bf16 autocast: step time, the sum of its kernel
   times (a step much longer than its kernels is waiting on the host), and the top kernels.
Each section is written to the report as soon as it is done.
"""
import argparse
import os
import time
import traceback

import torch

from bench import train_step
from model import preset
from model.attention import DisentangledSelfAttention, relative_position_index
from model.fast import convert
from model.fast.attention_paths import relative_bias
from model.fast.relative_bias import distance_index
from pipeline.cli import Parser
from pipeline.cli_types import at_least, positive_int


def parse_args():
    p = Parser(prog="python -m bench.gpu_profile", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="report file (default $OUT/gpu_profile.txt)")
    p.add_argument("--batch", type=positive_int, default=16, help="sequences (default 16)")
    p.add_argument("--seq", type=at_least(8), default=512, help="tokens per sequence (default 512)")
    p.add_argument("--step-impls", default="eager,sdpa",
                   help="attention paths for the whole-step section, comma-separated (default eager,sdpa); "
                        "the first is profiled")
    p.add_argument("--skip-flex", action="store_true", help="leave out the flex variants")
    p.add_argument("--skip-step", action="store_true", help="leave out the whole-step section")
    p.add_argument("--rows", type=positive_int, default=30, help="kernels per table (default 30)")
    return p.parse_args()


class Report:
    """Prints each section and appends it to the report file at once: a run cut short keeps what it has."""

    def __init__(self, path):
        self.path = path
        open(path, "w").close()

    def __call__(self, text):
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def timed(fn, device, reps=10, warmup=3):
    """Seconds per call of fn, after warm-up calls, synchronised around the timed calls."""
    for _ in range(warmup):
        fn()
    train_step.sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    train_step.sync(device)
    return (time.perf_counter() - start) / reps


def kernel_table(fn, emit, rows, label):
    """Profiles one call of fn (after warm-up elsewhere): wall time, summed kernel time, top kernels."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e3  # us -> ms
    emit(f"\n-- {label}: wall {wall * 1e3:.1f} ms (profiled), kernels {device_total:.1f} ms")
    emit(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def flex_variant(module, rel_index, config, form):
    """Ours with the relative bias inside flex attention's score_mod (no dropout: flex has none)."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention)
    N = rel_index.shape[0]
    by_distance = distance_index(rel_index)

    def forward(hidden, mask4d, rel_embeddings):
        q, k, v = module.project(hidden, None)
        q = q * (1.0 / module.scale)
        if form == "dense":
            bias = relative_bias(module, q, k, rel_index, rel_embeddings).view(q.shape[0], q.shape[1], N, N)

            def score_mod(score, b, h, i, j):
                return score + bias[b, h, i, j]
        else:  # by distance: [B, H, N, 2N] products, read at column N-1-(i-j)
            c2p = torch.matmul(q, module.position_keys(rel_embeddings, "c2p")[..., by_distance, :].transpose(-1, -2))
            p2c = torch.matmul(k, (module.position_keys(rel_embeddings, "p2c")[..., by_distance, :]
                                   / module.scale).transpose(-1, -2))

            def score_mod(score, b, h, i, j):
                return score + c2p[b, h, i, N - 1 - i + j] + p2c[b, h, j, N - 1 - i + j]
        return compiled(q, k, v, score_mod=score_mod, scale=1.0).transpose(1, 2).flatten(-2)
    return forward


def attention_section(args, emit):
    config = preset("xxlarge")
    B, N, D, dev, dt = args.batch, args.seq, config.hidden_size, "cuda", torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(B, N, D, device=dev, dtype=dt, requires_grad=True)
    rel_embeddings = torch.randn(2 * config.att_span, D, device=dev, dtype=dt, requires_grad=True)
    rel_index = relative_position_index(N, N, config, device=dev)
    mask4d = torch.ones(B, 1, N, N, dtype=torch.bool, device=dev)
    ours = {impl: convert.apply(DisentangledSelfAttention(config), impl).to(dev, dt).eval()
            for impl in ("eager", "sdpa", "fused")}
    for impl in ("sdpa", "fused"):
        ours[impl].load_state_dict(ours["eager"].state_dict())
    variants = {impl: (lambda m=m: m(hidden, mask4d, rel_index, rel_embeddings)) for impl, m in ours.items()}
    try:
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as Theirs
        theirs = Theirs(DebertaV2Config(**config.to_dict())).to(dev, dt).eval()
        theirs.load_state_dict(ours["eager"].state_dict())
        variants = dict(theirs=lambda: theirs(hidden, mask4d, relative_pos=None, rel_embeddings=rel_embeddings)[0],
                        **variants)
    except ImportError:
        emit("transformers not available")
    if not args.skip_flex:
        for form in ("dense", "distance"):
            f = flex_variant(ours["eager"], rel_index, config, form)
            variants[f"flex_{form}"] = lambda f=f: f(hidden, mask4d, rel_embeddings)
    emit(f"\n== attention alone: one layer, batch {B} x seq {N}, 24 heads x 64, bf16, no dropout")
    emit(f"{'variant':14s} {'fwd+bwd ms':>10s} {'peak GB':>8s} {'fwd ms':>8s}  max|diff| vs eager")
    with torch.no_grad():
        reference = variants["eager"]().float()
    for name, fn in variants.items():
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = fn().float()
            diff = f"{(out - reference).abs().max().item():.2e}"
            grad = torch.randn_like(out).to(dt)
            torch.cuda.reset_peak_memory_stats()
            train_ms = 1e3 * timed(lambda: fn().backward(grad), dev)
            peak = torch.cuda.max_memory_allocated() / 1e9
            with torch.no_grad():
                infer_ms = 1e3 * timed(fn, dev)
            emit(f"{name:14s} {train_ms:10.2f} {peak:8.2f} {infer_ms:8.2f}  {diff}  (first call to last {time.perf_counter() - t0:.0f} s)")
            if name in ("eager", "sdpa", "fused"):
                kernel_table(lambda: fn().backward(grad), emit, 15, f"attention {name}, fwd+bwd")
        except Exception as e:
            emit(f"{name:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            traceback.print_exc()
        hidden.grad = rel_embeddings.grad = None


def step_section(args, emit, impl, profiled):
    argv = ["--device", "cuda", "--preset", "xxlarge", "--dtype", "bf16", "--batch", str(args.batch),
            "--seq", str(args.seq), "--attention-impl", impl]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    targs = train_step.parse_args(argv)
    config = train_step.make_config(targs)
    model, opt = train_step.build("ours_emd", config, "train", "cuda")
    step = train_step.runner("ours_emd", model, opt, train_step.make_batch(config, targs, "cuda"),
                             train_step.autocast_for("bf16", "cuda"), "train")
    train_step.time_steps(step, 2, "cuda")
    seconds = train_step.time_steps(step, 3, "cuda")
    peak = train_step.matmul_peak(torch.bfloat16, "cuda")
    flops = train_step.model_flops("ours_emd", config, targs, "train")
    emit(f"\n== whole step, ours MLM + EMD, batch {args.batch} x {args.seq}, attention {config.attention_impl}: "
         f"{seconds * 1e3:.1f} ms, {args.batch * args.seq / seconds:.0f} tokens/s, MFU {flops / seconds / peak:.1%} "
         f"(matmul peak {peak / 1e12:.0f} TFLOP/s), peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    if profiled:
        kernel_table(step, emit, args.rows, "whole step")


def main():
    args = parse_args()
    emit = Report(args.out or os.path.join(os.environ.get("OUT", "."), "gpu_profile.txt"))
    emit(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    attention_section(args, emit)
    if not args.skip_step:
        for n, impl in enumerate(args.step_impls.split(",")):
            step_section(args, emit, impl, profiled=n == 0)


if __name__ == "__main__":
    main()
