"""attention_impl "fused" (model/fast/fused_attention.py: flash attention with c2p, p2c and dropout inside the
Triton kernels) against the same attention in plain torch autograd: run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1, read when triton is imported, so each check runs in a fresh process: this file run as
a script). Dropout is checked with the mask the kernels drew (keep_mask), applied by the torch side. Half
precision is checked in fp16: the interpreter's bf16 matmul is wrong (numpy has no bf16; a 16 x 16 tl.dot
came out 2e10 off), so bf16 is left to tests/gpu/test_kernels.py on a GPU. They skip only where triton
has no wheel (it is a dev dependency on Linux x86-64)."""
import json
import sys

import pytest
from tests.helpers.triton import run_interpreted

CASES = [  # B, H, N, d, block, terms, padding, dropout
    (2, 2, 32, 16, 8, "c2p,p2c", False, 0.0),
    (2, 2, 70, 16, 35, "c2p,p2c", True, 0.0),  # rows and keys beyond the 64-wide tiles, padded keys and queries
    (1, 2, 24, 16, 8, "c2p", False, 0.0),
    (1, 2, 24, 16, 8, "p2c", True, 0.0),
    (1, 1, 20, 16, 128, "", False, 0.0),  # no relative terms: plain flash attention
    (2, 2, 40, 32, 8, "c2p,p2c", True, 0.25),
]


