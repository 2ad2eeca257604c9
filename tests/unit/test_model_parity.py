"""Our DeBERTa-v2 against transformers' on the same random weights (CPU, fp32): outputs in eval mode,
gradients in training mode with dropout 0, the EMD against the spec's recipe on transformers' modules; the
plain model ("plain": model/, the math path) and the converted one (model/fast/convert.py with an attention
path) alike, and every converted model against the plain one."""
import pytest
import torch

from tests.helpers.hf_oracle import hf_and_ours
from model import preset
from model.fast import convert

TOL = 1e-5
SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3, vocab_size=1000,
             max_position_embeddings=512, position_buckets=256)

CONFIGS = {
    "v2": preset("tiny", **SMALL),
    # v1-style attention: separate position projections, p2c only
    "unshared_p2c": preset("tiny", **SMALL, share_att_key=False, pos_att_type=["p2c"]),
    "unshared_c2p": preset("tiny", **SMALL, share_att_key=False, pos_att_type=["c2p"]),
    "no_buckets": preset("tiny", **dict(SMALL, position_buckets=-1, max_relative_positions=128)),
    "no_conv": preset("tiny", **SMALL, conv_kernel_size=0),
    "embedding_size": preset("tiny", **SMALL, embedding_size=32),
    # BERT-like: absolute positions and token types in the input, no relative attention, no rel LN
    "absolute": preset("tiny", **SMALL, relative_attention=False, position_biased_input=True, type_vocab_size=2,
                       norm_rel_ebd="none", conv_kernel_size=0, pos_att_type=[]),
    "c2p_only_grouped_conv": preset("tiny", **SMALL, pos_att_type=["c2p"], conv_groups=4, conv_act="tanh"),
}


def batch(seq_len, batch_size=2, pad_from=None, vocab=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
    return ids, mask


def max_diff_valid(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("impl", ["plain", "eager", "sdpa"])
def test_base_model_matches_transformers(name, impl):
    config = CONFIGS[name]
    theirs, ours = hf_and_ours(config, "base", impl=impl)
    for seq_len, pad_from in [(1, None), (7, 4), (128, 100)]:
        ids, mask = batch(seq_len, pad_from=pad_from)
        tt = torch.randint(0, 2, ids.shape) if config.type_vocab_size else None
        with torch.no_grad():
            a = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        assert max_diff_valid(a, b, mask) <= TOL, (name, seq_len)


@pytest.mark.parametrize("impl", ["plain", "eager", "sdpa"])
def test_full_length_512_with_padding(impl):
    theirs, ours = hf_and_ours(CONFIGS["v2"], "base", impl=impl)
    ids, mask = batch(512, pad_from=300)
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_diff_valid(a, b, mask) <= TOL


def test_reference_path_padded_rows_follow_transformers5():
    """The documented padded-row convention: uniform attention, exactly as transformers 5."""
    theirs, ours = hf_and_ours(CONFIGS["v2"], "base")
    ids, mask = batch(16, pad_from=9)
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("impl", ["plain", "auto"])
@pytest.mark.parametrize("name", ["v2", "unshared_p2c", "no_conv"])
def test_mlm_head_without_emd_matches_transformers(name, impl):
    theirs, ours = hf_and_ours(CONFIGS[name], "mlm", emd=False, impl=impl)
    ids, mask = batch(32, pad_from=20)
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
    assert max_diff_valid(a, b, mask) <= TOL
    # with labels, ours computes logits only at the labelled positions: the same numbers
    labels = torch.full_like(ids, -100)
    labels[0, [1, 5, 9]] = ids[0, [1, 5, 9]]
    labels[1, [2, 3]] = ids[1, [2, 3]]
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, a[labels != -100], atol=TOL)
    assert abs(out.loss.item() - ref.loss.item()) <= TOL


@pytest.mark.parametrize("name", ["v2", "embedding_size"])
def test_classification_matches_transformers(name):
    theirs, ours = hf_and_ours(CONFIGS[name], "classification", num_labels=3)
    ids, mask = batch(24, batch_size=3, pad_from=10)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert (a.logits - b.logits).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


def test_regression_and_multiple_choice_match_transformers():
    theirs, ours = hf_and_ours(CONFIGS["v2"], "classification", num_labels=1)
    ids, mask = batch(12, batch_size=3)
    labels = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        assert abs(theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
                   - ours(input_ids=ids, attention_mask=mask, labels=labels).loss.item()) <= TOL
    theirs, ours = hf_and_ours(CONFIGS["v2"], "multiple_choice")
    ids = torch.randint(4, 1000, (2, 3, 10))
    mask = torch.ones_like(ids)
    mask[1, 2, 6:] = 0
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert (a.logits - b.logits).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= TOL


@pytest.mark.parametrize("impl", ["plain", "eager", "sdpa"])
def test_gradients_match_transformers_in_training_mode(impl):
    config = CONFIGS["v2"].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    theirs, ours = hf_and_ours(config, "mlm", emd=False, impl=impl)
    theirs.train()
    ours.train()
    ids, mask = batch(40, pad_from=30)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.2, ids, -100)
    labels[~mask.bool()] = -100
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    their_grads = {k: p.grad for k, p in theirs.named_parameters()}
    compared = 0
    for key, param in ours.named_parameters():
        assert param.grad is not None, key
        assert (param.grad - their_grads[key]).abs().max().item() <= TOL, key
        compared += 1
    assert compared == len(their_grads)


