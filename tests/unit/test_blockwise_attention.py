"""attention_impl "blockwise" (model/fast/blockwise.py: the online softmax over blocks of keys, in PyTorch)
against the math path (model/attention.py): outputs and every gradient on lengths that are not a multiple of
the block, with padding, each relative term, shared and separate position projections, the EMD's non-square
index, dropout with the mask drawn again, the converted model; and that no [B, H, N, N] tensor is made."""
import functools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import DebertaForMaskedLM, preset
from model.attention import (DisentangledSelfAttention, attention_mask_2d_to_4d, log_bucket_position, math_attention,
                             relative_position_index)
from model.fast import attention_paths, convert
from model.fast.blockwise import blockwise, draw_seed, keep_mask
from model.fast.dropout import dropout_scale

SMALL = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=3, vocab_size=300,
             position_buckets=16, max_relative_positions=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def config(**overrides):
    return preset("tiny", **dict(SMALL, **overrides))


def plain_and_blockwise(cfg, block):
    """The plain attention module (math) and a converted copy with the same weights running blockwise."""
    torch.manual_seed(0)
    plain = DisentangledSelfAttention(cfg).train()
    fast = convert.apply(DisentangledSelfAttention(cfg), "blockwise", fuse_qkv=False).train()
    fast.load_state_dict(plain.state_dict())
    fast.path = functools.partial(blockwise, block=block)
    return plain, fast


def inputs(cfg, B, N, pad_from=None, query_rows=None):
    """hidden [B, N, D], rel table, mask4d, rel_index; with query_rows [B, M] the EMD's: query states [B, M, D],
    the selected rows of the mask and of the index."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, N, cfg.hidden_size, generator=g, requires_grad=True)
    rel = torch.randn(2 * cfg.att_span, cfg.hidden_size, generator=g, requires_grad=True)
    mask = torch.ones(B, N, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    mask4d = attention_mask_2d_to_4d(mask) if pad_from is not None else None
    rel_index = relative_position_index(N, N, cfg)
    if query_rows is None:
        return hidden, None, rel, mask4d, rel_index
    query = torch.randn(B, query_rows.shape[1], cfg.hidden_size, generator=g, requires_grad=True)
    batch = torch.arange(B)[:, None]
    mask4d = None if mask4d is None else mask4d[batch, 0, query_rows][:, None]
    return hidden, query, rel, mask4d, rel_index[query_rows]


def output_and_grads(module, hidden, query, rel, mask4d, rel_index):
    out = module(hidden, mask4d, rel_index, rel, query)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)  # a loss that reads every output differently
    leaves = [t for t in (hidden, query, rel) if t is not None] + list(module.parameters())
    return out, torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)


# Outputs agree within 1e-6 of their largest entry. Gradients: the value projection's bias is a sum over
# every row of the batch that cancels to ~1 from terms of ~1, where fp32's summation order shows at ~3e-5.
# The key bias's gradient is zero in exact arithmetic (softmax ignores a constant per row): noise below
# ZERO on either path.
OUT_TOL, GRAD_TOL, ZERO = 1e-5, 5e-5, 1e-4


def assert_close(expected, actual, tol=GRAD_TOL):
    assert (expected is None) == (actual is None)
    if expected is None:
        return
    largest = expected.abs().max().item()
    if largest < ZERO:
        assert actual.abs().max().item() < ZERO
    else:
        assert (expected - actual).abs().max().item() <= tol * largest, (expected - actual).abs().max().item()


CASES = {  # (N, block, pad_from, config overrides)
    "37-block16-padded": (37, 16, 23, {}),
    "130-block32-padded-unshared": (130, 32, 70, dict(share_att_key=False)),
    "130-block32-p2c-unshared": (130, 32, None, dict(share_att_key=False, pos_att_type=["p2c"])),
    "37-block16-c2p-padded": (37, 16, 5, dict(pos_att_type=["c2p"])),
    "37-block16-no-buckets": (37, 16, 23, dict(position_buckets=-1, max_relative_positions=24)),
    "37-block16-no-relative": (37, 16, 23, dict(relative_attention=False, pos_att_type=[])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_math_in_output_and_every_gradient(case):
    N, block, pad_from, overrides = CASES[case]
    cfg = config(**overrides)
    plain, fast = plain_and_blockwise(cfg, block)
    args = inputs(cfg, 2, N, pad_from)
    out, grads = output_and_grads(plain, *args)
    fast_out, fast_grads = output_and_grads(fast, *args)
    assert_close(out, fast_out, OUT_TOL)
    assert sum(g is not None for g in grads) >= 7
    for g, fast_g in zip(grads, fast_grads):
        assert_close(g, fast_g)


@pytest.mark.parametrize("index_dims", [2, 3])
def test_blockwise_takes_the_emds_non_square_index(index_dims):
    """The EMD's selected query rows: M of N rows per sequence, the index [B, M, N] (or [M, N] for rows
    shared by the batch), the mask's rows [B, 1, M, N]."""
    cfg = config()
    plain, fast = plain_and_blockwise(cfg, block=16)
    rows = torch.tensor([[3, 0, 40, 41, 12, 7, 60], [5, 6, 9, 33, 2, 2, 0]])
    if index_dims == 2:
        rows = rows[:1].expand(2, -1)
    hidden, query, rel, mask4d, rel_index = inputs(cfg, 2, 67, pad_from=50, query_rows=rows)
    if index_dims == 2:
        rel_index = rel_index[0]
    out, grads = output_and_grads(plain, hidden, query, rel, mask4d, rel_index)
    fast_out, fast_grads = output_and_grads(fast, hidden, query, rel, mask4d, rel_index)
    assert fast_out.shape == (2, 7, cfg.hidden_size)
    assert_close(out, fast_out, OUT_TOL)
    for g, fast_g in zip(grads, fast_grads):
        assert_close(g, fast_g)


