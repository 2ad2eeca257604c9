"""DeBERTa-v3's replaced token detection (model/rtd.py) against the recipe written out in plain PyTorch: the
labels, the total loss, and where each loss's gradient goes under each embedding sharing."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from model import DebertaForMaskedLM, preset
from model.encoder import DebertaModel
from model.heads import masked_positions
from model.rtd import RTDModel, generator_config_of, replace_masked
from tests.helpers.hf_oracle import hf_config

CONFIG = preset("tiny", vocab_size=300, conv_kernel_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(5, 300, (3, 20), generator=g)
    mask = torch.ones_like(original)
    mask[2, 14:] = 0
    labels = torch.full_like(original, -100)
    chosen = torch.rand(3, 20, generator=g) < 0.3
    chosen &= mask.bool()
    labels[chosen] = original[chosen]
    inputs = torch.where(chosen, torch.full_like(original, 4), original)  # 4: [MASK] of this toy vocabulary
    return inputs, mask, labels


def model(sharing, seed=1):
    torch.manual_seed(seed)
    rtd = RTDModel(CONFIG, generator_config_of(CONFIG), sharing=sharing, rtd_lambda=10.0)
    with torch.no_grad():  # a non-zero delta, so that gdes's two tables differ
        if sharing == "gdes":
            rtd.discriminator.deberta.embeddings.word_embeddings.weight.normal_(0, 0.01)
    return rtd


def fixed_samples(labels, seed=2):
    index, targets = masked_positions(labels)
    g = torch.Generator().manual_seed(seed)
    sampled = torch.randint(5, 300, targets.shape, generator=g)
    sampled[::3] = targets[::3]  # some samples are the original token
    return sampled


def test_a_sample_equal_to_the_original_is_not_replaced():
    inputs, mask, labels = batch()
    index, targets = masked_positions(labels)
    sampled = targets.clone()
    sampled[1] = (targets[1] + 1) % 300
    corrupted, replaced = replace_masked(inputs, index, targets, sampled)
    assert replaced.sum() == 1 and replaced.view(-1)[index[1]] == 1
    assert torch.equal(corrupted.view(-1)[index], sampled)
    unmasked = torch.ones(inputs.numel(), dtype=torch.bool)
    unmasked[index] = False
    assert torch.equal(corrupted.view(-1)[unmasked], inputs.view(-1)[unmasked])


@pytest.mark.parametrize("sharing", ["gdes", "es", "none"])
def test_the_total_loss_is_the_recipe_written_out(sharing):
    inputs, mask, labels = batch()
    rtd = model(sharing).train()
    sampled = fixed_samples(labels)
    out = rtd(input_ids=inputs, attention_mask=mask, labels=labels, sampled=sampled)
    # the recipe, by hand: the generator's MLM loss, the corrupted input, the discriminator's BCE over valid tokens
    generator = DebertaForMaskedLM(generator_config_of(CONFIG))
    generator.load_state_dict(rtd.generator.state_dict())
    mlm = generator(input_ids=inputs, attention_mask=mask, labels=labels).loss
    index, targets = masked_positions(labels)
    corrupted = inputs.clone().view(-1)
    corrupted[index] = sampled
    corrupted = corrupted.view_as(inputs)
    replaced = torch.zeros(inputs.numel())
    replaced[index] = (sampled != targets).float()
    shared = generator.deberta.embeddings.word_embeddings.weight
    own = rtd.discriminator.deberta.embeddings
    table = {"gdes": shared + own.word_embeddings.weight if sharing == "gdes" else None, "es": shared,
             "none": own.word_embeddings.weight if sharing == "none" else None}[sharing]
    encoder = DebertaModel(CONFIG, word_table=False)
    encoder.load_state_dict({k: v for k, v in rtd.discriminator.deberta.state_dict().items()
                             if not k.startswith("embeddings.word_embeddings")})
    hidden = encoder(attention_mask=mask, inputs_embeds=F.embedding(corrupted, table)).last_hidden_state
    head = rtd.discriminator.mask_predictions
    logits = head.classifier(F.gelu(head.dense(head.LayerNorm(hidden[:, :1] + hidden)))).squeeze(-1)
    valid = mask.view(-1).bool()
    bce = F.binary_cross_entropy_with_logits(logits.view(-1)[valid], replaced[valid])
    assert out.loss.item() == pytest.approx((mlm + 10.0 * bce).item(), abs=1e-5)
    assert out.rtd_loss.item() == pytest.approx(bce.item(), abs=1e-6)
    assert out.replaced_rate.item() == pytest.approx(replaced[valid].mean().item())
    assert out.generator_correct.item() == pytest.approx((sampled == targets).float().mean().item())


def grads(rtd, loss):
    rtd.zero_grad()
    loss.backward(retain_graph=True)
    return {n: p.grad.clone() if p.grad is not None else None for n, p in rtd.named_parameters()}


G_TABLE = "generator.deberta.embeddings.word_embeddings.weight"
D_TABLE = "discriminator.deberta.embeddings.word_embeddings.weight"


def parts(rtd, inputs, mask, labels):
    """The gradients of the total loss, of the MLM loss alone and of rtd_lambda x the RTD loss alone."""
    out = rtd(input_ids=inputs, attention_mask=mask, labels=labels, sampled=fixed_samples(labels))
    total = grads(rtd, out.loss)
    mlm = grads(rtd, rtd.generator(input_ids=inputs, attention_mask=mask, labels=labels).loss)
    judged = rtd.discriminator(out.corrupted, mask, out.replaced, rtd.shared_rows(out.corrupted))
    return total, mlm, grads(rtd, rtd.rtd_lambda * judged.loss)


def test_gdes_sends_the_mlm_gradient_to_the_generator_table_and_the_rtd_gradient_to_the_delta():
    inputs, mask, labels = batch()
    total, mlm, rtd_part = parts(model("gdes").train(), inputs, mask, labels)
    assert torch.equal(total[G_TABLE], mlm[G_TABLE])                          # the MLM gradient only
    assert rtd_part[G_TABLE] is None                                          # nothing of RTD reaches it
    assert rtd_part[D_TABLE].abs().sum() > 0 and mlm[D_TABLE] is None
    assert torch.allclose(total[D_TABLE], rtd_part[D_TABLE], atol=1e-8)        # the delta: the RTD gradient only


def test_at_step_0_the_discriminator_reads_the_generator_table():
    torch.manual_seed(0)
    rtd = RTDModel(CONFIG, generator_config_of(CONFIG), sharing="gdes")
    assert not rtd.discriminator.deberta.embeddings.word_embeddings.weight.any()   # the delta starts at zeros
    assert torch.equal(rtd.discriminator_word_table(), rtd.generator.deberta.embeddings.word_embeddings.weight)


def test_es_sends_both_gradients_to_the_one_table_and_none_keeps_them_apart():
    inputs, mask, labels = batch()
    shared = model("es").train()
    assert not hasattr(shared.discriminator.deberta.embeddings, "word_embeddings")
    total, mlm, rtd_part = parts(shared, inputs, mask, labels)
    assert rtd_part[G_TABLE].abs().sum() > 0 and mlm[G_TABLE].abs().sum() > 0
    assert torch.allclose(total[G_TABLE], mlm[G_TABLE] + rtd_part[G_TABLE], atol=1e-7)   # the sum of both
    total, mlm, rtd_part = parts(model("none").train(), inputs, mask, labels)
    assert torch.equal(total[G_TABLE], mlm[G_TABLE]) and rtd_part[G_TABLE] is None
    assert torch.allclose(total[D_TABLE], rtd_part[D_TABLE], atol=1e-8) and mlm[D_TABLE] is None


def test_sampling_follows_the_generator_and_its_random_generator():
    inputs, mask, labels = batch()
    rtd = model("gdes").eval()
    with torch.no_grad():
        one = rtd(input_ids=inputs, attention_mask=mask, labels=labels, sample_generator=torch.Generator().manual_seed(5))
        two = rtd(input_ids=inputs, attention_mask=mask, labels=labels, sample_generator=torch.Generator().manual_seed(5))
    assert torch.equal(one.corrupted, two.corrupted) and 0 < one.replaced.sum() < labels.ne(-100).sum() + 1


def test_v3_presets_have_the_official_configs_parameter_counts():
    """Exactly transformers' DebertaV2Model on the same config (the official rtd_*.json values), and the model
    cards' rounded backbone + embedding figures (22M + 48M, 44M + 98M, 86M + 98M, 304M + 131M) within 2M."""
    cards = {"v3-xsmall": (22, 48), "v3-small": (44, 98), "v3-base": (86, 98), "v3-large": (304, 131)}
    layers = {"v3-xsmall": (12, 6), "v3-small": (6, 3), "v3-base": (12, 6), "v3-large": (24, 12)}
    for name, (backbone, embedding) in cards.items():
        config = preset(name)
        with torch.device("meta"):
            ours = DebertaModel(config)
            theirs = transformers.DebertaV2Model(hf_config(config))
        total = sum(p.numel() for p in ours.parameters())
        assert total == sum(p.numel() for p in theirs.parameters()), name
        table = config.vocab_size * config.hidden_size
        assert abs((total - table) / 1e6 - backbone) < 2 and abs(table / 1e6 - embedding) < 2, name
        assert (config.num_hidden_layers, generator_config_of(config).num_hidden_layers) == layers[name]
        assert config.conv_kernel_size == 0 and not config.position_biased_input
    with pytest.raises(ValueError, match="deeper than the discriminator"):
        generator_config_of(preset("v3-small"), layers=8)