def emd_on_transformers(theirs, table, ids, mask, steps=2):
    """The spec §3 recipe built from transformers' modules."""
    deberta = theirs.deberta
    out = deberta(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden_prev = out.hidden_states[-2]
    encoder = deberta.encoder
    layer = encoder.layer[-1]
    att_mask = encoder.get_attention_mask(mask)
    rel_pos = encoder.get_rel_pos(hidden_prev)
    rel_emb = encoder.get_rel_embedding()
    query = table[torch.arange(ids.shape[1])][None] + hidden_prev
    for _ in range(steps):
        query = layer(hidden_prev, att_mask, query_states=query, relative_pos=rel_pos, rel_embeddings=rel_emb)[0]
    return theirs.lm_predictions(query, deberta.embeddings.word_embeddings)


@pytest.mark.parametrize("impl", ["plain", "eager", "sdpa"])
def test_enhanced_mask_decoder_matches_spec_recipe(impl):
    theirs, ours = hf_and_ours(CONFIGS["v2"], "mlm", emd=True, impl=impl)
    table = ours.deberta.embeddings.position_embeddings.weight.detach()
    ids, mask = batch(48, pad_from=40)
    with torch.no_grad():
        expected = emd_on_transformers(theirs, table, ids, mask)
        got = ours(input_ids=ids, attention_mask=mask).logits
        plain = theirs(input_ids=ids, attention_mask=mask).logits
    assert max_diff_valid(expected, got, mask) <= TOL
    assert max_diff_valid(plain, got, mask) > 1e-3  # the EMD really changes the prediction


@pytest.mark.parametrize("impl", ["plain", "eager", "sdpa"])
def test_enhanced_mask_decoder_at_masked_positions_is_exact(impl):
    """With labels, the EMD runs its query rows at the labelled positions only: the same logits, loss and
    gradients as the full EMD read at those positions (padding rows, uneven counts per sequence)."""
    config = CONFIGS["v2"].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, ours = hf_and_ours(config, "mlm", emd=True, impl=impl)
    ids, mask = batch(48, batch_size=3, pad_from=40)
    labels = torch.full_like(ids, -100)
    labels[0, [0, 7, 30, 47]] = ids[0, [0, 7, 30, 47]]
    labels[2, [3, 39]] = ids[2, [3, 39]]  # sequence 1 has none
    full = ours(input_ids=ids, attention_mask=mask).logits
    full_loss = torch.nn.functional.cross_entropy(full[labels != -100], labels[labels != -100])
    full_loss.backward()
    full_grads = {k: p.grad.clone() for k, p in ours.named_parameters()}
    ours.zero_grad()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert (out.logits - full[labels != -100]).abs().max().item() <= TOL
    assert abs(out.loss.item() - full_loss.item()) <= TOL
    for key, param in ours.named_parameters():
        assert (param.grad - full_grads[key]).abs().max().item() <= TOL, key


def test_bf16_autocast_follows_fp32():
    """Mixed precision: the bf16 forward stays close to fp32 (no overflow in the fused bias path)."""
    _, ours = hf_and_ours(CONFIGS["v2"], "mlm", emd=True, impl="auto")
    ids, mask = batch(64, pad_from=50)
    with torch.no_grad():
        ref = ours(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(input_ids=ids, attention_mask=mask).logits
    assert max_diff_valid(ref, low.float(), mask) <= 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("rows,n", [(1, 1), (2, 2), (3, 5), (5, 5), (2, 7)])
def test_skew_view_reads_each_distance_and_zero_unread_clears_the_rest(rows, n):
    from model.fast.relative_bias import skew_view, zero_unread
    x = torch.randn(2, rows, n + rows, dtype=torch.float64)
    r, j = torch.meshgrid(torch.arange(rows), torch.arange(n), indexing="ij")
    assert torch.equal(skew_view(x, n), x[:, r, rows - 1 - r + j])
    read = torch.zeros_like(x)
    skew_view(read, n).fill_(1)
    zero_unread(x, n)
    assert torch.equal(x != 0, read.bool())  # randn gives no zeros: exactly the unread entries cleared


@pytest.mark.parametrize("block", [1, 3, 7, 16])
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
def test_relative_bias_equals_the_gathered_terms_and_has_exact_gradients(block, terms):
    """The blocked products (any block size, one that does not divide N included) give c2p + p2c as the
    official code computes them (a gather with the [N, N] index), and gradcheck passes."""
    from model.attention import relative_position_index
    from model.fast.relative_bias import RelativeBias, distance_index
    config = CONFIGS["v2"].replace(position_buckets=4, max_relative_positions=8)
    B, H, N, d = 2, 2, 7, 3
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, N, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    span = config.att_span
    pos_key, pos_query = (torch.randn(H, 2 * span, d, dtype=torch.float64, generator=g, requires_grad=True)
                          for _ in range(2))
    index = relative_position_index(N, N, config)
    by_distance = distance_index(index)
    reverse = torch.cat([by_distance[:-1].flip(0), by_distance[-1:]])
    c2p_table = pos_key[:, by_distance] if "c2p" in terms else None
    p2c_table = pos_query[:, reverse] if "p2c" in terms else None
    got = RelativeBias.apply(q, k, c2p_table, p2c_table, block).view(B, H, N, N)
    expected = torch.zeros(B, H, N, N, dtype=torch.float64)
    if "c2p" in terms:
        expected = expected + torch.gather(q @ pos_key.transpose(-1, -2), -1, index.expand(B, H, N, N))
    if "p2c" in terms:
        expected = expected + torch.gather(k @ pos_query.transpose(-1, -2), -1, index.T.expand(B, H, N, N)).transpose(-1, -2)
    assert torch.allclose(got, expected, atol=1e-12)
    tables = tuple(t.detach().requires_grad_() if t is not None else None for t in (c2p_table, p2c_table))
    assert torch.autograd.gradcheck(lambda *a: RelativeBias.apply(*a, block), (q, k) + tables)


def test_softmax_dropout_matmul_matches_autograd_with_the_same_mask():
    """Backward draws the forward's dropout mask again from the generator state saved in forward: the
    gradients are those of autograd with that mask, also when other draws come in between, and the
    default generator advances by the forward's one draw only."""
    from model.fast.softmax_dropout import SoftmaxDropoutMatmul
    from model.fast.dropout import dropout_keep_mask
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(2, 1, 6, 6, generator=g) < 0.7
    mask[1, 0, 2] = False  # a row with every key masked attends uniformly
    torch.manual_seed(5)
    out = SoftmaxDropoutMatmul.apply(scores.clone(), mask, v, 0.3)  # scores are filled in place
    after_forward = torch.rand(3)  # a draw between forward and backward
    got = torch.autograd.grad(out, (scores, v), grad)
    after_backward = torch.rand(3)
    torch.manual_seed(5)  # the same draws give the same mask
    keep, scale = dropout_keep_mask(scores.shape, 0.3)
    assert torch.equal(torch.rand(3), after_forward) and torch.equal(torch.rand(3), after_backward)
    assert 0 < keep.sum() < keep.numel()
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
    ref = torch.matmul(probs * keep * scale, v)
    expected = torch.autograd.grad(ref, (scores, v), grad)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-12)


def test_dropout_keep_mask_is_an_inverted_dropout_with_keep_probability_1_minus_p():
    from model.fast.dropout import dropout_keep_mask
    torch.manual_seed(0)
    for p in (0.1, 0.3, 0.5):
        keep, scale = dropout_keep_mask((3, 1000, 1001), p)  # an odd count: the last 64-bit draw is partial
        assert keep.dtype == torch.bool and keep.shape == (3, 1000, 1001)
        assert abs(scale * (1 - p) - 1) < 1e-4  # keep probability within 1.6e-5 of 1 - p
        frac = keep.double().mean().item()  # 3M draws: standard error below 3e-4
        assert abs(frac - (1 - p)) < 2e-3, (p, frac)
        assert abs(frac * scale - 1) < 3e-3
        # no structure across the four entries that share one 64-bit draw
        lanes = keep.flatten()[:2_000_000].view(-1, 4).double().mean(0)
        assert torch.all((lanes - (1 - p)).abs() < 4e-3), lanes


def test_dropout_module_is_an_inverted_dropout_and_the_identity_in_eval():
    d = convert.apply(torch.nn.Dropout(0.2))
    assert type(d).__name__ == "CheapDropout"
    torch.manual_seed(0)
    x = torch.randn(2, 500, 768, dtype=torch.float64, requires_grad=True)
    y = d(x)
    keep = y != 0
    assert abs(keep.double().mean().item() - 0.8) < 3e-3
    assert torch.allclose(y[keep], x[keep] / 0.8, rtol=1e-4)  # scale 2^15 / round(0.8 · 2^15)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(grad, keep.double() * (2 ** 15 / round(0.8 * 2 ** 15)))  # the same mask and scale in backward
    assert d.eval()(x) is x and isinstance(d, torch.nn.Dropout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32])