class FixedDropout(nn.Module):
    """Dropout with a given keep mask and blockwise's scale: math's probabilities dropped as blockwise drops them."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.scale = keep, dropout_scale(p)[1]

    def forward(self, x):
        return x * self.keep * self.scale


def test_dropout_is_repeatable_and_its_gradient_is_maths_with_the_same_mask():
    cfg = config(attention_probs_dropout_prob=0.3)
    plain, fast = plain_and_blockwise(cfg, block=16)
    B, H, N, d = 2, cfg.num_attention_heads, 45, cfg.head_size
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, N, d, generator=g, requires_grad=True) for _ in range(3))
    rel = torch.randn(2 * cfg.att_span, cfg.hidden_size, generator=g, requires_grad=True)
    mask4d = attention_mask_2d_to_4d(torch.arange(N)[None] < torch.tensor([[N], [30]]))
    rel_index = relative_position_index(N, N, cfg)

    def run(path, module):  # the gradients of q, k, v, the table and the module's projections of it
        torch.manual_seed(7)
        out = path(module, q, k, v, mask4d, rel_index, rel)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        leaves = [q, k, v, rel] + list(module.parameters())
        return out, torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)

    out, grads = run(fast.path, fast)
    again, _ = run(fast.path, fast)
    assert torch.equal(out, again)
    torch.manual_seed(7)
    keep = keep_mask(B, H, N, N, draw_seed(), 0.3, block=16)
    assert abs(keep.float().mean().item() - 0.7) < 0.03  # 8100 draws: within 5 standard deviations
    assert not torch.equal(keep[..., :16, :16], keep[..., :16, 16:32])  # each block draws its own mask
    plain.dropout = FixedDropout(keep, 0.3)
    expected, expected_grads = run(math_attention, plain)
    assert_close(expected, out, OUT_TOL)
    assert sum(g is not None for g in grads) == 8  # q, k, v, the table, the key and query projections (c2p, p2c)
    for e, g in zip(expected_grads, grads):
        assert_close(e, g)
    no_dropout, _ = run(fast.path, fast.eval())
    assert (no_dropout - out).abs().max() > 0.1  # the dropout did something


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16():
    """Under bf16 autocast: a bf16 output, no further from the fp32 math path than math itself under autocast
    (whose matmuls, scores and P·V are bf16)."""
    cfg = config()
    plain, fast = plain_and_blockwise(cfg, block=16)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g) for _ in range(3))
    rel = torch.randn(2 * cfg.att_span, cfg.hidden_size, generator=g)
    rel_index = relative_position_index(40, 40, cfg)
    with torch.no_grad():
        expected = math_attention(plain, q, k, v, None, rel_index, rel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            halves = (q.bfloat16(), k.bfloat16(), v.bfloat16())
            out = fast.path(fast, *halves, None, rel_index, rel)
            math_bf16 = math_attention(plain, *halves, None, rel_index, rel)
    assert out.dtype == torch.bfloat16
    error, math_error = ((x.float() - expected).abs().max().item() for x in (out, math_bf16))
    assert error <= math_error, (error, math_error)


def test_converted_mlm_with_emd_matches_the_plain_model():
    """The MLM + EMD model on a padded batch, training mode without dropout: blockwise (block 16, 40 tokens:
    three blocks of keys) against the plain model, loss and every parameter's gradient."""
    cfg = config()
    ids = torch.randint(4, 300, (3, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[-1, 29:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3:25:4] = ids[:, 3:25:4]
    results = {}
    for impl in ("plain", "blockwise"):
        torch.manual_seed(0)
        model = DebertaForMaskedLM(cfg).train()
        if impl != "plain":
            convert.apply(model, impl)
            for attention in (m for m in model.modules() if isinstance(m, DisentangledSelfAttention)):
                attention.path = functools.partial(blockwise, block=16)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[impl] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss, grads), (fast_loss, fast_grads) = results["plain"], results["blockwise"]
    assert abs(loss - fast_loss) < 1e-5 and grads.keys() == fast_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert_close(grad, fast_grads[name])


def test_auto_takes_blockwise_from_the_threshold_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_paths, "eager", lambda attn, q, *rest: calls.append(("eager", q.shape[2])))
    monkeypatch.setattr(attention_paths, "blockwise", lambda attn, q, *rest: calls.append(("blockwise", q.shape[2])))
    monkeypatch.setattr(attention_paths, "BLOCKWISE_FROM", 64)
    path = attention_paths.fast_path("auto")
    for n in (63, 64, 65):
        x = torch.zeros(1, 1, n, 8)
        path(None, x, x, x, None, None, None)
    assert calls == [("eager", 63), ("blockwise", 64), ("blockwise", 65)]


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while the mode is on (backward included)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def attention_memory(path, N, block=64):
    """(the most elements of one tensor made in forward + backward, the bytes autograd keeps for backward)
    of one attention of 2 heads of 32 over N tokens."""
    cfg = config(position_buckets=8, max_relative_positions=16)
    torch.manual_seed(0)
    module = convert.apply(DisentangledSelfAttention(cfg), path).train()
    if path == "blockwise":
        module.path = functools.partial(blockwise, block=block)
    hidden = torch.randn(1, N, cfg.hidden_size, requires_grad=True)
    rel = torch.randn(2 * cfg.att_span, cfg.hidden_size, requires_grad=True)
    rel_index = relative_position_index(N, N, cfg)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with LargestTensor() as largest:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(hidden, None, rel_index, rel)
        out.sum().backward()
    return largest.numel, sum(saved)


