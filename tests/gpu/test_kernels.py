"""The GPU code paths on CUDA against their references. Needs a CUDA GPU and triton: on a machine without CUDA
every test here fails and says so (tests/gpu/conftest.py). `make test` leaves them out (pytest.ini deselects the
`gpu` marker); `pytest -m gpu tests/gpu` runs them, as bench/gpu_checks.sh does.

1. attention_impl "fused" (model/fast/fused_attention.py) in fp32: tests/unit/test_fused_attention.py's cases
   (the kernels against plain torch autograd, dropout with the mask the kernels drew) on CUDA; one padded
   attention layer against "math" (the formula): the output and the gradients of the hidden states and of the
   relative embeddings within 1e-4 of their largest value.
2. "fused" in bf16 against "sdpa" in bf16, one 1.5B layer (24 heads of 64) at batch 16 x 512: fused's error
   against "math" in fp32 at most twice sdpa's, and the two within 5e-2 of each other.
3. The Triton relative-bias kernels (model/fast/relative_kernels.py) against the torch path (RelativeBias):
   fp32 within 1e-4; in bf16 an error against fp32 at most twice the torch path's own in bf16.
4. The attention dropout on CUDA: backward draws the forward's mask again from the saved generator state
   (SoftmaxDropoutMatmul, model/fast/softmax_dropout.py); output and gradients equal autograd's with the mask
   drawn the same way.
"""
import pytest
import torch

from model import preset
from model.attention import DisentangledSelfAttention, attention_mask_4d, relative_position_index
from model.fast import convert
from tests.unit.test_fused_attention import CASES, compare


def relative_error(got, truth, valid=None):
    """max |got - truth| over max |truth| (over the valid tokens where a [B, N] mask is given), in fp32."""
    got, truth = got.float(), truth.float()
    if valid is not None and got.shape[:2] == valid.shape:
        got, truth = got[valid], truth[valid]
    return ((got - truth).abs().max() / truth.abs().max().clamp_min(1e-12)).item()


def attention_run(config, impl, dtype, hidden, rel_embeddings, token_mask, grad, state):
    """One DisentangledSelfAttention layer of path `impl` in `dtype` (training mode): [output, d hidden,
    d relative embeddings]."""
    N = hidden.shape[1]
    module = convert.apply(DisentangledSelfAttention(config), impl).to("cuda", dtype).train()
    module.load_state_dict(state)
    inputs = [hidden.to(dtype).requires_grad_(), rel_embeddings.to(dtype).requires_grad_()]
    mask4d = None if token_mask is None else attention_mask_4d(token_mask)
    out = module(inputs[0], mask4d, relative_position_index(N, N, config, device="cuda"), inputs[1])
    return [out] + list(torch.autograd.grad(out, inputs, grad.to(dtype)))


