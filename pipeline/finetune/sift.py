"""SiFT: scale-invariant fine-tuning (DeBERTa paper §4; spec §5, official `DeBERTa/sift/sift.py`).

Applied from outside the model, which stays plain PyTorch:

    sift = SiFT(model, lambda_=5.0, init=1e-2, step=1e-4)
    out = sift.loss(batch)                 # or sift.loss(batch, forward=engine) under DeepSpeed
    out.loss.backward()                    # out.task_loss, out.adv_loss, out.logits for logging

What it does, per training step:
1. A forward pre-hook on `deberta.embeddings.LayerNorm` replaces that module's input x (the word
   embeddings, before the embedding LayerNorm) by x̂ = LayerNorm_noaffine(x, eps=1e-7): the
   "normalised word embeddings". This holds in every pass while SiFT is attached (clean training
   passes and evaluation too), so the model sees the same input distribution in all of them.
2. Clean pass: task loss and clean logits; x̂ is kept, detached, for the perturbed passes (so no
   gradient reaches the word embedding table through the adversarial branch).
3. Ascent step: δ0 = clamp(N(0, σ²), −2σ, 2σ) in fp32; a pass on x̂ + δ0 with only δ receiving
   gradient (torch.autograd.grad with δ as the only input: the model's parameters get none);
   L = ascent_loss(pert_logits, clean_logits.detach()).sum();
   δ ← δ0 + η · g / (1e-6 + max over the hidden dim of |g|) (per token L∞-normalised); skipped when
   ‖g‖ is NaN/Inf.
4. Adversarial pass on x̂ + δ (parameters trainable): L_adv = mean over rows of the symmetric KL of
   the official code, Σ p_c·(−log p_p) + Σ p_p·(−log p_c), probability factors detached, log-prob
   factors carrying gradient to both passes. As coded officially this is the symmetric KL plus the two
   entropies: the extra terms have zero gradient (Σ p ∇log p = 0), so training is that of the symmetric
   KL, but the logged value is ≥ 0 and not 0 when both passes agree.
5. Total = task_loss + λ · L_adv.

λ = 0 means SiFT is off: no hook is attached and `loss()` is the model's plain loss, bit for bit (as
the official runner, which adds the adversarial term only when vat_lambda > 0).

Logits [B, K] (classification) or [B, C] (multiple choice: the KL is over the C choices) both work:
the KL is taken over the last dimension. A single output (regression) makes the symmetric KL 0.
"""
import torch
import torch.nn.functional as F

from model import Output
from pipeline.errors import ConfigError

PERTURBED_MODULE = "embeddings.LayerNorm"   # spec: every module whose name contains this
NORM_EPS = 1e-7


# ---------------------------------------------------------------- losses between two sets of logits
def _rows(logits):
    return logits.float().reshape(-1, logits.shape[-1])


def symmetric_kl(logits, target):
    """Per row: Σ p_t·(−log p_l) + Σ p_l·(−log p_t), probabilities detached (official symmetric_kl)."""
    log_p = F.log_softmax(_rows(logits), -1)
    log_q = F.log_softmax(_rows(target), -1)
    p, q = log_p.exp().detach(), log_q.exp().detach()
    return (q * -log_p).sum(-1) + (p * -log_q).sum(-1)


def kl(logits, target):
    """Per row: cross-entropy of the logits against the target distribution (official `kl`)."""
    log_p = F.log_softmax(_rows(logits), -1)
    q = F.softmax(_rows(target).detach(), -1)
    return (q * -log_p).sum(-1)


def mse(logits, target):
    return F.mse_loss(_rows(logits), _rows(target), reduction="none").sum(-1)


ASCENT_LOSSES = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}


# ---------------------------------------------------------------- the hook
class _PerturbationHook:
    """Forward pre-hook state: normalise the input; in a perturbed pass add δ to the stored clean x̂."""

    def __init__(self):
        self.delta = None          # None: clean pass
        self.clean_input = None    # detached x̂ of the last clean pass

    def __call__(self, module, args):
        x = args[0]
        if self.delta is None:
            normalised = F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS).to(x.dtype)
            if module.training:
                self.clean_input = normalised.detach()
            return (normalised,) + tuple(args[1:])
        if self.clean_input is None or self.clean_input.shape != self.delta.shape:
            raise RuntimeError("SiFT: perturbed pass without a matching clean pass")
        perturbed = (self.clean_input.float() + self.delta).to(self.clean_input.dtype)
        return (perturbed,) + tuple(args[1:])


