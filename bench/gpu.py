"""The GPU benchmark in one short run (bench/gpu.sh calls it): the 1.5B config (xxlarge), bf16, one GPU.

1. The attention of one layer alone (forward + backward, [B, 24 heads, 512, 64]): transformers' eager
   attention, ours with attention_impl "reference" (eager) and "sdpa" (the c2p + p2c bias as SDPA's
   additive mask), and a flex-attention version (the bias terms read inside the kernel's score_mod from
   [B, H, N, 2k] tables, so no [B, H, N, N] tensor exists; flex has no attention dropout, so it runs with
   dropout 0 and is checked against ours at dropout 0).
2. Training and inference steps of the whole model, ours against transformers (bench/train_step.py).
Every section is written to the report as soon as it is done, so a run cut short keeps what it has.
"""
import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402
from model import preset  # noqa: E402
from model.attention import DisentangledSelfAttention, relative_position_index  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="report file (default $OUT/gpu_bench.txt, or gpu_bench.txt here)")
    p.add_argument("--batch", type=int, default=4, help="sequences per training step (default 4)")
    p.add_argument("--attention-batch", type=int, default=8, help="sequences for the attention-only timing (default 8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--skip-model", action="store_true", help="time the attention only")
    p.add_argument("--skip-flex", action="store_true", help="leave out flex attention (its compile takes a while)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default); cpu only to smoke-test the attention section with small sizes")
    return p.parse_args()


class Report:
    def __init__(self, path):
        self.path = path
        open(path, "w").close()

    def __call__(self, text):
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def timed(fn, device, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    train_step.sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    train_step.sync(device)
    return (time.perf_counter() - start) / reps


def flex_attention_fn(module, rel_index):
    """Ours with the bias inside flex attention's score_mod: c2p/p2c looked up from [B, H, N, 2k] tables."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention)

    def forward(hidden, rel_embeddings):
        q, k, v = module.project(hidden, None)
        q = q * (1.0 / module.scale)
        c2p = torch.matmul(q, module.position_keys(rel_embeddings, "c2p").transpose(-1, -2))  # [B, H, N, 2k]
        p2c = torch.matmul(k, module.position_keys(rel_embeddings, "p2c").transpose(-1, -2) / module.scale)

        def score_mod(score, b, h, i, j):
            r = rel_index[i, j]
            return score + c2p[b, h, i, r] + p2c[b, h, j, r]

        context = compiled(q, k, v, score_mod=score_mod, scale=1.0)
        return context.transpose(1, 2).flatten(-2)
    return forward


def attention_section(args, emit):
    config = preset("xxlarge")
    B, N, D = args.attention_batch, args.seq, config.hidden_size
    dev, dt = args.device, torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(B, N, D, device=dev, dtype=dt, requires_grad=True)
    rel_embeddings = torch.randn(2 * config.att_span, D, device=dev, dtype=dt, requires_grad=True)
    rel_index = relative_position_index(N, N, config, device=dev)
    mask4d = torch.ones(B, 1, N, N, dtype=torch.bool, device=dev)
    ours = {impl: DisentangledSelfAttention(config.replace(attention_impl=impl)).to(dev, dt) for impl in ("reference", "sdpa")}
    ours["sdpa"].load_state_dict(ours["reference"].state_dict())
    variants = {impl: (lambda m=m: m(hidden, mask4d, rel_index, rel_embeddings)) for impl, m in ours.items()}
    try:
        from transformers import DebertaV2Config
        from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as Theirs
        values = config.to_dict()
        theirs = Theirs(DebertaV2Config(**values)).to(dev, dt)
        theirs.load_state_dict(ours["reference"].state_dict())
        # relative_pos=None: transformers builds the same [N, N] index itself, as its encoder would pass
        variants = dict(theirs=lambda: theirs(hidden, mask4d, relative_pos=None, rel_embeddings=rel_embeddings)[0],
                        **variants)
        theirs.eval()
    except ImportError:
        emit("transformers not available: its attention is left out")
    if not args.skip_flex:
        try:
            variants["flex"] = lambda f=flex_attention_fn(ours["reference"], rel_index): f(hidden, rel_embeddings)
        except ImportError as e:
            emit(f"flex attention not available: {e}")
    # eval mode: no dropout anywhere (flex attention has none), while autograd still runs the backward
    for m in ours.values():
        m.eval()
    emit(f"\n== attention alone: one layer, batch {B} x seq {N}, 24 heads x 64, bf16, no dropout")
    emit(f"{'variant':10s} {'fwd+bwd ms':>10s} {'x theirs':>8s} {'peak GB':>8s} {'fwd ms':>8s}  max|diff| vs ours reference")
    with torch.no_grad():
        reference = variants["reference"]().float()
    base_ms = None
    for name, fn in variants.items():
        diff = ""
        try:  # one failing path (e.g. flex on an older torch) must not lose the others
            with torch.no_grad():
                out = fn().float()
            diff = "" if name == "reference" else f"{(out - reference).abs().max().item():.2e}"
            grad = torch.randn_like(out).to(dt)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            train_ms = 1e3 * timed(lambda: fn().backward(grad), dev)
            peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")
            with torch.no_grad():
                infer_ms = 1e3 * timed(fn, dev)
            base_ms = base_ms or (train_ms if name == "theirs" else None)
            ratio = f"{base_ms / train_ms:8.2f}" if base_ms else f"{'':8s}"
            emit(f"{name:10s} {train_ms:10.2f} {ratio} {peak:8.2f} {infer_ms:8.2f}  {diff}")
        except Exception as e:
            emit(f"{name:10s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}  {diff}")
            traceback.print_exc()
        hidden.grad = rel_embeddings.grad = None


def main():
    args = parse_args()
    path = args.out or os.path.join(os.environ.get("OUT", "."), "gpu_bench.txt")
    emit = Report(path)
    if args.device == "cuda" and not torch.cuda.is_available():
        emit("no CUDA device")
        return 1
    emit(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    attention_section(args, emit)
    if not args.skip_model and args.device == "cuda":
        train_step.main(["--device", "cuda", "--preset", "xxlarge", "--dtype", "bf16", "--batch", str(args.batch),
                         "--seq", str(args.seq), "--warmup", "2", "--steps", "3", "--rounds", "2"], emit=emit)
    emit(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
