"""The GPU code paths against their references, at the 1.5B shape.

    python3 bench/gpu_kernels_check.py          (needs CUDA and triton; a few seconds)

1. The Triton relative-bias kernels against the torch path (RelativeBias): max |difference| of the bias
   and of the gradients of q, k and both tables, in fp32 and in bf16, and the time of each path
   (forward + backward) for one layer's bias at batch 16 x 512.
2. The attention dropout on CUDA: backward draws the forward's mask again from the saved generator
   state (SoftmaxDropoutMatmul); its gradients against autograd's with the mask drawn the same way.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.attention import RelativeBias, SoftmaxDropoutMatmul  # noqa: E402
from model.init import draw_keep, dropout_scale, keep_as  # noqa: E402
from model.relative_kernels import RelativeBiasTriton, available  # noqa: E402


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


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
    dropout_check()