def _perturbed_modules(model):
    found = [(name, m) for name, m in model.named_modules() if PERTURBED_MODULE in name]
    if not found:
        raise ConfigError(f"SiFT: the model has no module named like '*{PERTURBED_MODULE}'")
    return found


class SiFT:
    """SiFT around a plain model (see the module docstring).

    model: the nn.Module whose `deberta.embeddings.LayerNorm` is hooked (under DeepSpeed:
    `engine.module`). lambda_: weight of the adversarial term (0: off). init: σ of the initial noise.
    step: η of the ascent step. ascent_loss: "symmetric-kl" | "kl" | "mse" (ascent step only; the
    adversarial term is always the symmetric KL, as in the official code).
    """

    def __init__(self, model, lambda_=5.0, init=1e-2, step=1e-4, ascent_loss="symmetric-kl"):
        if ascent_loss not in ASCENT_LOSSES:
            raise ConfigError(f"SiFT ascent loss {ascent_loss!r} is not one of {sorted(ASCENT_LOSSES)}")
        if lambda_ < 0 or init < 0 or step < 0:
            raise ConfigError(f"SiFT: lambda, init and step must be >= 0 (got {lambda_}, {init}, {step})")
        self.model = model
        self.lambda_ = float(lambda_)
        self.init = float(init)
        self.step = float(step)
        self.ascent_loss = ASCENT_LOSSES[ascent_loss]
        self.hooks, self._handles = [], []
        if self.enabled:
            for _, module in _perturbed_modules(model):
                hook = _PerturbationHook()
                self.hooks.append(hook)
                self._handles.append(module.register_forward_pre_hook(hook))

    @property
    def enabled(self):
        return self.lambda_ > 0

    def remove(self):
        """Detach the hooks: the model is plain again."""
        for handle in self._handles:
            handle.remove()
        self.hooks, self._handles = [], []

    # ---- passes
    def _set_delta(self, deltas):
        for hook, delta in zip(self.hooks, deltas):
            hook.delta = delta

    def _initial_deltas(self):
        deltas = []
        for hook in self.hooks:
            shape, device = hook.clean_input.shape, hook.clean_input.device
            noise = torch.randn(shape, device=device, dtype=torch.float32) * self.init
            deltas.append(noise.clamp(-2 * self.init, 2 * self.init).requires_grad_(True))
        return deltas

    def _ascend(self, deltas, loss):
        """One L∞-normalised ascent step per δ; a δ whose gradient is not finite stays as it was."""
        grads = torch.autograd.grad(loss, deltas, allow_unused=True)
        updated = []
        for delta, grad in zip(deltas, grads):
            if grad is None or not torch.isfinite(grad.norm()):
                updated.append(delta.detach())
                continue
            scale = 1e-6 + grad.abs().amax(-1, keepdim=True)
            updated.append((delta + self.step * grad / scale).detach())
        return updated

    def perturbed_logits(self, forward, inputs, deltas):
        self._set_delta(deltas)
        try:
            return forward(**inputs).logits
        finally:
            self._set_delta([None] * len(self.hooks))

    def loss(self, batch, forward=None, task_loss_fn=None):
        """Output(loss=total, task_loss, adv_loss, logits) of one training step's batch.

        forward: what runs the model (default: the model; under DeepSpeed: the engine), called with the
        batch's keyword arguments and returning an Output with .logits (and .loss when given labels).
        task_loss_fn(logits, labels): the task loss; default: the model's own loss of the clean pass.
        """
        forward = forward or self.model
        clean = forward(**batch)
        task_loss = clean.loss if task_loss_fn is None else task_loss_fn(clean.logits, batch["labels"])
        if not self.enabled:
            return Output(loss=task_loss, task_loss=task_loss, adv_loss=None, logits=clean.logits)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        target = clean.logits.detach()
        deltas = self._initial_deltas()
        # The ascent pass runs the plain model, not `forward`: its backward reaches δ only and must stay
        # outside a DeepSpeed engine's backward bookkeeping (the engine hooks the outputs of its forward).
        ascent = self.ascent_loss(self.perturbed_logits(self.model, inputs, deltas), target).sum()
        deltas = self._ascend(deltas, ascent)
        adversarial_logits = self.perturbed_logits(forward, inputs, deltas)
        adv_loss = symmetric_kl(adversarial_logits, clean.logits).mean()
        total = task_loss + self.lambda_ * adv_loss
        return Output(loss=total, task_loss=task_loss, adv_loss=adv_loss, logits=clean.logits)
