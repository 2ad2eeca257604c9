"""The Triton kernels of the relative bias (model/fast/relative_kernels.py, the GPU path) against RelativeBias,
the CPU path: run on the CPU in Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported,
so each check runs in a fresh process: this file run as a script). They skip only where triton has no
wheel (it is a dev dependency on Linux x86-64)."""
import json
import sys

import pytest
from tests.helpers.triton import run_interpreted

CASES = [  # B, H, N, d, block, terms
    (2, 3, 16, 5, 4, "c2p,p2c"),  # 4 equal blocks
    (2, 3, 12, 5, 8, "c2p,p2c"),  # N not a multiple of the block: one block of all rows
    (1, 2, 8, 3, 4, "c2p"),
    (1, 2, 8, 3, 4, "p2c"),
    (2, 2, 70, 4, 35, "c2p,p2c"),  # rows and columns beyond the 64-wide tiles
    (1, 1, 1, 2, 128, "c2p,p2c"),
]


def compare(B, H, N, d, block, terms):
    """max |Triton - RelativeBias| of the bias and of each gradient, fp32, random inputs."""
    import torch
    from model.fast.relative_bias import RelativeBias
    from model.fast.relative_kernels import RelativeBiasTriton, available
    assert available(torch.zeros(1)), "the kernels must run under TRITON_INTERPRET=1"
    torch.manual_seed(B * 1000 + N)
    q, k = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(2))
    tables = [torch.randn(H, 2 * N, d, requires_grad=True) if t in terms.split(",") else None for t in ("c2p", "p2c")]
    grad = torch.randn(B * H, N, N)
    inputs = [t for t in (q, k, *tables) if t is not None]
    expected = RelativeBias.apply(q, k, *tables, block)
    expected_grads = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    got = RelativeBiasTriton.apply(q, k, *tables, block)
    got_grads = torch.autograd.grad(got, inputs, grad, allow_unused=True)
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    diffs = [(got - expected).abs().max().item()]
    for a, b in zip(got_grads, expected_grads):
        assert (a is None) == (b is None)
        diffs.append(None if a is None else (a - b).abs().max().item())
    return diffs


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_relative_bias_equals_the_cpu_path(case):
    diffs = run_interpreted(__file__, case, timeout=300)
    assert all(d is None or d < 1e-5 for d in diffs), diffs


if __name__ == "__main__":
    print(json.dumps(compare(*json.loads(sys.argv[1]))))
