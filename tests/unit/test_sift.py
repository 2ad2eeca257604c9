"""SiFT (pipeline/finetune/sift.py) on a tiny random classifier: what the hooked LayerNorm receives, the
adversarial term, and λ = 0 being plain training."""
import pytest
import torch

from model import DebertaForMultipleChoice, DebertaForSequenceClassification, preset
from pipeline.finetune.sift import SiFT, symmetric_kl

VOCAB = 100


def tiny_classifier(num_labels=3, seed=0):
    torch.manual_seed(seed)
    return DebertaForSequenceClassification(preset("tiny", vocab_size=VOCAB), num_labels=num_labels)


def batch(size=4, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (size, length), generator=generator)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[0, 8:] = 0                       # one padded row
    labels = torch.randint(0, 3, (size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def capture_layernorm_inputs(model):
    """Record what deberta.embeddings.LayerNorm receives (forward hooks see the pre-hook's output)."""
    seen = []
    model.deberta.embeddings.LayerNorm.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    return seen


def test_layernorm_input_is_normalised_and_the_perturbation_is_bounded():
    model = tiny_classifier()
    with torch.no_grad():  # a word-embedding table far from unit scale, so normalising is visible
        model.deberta.embeddings.word_embeddings.weight.mul_(7.0).add_(3.0)
    sift = SiFT(model, lambda_=1.0, init=1e-2, step=1e-4)
    seen = capture_layernorm_inputs(model)
    sift.loss(batch())
    clean, ascent, adversarial = seen                # three passes: clean, ascent, adversarial
    assert torch.allclose(clean.mean(-1), torch.zeros(clean.shape[:2]), atol=1e-5)
    assert torch.allclose(clean.var(-1, unbiased=False), torch.ones(clean.shape[:2]), atol=1e-4)
    raw = model.deberta.embeddings.word_embeddings(batch()["input_ids"])
    assert raw.mean(-1).abs().min() > 1              # what the hook replaced: far from mean 0, var 1
    assert raw.var(-1, unbiased=False).max() < 0.5
    delta0, delta1 = ascent - clean, adversarial - clean
    assert 0 < delta0.abs().max() <= 2e-2 + 1e-6     # δ0 = clamp(N(0, σ²), −2σ, 2σ)
    step = (delta1 - delta0).abs()
    # one L∞-normalised ascent step: no element moves by more than η (g / (1e-6 + max|g|) <= 1)
    assert 0 < step.max() <= 1e-4 * (1 + 1e-3)


def test_adversarial_term_is_finite_non_negative_and_enters_the_total():
    model = tiny_classifier()
    sift = SiFT(model, lambda_=2.5)
    out = sift.loss(batch())
    assert torch.isfinite(out.adv_loss) and out.adv_loss >= 0
    assert torch.allclose(out.loss, out.task_loss + 2.5 * out.adv_loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_symmetric_kl_is_the_true_one_plus_entropies_with_the_same_gradient():
    # The official form, Σ q·(−log p) + Σ p·(−log q) with p, q detached, is KL(q‖p) + KL(p‖q) + H(p) + H(q);
    # with detached probability factors the entropies add no gradient (Σ p ∇log p = 0).
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(5, 3, requires_grad=True)
    official_value = symmetric_kl(a, b)
    official_value.sum().backward()
    official = (a.grad.clone(), b.grad.clone())
    a.grad, b.grad = None, None
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = log_p.exp().detach(), log_q.exp().detach()
    true_kl = (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)
    entropies = -(p * p.log()).sum(-1) - (q * q.log()).sum(-1)
    assert torch.allclose(official_value, true_kl + entropies, atol=1e-6)
    true_kl.sum().backward()
    assert torch.allclose(official[0], a.grad, atol=1e-6) and torch.allclose(official[1], b.grad, atol=1e-6)


def test_multiple_choice_logits_take_the_kl_over_the_choices():
    torch.manual_seed(0)
    model = DebertaForMultipleChoice(preset("tiny", vocab_size=VOCAB))
    inputs = batch(size=6)
    mc = {"input_ids": inputs["input_ids"].view(3, 2, -1), "attention_mask": inputs["attention_mask"].view(3, 2, -1),
          "labels": torch.tensor([0, 1, 1])}
    out = SiFT(model, lambda_=1.0).loss(mc)
    assert out.logits.shape == (3, 2)
    assert torch.isfinite(out.adv_loss) and out.adv_loss >= 0


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_lambda_zero_is_exactly_plain_training():
    plain_model, sift_model = tiny_classifier(), tiny_classifier()
    torch.manual_seed(5)                             # same dropout masks in both runs (train mode)
    plain = plain_model(**batch())
    plain.loss.backward()
    sift = SiFT(sift_model, lambda_=0.0)
    torch.manual_seed(5)
    out = sift.loss(batch())
    out.loss.backward()
    assert not sift.enabled and len(sift_model.deberta.embeddings.LayerNorm._forward_pre_hooks) == 0
    assert torch.equal(out.loss, plain.loss) and out.adv_loss is None
    plain_grads, sift_grads = grads_of(plain_model), grads_of(sift_model)
    assert plain_grads.keys() == sift_grads.keys()
    assert all(torch.equal(plain_grads[k], sift_grads[k]) for k in plain_grads)


def test_clean_pass_with_sift_matches_the_plain_model_in_eval():
    # LayerNorm(LayerNorm_noaffine(x)) = LayerNorm(x) up to the eps: evaluation is not changed.
    model = tiny_classifier().eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        plain = model(**inputs).logits
        sift = SiFT(model, lambda_=1.0)
        hooked = model(**inputs).logits
        sift.remove()
        again = model(**inputs).logits
    assert torch.allclose(plain, hooked, atol=1e-5)
    assert torch.equal(plain, again)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ascent loss"):
        SiFT(tiny_classifier(), ascent_loss="js")
    with pytest.raises(ValueError, match=">= 0"):
        SiFT(tiny_classifier(), lambda_=-1)
