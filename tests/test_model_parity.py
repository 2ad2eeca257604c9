"""Our DeBERTa-v2 against transformers' on the same random weights (CPU, fp32): outputs in eval mode,
gradients in training mode with dropout 0, the EMD against the spec's recipe on transformers' modules,
and the SDPA attention path against the reference path."""
import pytest
import torch

from hf_oracle import hf_and_ours
from model import preset

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
@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_base_model_matches_transformers(name, impl):
    config = CONFIGS[name].replace(attention_impl=impl)
    theirs, ours = hf_and_ours(config, "base")
    for seq_len, pad_from in [(1, None), (7, 4), (128, 100)]:
        ids, mask = batch(seq_len, pad_from=pad_from)
        tt = torch.randint(0, 2, ids.shape) if config.type_vocab_size else None
        with torch.no_grad():
            a = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        assert max_diff_valid(a, b, mask) <= TOL, (name, seq_len)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_full_length_512_with_padding(impl):
    config = CONFIGS["v2"].replace(attention_impl=impl)
    theirs, ours = hf_and_ours(config, "base")
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


@pytest.mark.parametrize("name", ["v2", "unshared_p2c", "no_conv"])
def test_mlm_head_without_emd_matches_transformers(name):
    theirs, ours = hf_and_ours(CONFIGS[name], "mlm", emd=False)
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


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_gradients_match_transformers_in_training_mode(impl):
    config = CONFIGS["v2"].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attention_impl=impl)
    theirs, ours = hf_and_ours(config, "mlm", emd=False)
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


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_enhanced_mask_decoder_matches_spec_recipe(impl):
    config = CONFIGS["v2"].replace(attention_impl=impl)
    theirs, ours = hf_and_ours(config, "mlm", emd=True)
    table = ours.deberta.embeddings.position_embeddings.weight.detach()
    ids, mask = batch(48, pad_from=40)
    with torch.no_grad():
        expected = emd_on_transformers(theirs, table, ids, mask)
        got = ours(input_ids=ids, attention_mask=mask).logits
        plain = theirs(input_ids=ids, attention_mask=mask).logits
    assert max_diff_valid(expected, got, mask) <= TOL
    assert max_diff_valid(plain, got, mask) > 1e-3  # the EMD really changes the prediction