def test_per_sequence_seeds_make_the_draws_independent_of_the_batching():
    inputs, mask, labels = batch()
    rtd = model("gdes").eval()
    seeds = torch.tensor([11, 22, 33])
    with torch.no_grad():
        whole = rtd(input_ids=inputs, attention_mask=mask, labels=labels, sample_seeds=seeds)
        parts = [rtd(input_ids=inputs[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1],
                     sample_seeds=seeds[i:i + 1]) for i in range(3)]
    assert torch.equal(whole.corrupted, torch.cat([p.corrupted for p in parts]))


@pytest.mark.parametrize("spelling", ["classifier", "classifer"])
def test_a_v3_release_in_the_published_layout_loads_also_with_the_old_classifier_name(spelling, tmp_path, capsys):
    """The published deberta-v3 layout (pytorch_model.bin with mask_predictions.classifier.*, the generator's
    file, no generator_config.json) loads into an RTD model; a release that spells the head's classifier
    `classifer` (an earlier official revision, our releases before) loads the same, with a one-line notice."""
    from pipeline.release.rtd import load_rtd_release_into
    from tests.helpers.v3 import write_published_v3
    source = model("gdes", seed=1)
    write_published_v3(source, str(tmp_path / "v3"), classifier=spelling)
    loaded = model("gdes", seed=7)
    load_rtd_release_into(loaded, str(tmp_path / "v3"), stage=0, rank=0)
    notice = capsys.readouterr().err
    if spelling == "classifer":
        assert notice.count("\n") == 1 and "mask_predictions.classifer.* (the old spelling)" in notice
    else:
        assert notice == ""
    expected = dict(source.named_parameters())
    for name, param in loaded.named_parameters():  # gdes: the delta comes back as (E_G + E_Δ) - E_G
        assert torch.allclose(param, expected[name], atol=1e-7, rtol=0), name
    assert torch.equal(loaded.discriminator.mask_predictions.classifier.weight,
                       source.discriminator.mask_predictions.classifier.weight)


def test_a_state_dict_with_the_old_classifier_name_loads_into_the_discriminator():
    """A training checkpoint's module state written before the rename (strict load_state_dict, as a resume does)."""
    source = model("gdes", seed=1)
    old = {k.replace("mask_predictions.classifier.", "mask_predictions.classifer."): v
           for k, v in source.state_dict().items()}
    assert any("classifer" in k for k in old)
    loaded = model("gdes", seed=7)
    loaded.load_state_dict(old, strict=True)
    assert torch.equal(loaded.discriminator.mask_predictions.classifier.bias,
                       source.discriminator.mask_predictions.classifier.bias)