def test_blockwise_makes_no_quadratic_tensor_and_keeps_memory_linear_in_n():
    """The largest tensor of forward + backward is the fused q, k, v projection's [B, N, 3·D] (or a block's, or a
    [B, H, N, 2k] product), never [B, H, N, N];
    what autograd keeps doubles with N. The eager path is the control: the same measures see its quadratic
    tensors."""
    heads = 2
    largest, saved = attention_memory("blockwise", 512)
    _, saved_half = attention_memory("blockwise", 256)
    assert largest <= 512 * 3 * SMALL["hidden_size"], largest  # [B, H, N, N] is 5.3x that
    assert saved / saved_half < 2.05, (saved, saved_half)
    eager_largest, eager_saved = attention_memory("eager", 512)
    _, eager_saved_half = attention_memory("eager", 256)
    assert eager_largest >= heads * 512 * 512 and eager_saved / eager_saved_half > 2.5  # quadratic + linear


@pytest.mark.parametrize("buckets, max_relative", [(256, 512), (16, 64), (-1, 24)])
def test_relative_position_index_is_the_formula_on_every_pair(buckets, max_relative):
    """relative_position_index (computed per distance, then windows) equals clamp(bucket(i - j) + k) evaluated
    on the [Nq, Nk] differences, as it was written before: bitwise, square and not, beyond the buckets."""
    cfg = config(position_buckets=buckets, max_relative_positions=max_relative)
    for query_len, key_len in [(1, 1), (37, 37), (5, 40), (40, 5), (700, 700)]:
        rel = torch.arange(query_len)[:, None] - torch.arange(key_len)[None, :]
        if buckets > 0:
            rel = log_bucket_position(rel, buckets, cfg.max_relative)
        expected = torch.clamp(rel + cfg.att_span, 0, 2 * cfg.att_span - 1)
        assert torch.equal(relative_position_index(query_len, key_len, cfg), expected), (query_len, key_len)


def test_the_long_attention_bench_measures_in_a_subprocess_and_skips_past_the_cap(capsys):
    """bench/long_attention.py: the first length runs in its own process (time and peak memory); the next,
    predicted from it to need more than --cap-gib, is printed as skipped."""
    from bench import long_attention
    assert long_attention.main(["--lengths", "64,128", "--paths", "blockwise", "--hidden", "64", "--heads", "1",
                                "--reps", "1", "--threads", "1", "--cap-gib", "1e-9"]) == 0
    out = capsys.readouterr().out
    row_64 = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    assert " s, " in row_64 and "GiB" in row_64 and "≥" not in row_64, out
    assert "| 128 | skipped (needs ~" in out, out