def test_keep_mask_as_ones_and_zeros_of_any_dtype(dtype):
    """draw_keep's int16 mask (-1 kept, 0 dropped) as exactly 1.0 and +0.0 in the probabilities' dtype."""
    from model.fast.dropout import draw_keep, keep_as, keep_from_bits
    torch.manual_seed(0)
    keep = draw_keep((5, 7, 9), 0.3)
    assert keep.dtype == torch.int16 and set(keep.unique().tolist()) == {-1, 0}
    expected = (keep != 0).to(dtype)
    ones = keep_as(keep, dtype)  # may overwrite keep
    assert ones.dtype == dtype and torch.equal(ones, expected)
    if dtype.is_floating_point:
        assert not torch.signbit(ones).any()  # +0.0, never -0.0
    # the bool form (other devices) keeps the same entries, at every int16 value and several p
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    for p in (0.0001, 0.1, 0.5, 0.9, 0.9999):
        as_bool = keep_from_bits(bits, p, as_int16=False)
        assert torch.equal(keep_from_bits(bits.clone(), p, as_int16=True) != 0, as_bool)
        assert as_bool.sum().item() == round((1 - p) * 2 ** 15) * 2  # probability t / 2^15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_softmax_and_its_backward_in_place_equal_the_out_of_place_kernels_bitwise(dtype):
    """SoftmaxDropoutMatmul writes the probabilities over the scores, and softmax's backward over the
    gradient, on the CPU: both rely on the kernels reading each row before writing it."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(2, 3, 64, 512, generator=g) * 4).to(dtype)
    grad = torch.randn(2, 3, 64, 512, generator=g).to(dtype)
    probs = torch.softmax(scores, -1)
    in_place = scores.clone()
    assert torch._softmax(in_place, -1, False, out=in_place).data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, probs)
    expected = torch._softmax_backward_data(grad, probs, -1, dtype)
    got = grad.clone()
    torch._softmax_backward_data(got, probs, -1, dtype, grad_input=got)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_float_cross_entropy_equals_cross_entropy_on_float_logits(dtype):
    """The MLM loss without fp32 copies of the logits: the value and gradient of
    F.cross_entropy(logits.float(), targets), in chunks that do not divide the rows."""
    from model.fast.memory import FloatCrossEntropy
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(13, 50, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (13,), generator=g)
    loss = FloatCrossEntropy.apply(logits, targets, 4)
    (grad,) = torch.autograd.grad(loss * 2.5, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.float() if dtype != torch.float64 else ref_logits, targets)
    (ref_grad,) = torch.autograd.grad(ref * 2.5, ref_logits)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    assert abs(loss.item() - ref.item()) <= tol * 10
    assert grad.dtype == dtype and torch.allclose(grad.float(), ref_grad.float(), atol=tol, rtol=0)
    assert torch.equal(logits, ref_logits)  # the logits are returned to the caller: never modified
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: FloatCrossEntropy.apply(x, targets, 4), (logits.detach().requires_grad_(),))


@pytest.mark.parametrize("act", ["gelu", "tanh", "relu"])
def test_activated_linear_recomputes_the_activation_with_exact_gradients(act):
    from model.fast.memory import ActivationThenLinear
    from model.layers import activation
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    fn = activation(act)
    out = ActivationThenLinear.apply(pre, weight, bias, fn)
    assert torch.equal(out, torch.nn.functional.linear(fn(pre), weight, bias))
    assert torch.autograd.gradcheck(lambda *a: ActivationThenLinear.apply(*a, fn), (pre, weight, bias))


def test_autocast_linear_equals_autocast_f_linear_in_value_and_gradients():
    """Under bf16 autocast our Linear keeps the fp32 weight for backward instead of its bf16 copy;
    the output and every gradient equal what autocast's own F.linear gives."""
    from model.layers import Linear
    torch.manual_seed(0)
    layer = convert.apply(Linear(24, 16, std=0.5))
    assert type(layer).__name__ == "AutocastKeepLinear"
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad = torch.randn(3, 5, 16).bfloat16()
    results = []
    for ours in (True, False):
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x) if ours else torch.nn.functional.linear(x, layer.weight, layer.bias)
        out.backward(grad)
        results.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2), (a - b).abs().max()
    assert torch.equal(results[0][0], results[1][0])  # the forward is the same computation


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_no_padding_skips_the_mask_and_changes_nothing(impl, monkeypatch):
    """A batch without padding gets mask4d None (attention_mask_4d): forward and gradients, dropout on,
    equal bitwise those of the same batch through the masked path; a padded batch keeps its mask."""
    import model.encoder
    from model import DebertaForMaskedLM
    from model.attention import attention_mask_2d_to_4d, attention_mask_4d
    ids, mask = batch(16)
    assert attention_mask_4d(mask) is None
    assert torch.equal(attention_mask_4d(batch(16, pad_from=9)[1]), attention_mask_2d_to_4d(batch(16, pad_from=9)[1]))
    torch.manual_seed(0)
    mlm = convert.apply(DebertaForMaskedLM(CONFIGS["v2"]), impl).train()
    labels = torch.where(torch.arange(16) % 3 == 0, ids, -100)

    def loss_and_grads():
        torch.manual_seed(1)  # the same dropout draws
        loss = mlm(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss, torch.autograd.grad(loss, list(mlm.parameters()), allow_unused=True)

    loss, grads = loss_and_grads()
    monkeypatch.setattr(model.encoder, "attention_mask_4d", attention_mask_2d_to_4d)  # always a mask
    masked_loss, masked_grads = loss_and_grads()
    assert torch.equal(loss, masked_loss)
    assert sum(g is not None for g in grads) > 10
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, masked_grads))


