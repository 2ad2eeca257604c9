"""The GPU code paths against their references, at the 1.5B shape.

    python3 bench/gpu_kernels_check.py          (needs CUDA and triton; a few seconds)

1. The Triton relative-bias kernels (model/fast/relative_kernels.py) against the torch path (RelativeBias,
   model/fast/relative_bias.py): max |difference| of the bias and of the gradients of q, k and both
   tables, in fp32 and in bf16, and the time of each path (forward + backward) for one layer's bias at
   batch 16 x 512.
2. The attention dropout on CUDA: backward draws the forward's mask again from the saved generator
   state (SoftmaxDropoutMatmul, model/fast/softmax_dropout.py); its gradients against autograd's with the
   mask drawn the same way.
3. attention_impl "fused" (model/fast/fused_attention.py): tests/unit/test_fused_attention.py's cases on
   CUDA in fp32 (the kernels against plain torch, dropout with the mask the kernels drew); then one 1.5B
   layer's attention (projections included), bf16, batch 16 x 512: "fused" against "sdpa" (relative
   max|diff| of the output and of the input's gradient, no dropout) and the time of each, forward +
   backward, in training mode with dropout 0.1, and forward alone.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.fast.dropout import draw_keep, dropout_scale, keep_as  # noqa: E402
from model.fast.relative_bias import RelativeBias  # noqa: E402
from model.fast.relative_kernels import RelativeBiasTriton, available  # noqa: E402
from model.fast.softmax_dropout import SoftmaxDropoutMatmul  # noqa: E402


def run(function, inputs, grad):
    out = function.apply(*inputs, 128)
    return [out] + list(torch.autograd.grad(out, inputs, grad))


def main():
    assert torch.cuda.is_available() and available(torch.zeros(1, device="cuda")), "needs CUDA and triton"
    H, d = 24, 64
    for dtype, B, N in ((torch.float32, 2, 512), (torch.float32, 2, 200), (torch.bfloat16, 16, 512)):
        torch.manual_seed(0)
        q, k = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        tables = [torch.randn(H, 2 * N, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
        grad = torch.randn(B * H, N, N, device="cuda", dtype=dtype)
        inputs = [q, k, *tables]
        expected = run(RelativeBias, inputs, grad)
        got = run(RelativeBiasTriton, inputs, grad)
        diffs = [f"{(a.float() - b.float()).abs().max().item():.2e}" for a, b in zip(got, expected)]
        scale = [f"{b.float().abs().max().item():.1e}" for b in expected]
        times = {}
        for name, function in (("torch", RelativeBias), ("triton", RelativeBiasTriton)):
            for _ in range(3):
                run(function, inputs, grad)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                run(function, inputs, grad)
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end) / 10
        print(f"{str(dtype):15s} B={B:2d} N={N}: max|diff| bias, dq, dk, dc2p, dp2c = {', '.join(diffs)} "
              f"(max |value| {', '.join(scale)}); fwd+bwd ms: torch {times['torch']:.2f}, triton {times['triton']:.2f}")


def dropout_check(device="cuda", shape=(4, 24, 512, 512)):
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(shape, device=device, generator=g, requires_grad=True)
    v = torch.randn(*shape[:3], 64, device=device, generator=g, requires_grad=True)
    grad = torch.randn(*shape[:3], 64, device=device, generator=g)
    torch.manual_seed(5)
    out = SoftmaxDropoutMatmul.apply(scores.clone(), None, v, 0.1)
    torch.rand(1000, device=device)  # draws between forward and backward must not matter
    got = torch.autograd.grad(out, (scores, v), grad)
    torch.manual_seed(5)
    keep = keep_as(draw_keep(shape, 0.1, device), scores.dtype)
    ref = torch.matmul(torch.softmax(scores, -1) * keep * dropout_scale(0.1)[1], v)
    expected = torch.autograd.grad(ref, (scores, v), grad)
    diffs = [(a - b).abs().max().item() for a, b in zip((out, *got), (ref, *expected))]
    print(f"attention dropout on {device}, mask drawn again in backward: kept {keep.float().mean().item():.4f} "
          f"(expected {dropout_scale(0.1)[0] / 2 ** 15:.4f}); max|diff| out, d scores, d v = "
          + ", ".join(f"{d:.2e}" for d in diffs))


def cuda_ms(fn, repeat=10):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def fused_check(B=16, N=512):
    from model import preset
    from model.attention import DisentangledSelfAttention, relative_position_index
    from model.fast import convert
    from tests.unit.test_fused_attention import CASES, compare
    for case in CASES:
        print(f"fused vs torch, fp32 cuda, case {case}: {compare(*case, device='cuda')}")
    config = preset("xxlarge")
    torch.manual_seed(0)
    hidden = torch.randn(B, N, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rel_embeddings = torch.randn(2 * config.att_span, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    rel_index = relative_position_index(N, N, config, device="cuda")
    modules = {impl: convert.apply(DisentangledSelfAttention(config), impl).to("cuda", torch.bfloat16)
               for impl in ("sdpa", "fused")}
    modules["fused"].load_state_dict(modules["sdpa"].state_dict())
    grad = torch.randn(B, N, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    results = {}
    for impl, module in modules.items():
        module.eval()
        out = module(hidden, None, rel_index, rel_embeddings)
        results[impl] = (out.float(), torch.autograd.grad(out, hidden, grad)[0].float())
    diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results["fused"], results["sdpa"])]
    print(f"fused vs sdpa, one 1.5B layer, bf16, B={B} N={N}: relative max|diff| out {diffs[0]:.2e}, d hidden {diffs[1]:.2e}")
    for impl, module in modules.items():
        module.train()
        train_ms = cuda_ms(lambda: torch.autograd.grad(module(hidden, None, rel_index, rel_embeddings), hidden, grad))
        with torch.no_grad():
            module.eval()
            infer_ms = cuda_ms(lambda: module(hidden, None, rel_index, rel_embeddings))
        print(f"  {impl:5s}: fwd+bwd (dropout 0.1) {train_ms:.2f} ms, fwd {infer_ms:.2f} ms")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
    dropout_check()
    fused_check()