def layer_inputs(config, B, N, padded):
    torch.manual_seed(0)
    D = config.hidden_size
    hidden = torch.randn(B, N, D, device="cuda")
    rel_embeddings = torch.randn(2 * config.att_span, D, device="cuda")
    token_mask = None
    if padded:
        token_mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
        token_mask[-1, N - N // 5:] = False
    grad = torch.randn(B, N, D, device="cuda")
    state = {k: v.to("cuda") for k, v in DisentangledSelfAttention(config).state_dict().items()}
    return hidden, rel_embeddings, token_mask, grad, state


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_kernels_equal_torch_on_cuda(case):
    result = compare(*case, device="cuda")
    assert all(d < 1e-4 for d in result["diffs"]), result
    p = case[-1]
    if p > 0:  # B·H·N² draws: the kept fraction within 4 standard deviations of 1 - p
        B, H, N = case[:3]
        assert abs(result["kept"] - (1 - p)) < 4 * (p * (1 - p) / (B * H * N * N)) ** 0.5, result
        assert result["heads_differ"], result


def test_fused_layer_equals_the_math_path_in_fp32():
    config = preset("tiny", hidden_size=256, num_attention_heads=4, intermediate_size=512, position_buckets=64,
                    max_relative_positions=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hidden, rel_embeddings, token_mask, grad, state = layer_inputs(config, B=2, N=300, padded=True)
    truth = attention_run(config, "math", torch.float32, hidden, rel_embeddings, token_mask, grad, state)
    fused = attention_run(config, "fused", torch.float32, hidden, rel_embeddings, token_mask, grad, state)
    errors = [relative_error(a, b, token_mask) for a, b in zip(fused, truth)]
    assert all(e <= 1e-4 for e in errors), errors


def test_fused_layer_in_bf16_is_as_close_to_fp32_as_sdpa_at_the_1p5b_shape():
    config = preset("xxlarge", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hidden, rel_embeddings, token_mask, grad, state = layer_inputs(config, B=16, N=512, padded=False)
    truth = attention_run(config, "math", torch.float32, hidden, rel_embeddings, token_mask, grad, state)
    half = {impl: attention_run(config, impl, torch.bfloat16, hidden, rel_embeddings, token_mask, grad, state)
            for impl in ("sdpa", "fused")}
    errors = {impl: [relative_error(a, b) for a, b in zip(got, truth)] for impl, got in half.items()}
    between = [relative_error(a, b) for a, b in zip(half["fused"], half["sdpa"])]
    assert all(f <= max(2 * s, 1e-3) for f, s in zip(errors["fused"], errors["sdpa"])), errors
    assert all(d < 5e-2 for d in between), (between, errors)


def relative_bias_run(function, inputs, grad):
    out = function.apply(*inputs, 128)
    return [out] + list(torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("B, N", [(2, 512), (2, 200)])
def test_relative_bias_kernels_equal_the_torch_path_in_fp32(B, N):
    from model.fast.relative_bias import RelativeBias
    from model.fast.relative_kernels import RelativeBiasTriton, available
    assert available(torch.zeros(1, device="cuda")), "the Triton kernels must run on CUDA (triton importable)"
    inputs, grad = relative_bias_inputs(B, N, torch.float32)
    expected = relative_bias_run(RelativeBias, inputs, grad)
    got = relative_bias_run(RelativeBiasTriton, inputs, grad)
    errors = [relative_error(a, b) for a, b in zip(got, expected)]  # bias, d q, d k, d c2p table, d p2c table
    assert all(e <= 1e-4 for e in errors), errors


def test_relative_bias_kernels_in_bf16_are_as_close_to_fp32_as_the_torch_path():
    from model.fast.relative_bias import RelativeBias
    from model.fast.relative_kernels import RelativeBiasTriton
    inputs, grad = relative_bias_inputs(16, 512, torch.float32)
    truth = relative_bias_run(RelativeBias, inputs, grad)
    half = [t.detach().bfloat16().requires_grad_() for t in inputs]
    errors = {name: [relative_error(a, b) for a, b in zip(relative_bias_run(f, half, grad.bfloat16()), truth)]
              for name, f in (("torch", RelativeBias), ("triton", RelativeBiasTriton))}
    assert all(t <= max(2 * r, 1e-3) for t, r in zip(errors["triton"], errors["torch"])), errors


def relative_bias_inputs(B, N, dtype, H=24, d=64):
    """q, k [B, H, N, d] and the c2p, p2c tables [H, 2N, d] (the 1.5B's heads), and a gradient of the bias."""
    torch.manual_seed(0)
    q, k = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    tables = [torch.randn(H, 2 * N, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
    return [q, k, *tables], torch.randn(B * H, N, N, device="cuda", dtype=dtype)


def test_attention_dropout_draws_the_same_mask_again_in_backward():
    from model.fast.dropout import draw_keep, dropout_scale, keep_as
    from model.fast.softmax_dropout import SoftmaxDropoutMatmul
    shape = (4, 24, 512, 512)
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(shape, device="cuda", generator=g, requires_grad=True)
    v = torch.randn(*shape[:3], 64, device="cuda", generator=g, requires_grad=True)
    grad = torch.randn(*shape[:3], 64, device="cuda", generator=g)
    torch.manual_seed(5)
    out = SoftmaxDropoutMatmul.apply(scores.clone(), None, v, 0.1)
    torch.rand(1000, device="cuda")  # draws between forward and backward must not matter
    got = torch.autograd.grad(out, (scores, v), grad)
    torch.manual_seed(5)
    keep = keep_as(draw_keep(shape, 0.1, "cuda"), scores.dtype)
    expected_out = torch.matmul(torch.softmax(scores, -1) * keep * dropout_scale(0.1)[1], v)
    expected = torch.autograd.grad(expected_out, (scores, v), grad)
    errors = [relative_error(a, b) for a, b in zip((out, *got), (expected_out, *expected))]
    assert all(e <= 1e-4 for e in errors), errors
    kept, wanted = keep.float().mean().item(), dropout_scale(0.1)[0] / 2 ** 15
    assert abs(kept - wanted) < 1e-3, (kept, wanted)