def test_attention_probabilities_keep_the_scores_dtype_under_autocast():
    """The probabilities are computed by _softmax, which no autocast rule casts: bf16 scores give bf16
    probabilities (the kernel sums in fp32), as SDPA and flash attention keep them; torch.softmax is cast
    to fp32 by CUDA's autocast (not by the CPU's, so only the op choice can be checked here)."""
    from model.fast.softmax_dropout import SoftmaxDropoutMatmul
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_softmax", "AutocastCUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::softmax.int", "AutocastCUDA")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 8, 8, generator=g).bfloat16().requires_grad_()
    v = torch.randn(2, 3, 8, 4, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SoftmaxDropoutMatmul.apply(scores.clone(), None, v, 0.0)
    out.float().sum().backward()
    expected = torch.softmax(scores.float(), -1) @ v.float()
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 2e-2
    assert scores.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16


def test_auto_attention_is_the_eager_path_off_cuda():
    """attention_impl "auto" (the default) takes "eager" on the CPU ("sdpa" on CUDA): bitwise equal."""
    from model import DebertaModel
    assert preset("tiny").attention_impl == "auto"
    ids, mask = batch(12, pad_from=7)
    torch.manual_seed(0)
    auto = convert.apply(DebertaModel(CONFIGS["v2"])).eval()
    reference = convert.apply(DebertaModel(CONFIGS["v2"]), "eager").eval()
    reference.load_state_dict(auto.state_dict())
    sdpa = convert.apply(DebertaModel(CONFIGS["v2"]), "sdpa").eval()
    sdpa.load_state_dict(auto.state_dict())
    with torch.no_grad():
        out = auto(ids, mask).last_hidden_state
        assert torch.equal(out, reference(ids, mask).last_hidden_state)
        assert not torch.equal(out, sdpa(ids, mask).last_hidden_state)  # a different path, close but not bitwise


def test_fused_attention_falls_back_where_its_kernels_cannot_run(monkeypatch):
    """attention_impl "fused" without CUDA (and without TRITON_INTERPRET) takes auto's path: on the CPU the
    eager path, bitwise. tests/unit/test_fused_attention.py runs the kernels themselves."""
    from model import DebertaModel
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ids, mask = batch(12, pad_from=7)
    torch.manual_seed(0)
    fused = convert.apply(DebertaModel(CONFIGS["v2"]), "fused").eval()
    reference = convert.apply(DebertaModel(CONFIGS["v2"]), "eager").eval()
    reference.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.equal(fused(ids, mask).last_hidden_state, reference(ids, mask).last_hidden_state)


@pytest.mark.parametrize("impl", ["math", "eager", "sdpa", "auto", "blockwise"])
@pytest.mark.parametrize("name", ["v2", "unshared_p2c", "unshared_c2p", "no_buckets", "absolute"])
def test_every_attention_path_equals_the_math_path(impl, name):
    """The plain model (model/: the formula term by term, gathers, masked softmax, nn.Dropout, nn.Linear) is
    the oracle: the MLM + EMD model on a padded batch, training mode without dropout, gives the same loss and
    parameter gradients converted with every attention path and every other fast piece (fused QKV, the autocast
    linear, the recomputed activation, cheap dropout, the float cross-entropy), and the same hidden states in
    eval mode."""
    from model import DebertaForMaskedLM
    config = CONFIGS[name].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = batch(40, batch_size=3, pad_from=29)
    labels = torch.full_like(ids, -100)
    labels[:, 3:25:4] = ids[:, 3:25:4]
    results = {}
    for attention in ("plain", impl):
        torch.manual_seed(0)
        model = DebertaForMaskedLM(config).train()
        if attention != "plain":
            convert.apply(model, attention)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            hidden = model.eval().deberta(ids, mask).last_hidden_state
        results[attention] = (loss.item(), grads, hidden)
    (loss, grads, hidden), (fast_loss, fast_grads, fast_hidden) = results["plain"], results[impl]
    assert abs(loss - fast_loss) < 1e-6 and grads.keys() == fast_grads.keys()
    for key, grad in grads.items():
        assert (grad - fast_grads[key]).abs().max() <= 1e-5 * max(grad.abs().max().item(), 1e-3), key
    assert max_diff_valid(hidden, fast_hidden, mask) < TOL