def reference(q, k, v, tables, mask4d, keep, p):
    """The attention in plain torch: scores, the mask filled with the minimum, softmax, dropout, @v."""
    import torch
    from model.fast.relative_bias import RelativeBias
    B, H, N, _ = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2))
    if any(t is not None for t in tables):
        scores = scores + RelativeBias.apply(q, k, *tables, 8).view(B, H, N, N)
    if mask4d is not None:
        scores = scores.masked_fill(~mask4d, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return torch.matmul(probs, v)


def compare(B, H, N, d, block, terms, padding, p, device="cpu"):
    """max |fused - reference| of the output and of each gradient (q, k, v, tables), fp32, random inputs;
    and the fraction of entries the dropout kept."""
    import torch
    from model.attention import attention_mask_4d
    from model.fast.fused_attention import FusedDisentangledAttention, keep_mask, supported
    assert supported(torch.zeros(1, 1, 1, d, device=device), True), "the kernels must run (CUDA, or TRITON_INTERPRET=1)"
    torch.manual_seed(B * 1000 + N)
    # q, k, v as the projections give them: [B, H, N, d] views of [B, N, H·d] tensors
    q, k, v = (torch.randn(B, N, H, d, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    tables = [torch.randn(H, 2 * N, d, device=device, requires_grad=True) if t in terms.split(",") else None
              for t in ("c2p", "p2c")]
    token_mask = torch.ones(B, N, dtype=torch.bool, device=device)
    if padding:
        token_mask[0, N - 5:] = False
    mask4d = attention_mask_4d(token_mask)
    grad = torch.randn(B, H, N, d, device=device)
    inputs = [t for t in (q, k, v, *tables) if t is not None]

    torch.manual_seed(7)
    got = FusedDisentangledAttention.apply(q, k, v, *tables, mask4d, p, block)
    got_grads = torch.autograd.grad(got, inputs, grad)
    keep = None
    if p > 0:
        torch.manual_seed(7)  # the seed the forward drew
        keep = keep_mask(B, H, N, int(torch.randint(2 ** 32, ())), p, q.device)
    expected = reference(q, k, v, tables, mask4d, keep, p)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # padded query rows attend uniformly on both sides (see model/attention.py) and are compared too
    diffs = [relative_diff(got, expected)] + [relative_diff(a, b) for a, b in zip(got_grads, expected_grads)]
    kept = None if keep is None else keep.float().mean().item()
    heads_differ = None if keep is None else not torch.equal(keep[0, 0], keep[0, 1])  # each head its own draws
    return dict(diffs=diffs, kept=kept, heads_differ=heads_differ)


def relative_diff(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def compare_models(pos_att_type):
    """The MLM + EMD model, training mode without dropout, on a padded batch: converted with "fused" against
    the plain model (the math formula), loss and every parameter's gradient (max relative difference)."""
    import torch
    from model import DebertaForMaskedLM, preset
    from model.fast import convert, fused_attention
    calls = []  # each call of the fused attention: its query length
    apply = fused_attention.FusedDisentangledAttention.apply
    fused_attention.FusedDisentangledAttention.apply = lambda q, *args: calls.append(q.shape[2]) or apply(q, *args)
    config = preset("tiny", hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3,
                    vocab_size=300, position_buckets=32, max_relative_positions=64, pos_att_type=pos_att_type,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ids = torch.randint(4, 300, (2, 72))
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    labels = torch.where(torch.arange(72) % 4 == 0, ids, -100)
    results = {}
    for impl in ("plain", "fused"):
        torch.manual_seed(1)
        mlm = DebertaForMaskedLM(config).train()
        if impl != "plain":
            convert.apply(mlm, impl)
        loss = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss
        results[impl] = (loss, torch.autograd.grad(loss, list(mlm.parameters()), allow_unused=True))
    (loss, grads), (fused_loss, fused_grads) = results["plain"], results["fused"]
    assert sum(g is not None for g in grads) > 10
    assert all((a is None) == (b is None) for a, b in zip(grads, fused_grads))
    # the encoder ran its first two layers fused (the EMD replaces the last), the EMD (selected query
    # rows: not square) the fallback
    assert calls == [72, 72], calls
    return dict(diffs=[relative_diff(fused_loss, loss)] + [relative_diff(a, b) for a, b in zip(fused_grads, grads) if a is not None])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_attention_equals_torch(case):
    result = run_interpreted(__file__, case)
    assert all(d < 2e-5 for d in result["diffs"]), result
    p = case[-1]
    if p > 0:  # B·H·N² = 6400 draws: the kept fraction within 4 standard deviations of 1 - p
        assert abs(result["kept"] - (1 - p)) < 4 * (p * (1 - p) / 6400) ** 0.5, result
        assert result["heads_differ"], result


def compare_half():
    """One attention layer (2 heads of 64, padded batch, 128 tokens) in fp16: the largest error of "fused"
    and of "eager" against "math" in fp32, relative to its largest value, for the output and the
    gradients of the hidden states and of the relative embeddings."""
    import torch
    from model import preset
    from model.attention import DisentangledSelfAttention, attention_mask_4d, relative_position_index
    from model.fast import convert
    config = preset("tiny", hidden_size=128, num_attention_heads=2, intermediate_size=256, position_buckets=64,
                    max_relative_positions=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    B, N = 2, 128
    torch.manual_seed(0)
    hidden = torch.randn(B, N, 128)
    rel_embeddings = torch.randn(2 * config.att_span, 128)
    token_mask = torch.ones(B, N, dtype=torch.bool)
    token_mask[1, 100:] = False
    mask4d, rel_index = attention_mask_4d(token_mask), relative_position_index(N, N, config)
    grad = torch.randn(B, N, 128)
    state = DisentangledSelfAttention(config).state_dict()

    def run(impl, dtype):
        module = DisentangledSelfAttention(config).to(dtype)
        if impl != "math":
            convert.apply(module, impl)
        module.load_state_dict(state)
        inputs = [hidden.to(dtype).requires_grad_(), rel_embeddings.to(dtype).requires_grad_()]
        out = module(inputs[0], mask4d, rel_index, inputs[1])
        return [out] + list(torch.autograd.grad(out, inputs, grad.to(dtype)))

    truth = run("math", torch.float32)
    errors = {}
    for impl in ("eager", "fused"):
        got = run(impl, torch.float16)
        errors[impl] = [((a.float() - b)[token_mask] if a.shape[:2] == (B, N) else a.float() - b).abs().max().item()
                        / b.abs().max().item() for a, b in zip(got, truth)]
    return errors


def test_fused_attention_half_precision():
    errors = run_interpreted(__file__, ["half"])
    # fused keeps the probabilities in fp32 registers where the eager path rounds them to fp16
    assert all(f <= 2 * r for f, r in zip(errors["fused"], errors["eager"])), errors


@pytest.mark.parametrize("pos_att_type", ["p2c|c2p", "c2p"])
def test_fused_model_equals_the_math_path(pos_att_type):
    result = run_interpreted(__file__, ["model", pos_att_type])
    assert all(d < 1e-4 for d in result["diffs"]), result


if __name__ == "__main__":
    case = json.loads(sys.argv[1])
    if case[0] == "model":
        print(json.dumps(compare_models(case[1])))
    elif case[0] == "half":
        print(json.dumps(compare_half()))
    else:
        print(json.dumps(compare(*case)))
