"""Autograd functions that keep less for backward than autograd would, with the same values and gradients:

  AutocastLinear        under autocast, a Linear that keeps its weight, not the weight's low-precision copy
  ActivationThenLinear  linear(act(pre)) keeping only `pre`: the activation is computed again in backward
  FloatCrossEntropy     mean cross-entropy in fp32 without [M, V] fp32 copies of the logits
"""
import torch
import torch.nn.functional as F


def linear_param_grads(grad, x, weight, bias):
    """The gradients of F.linear's weight and bias from its output's gradient and its input x (both
    [..., features]), in the parameters' dtypes: for the autograd functions that do a Linear's backward."""
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grad_weight = (flat_grad.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
    return grad_weight, None if bias is None else flat_grad.sum(0).to(bias.dtype)


class AutocastLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) computed in `dtype` (autocast's), keeping for backward the weight itself
    rather than its `dtype` copy, which backward makes again. Under autocast, autograd keeps each
    weight's low-precision copy from forward until that layer's backward: 7M parameters per layer of
    the base model, and the 32k x 768 MLM decoder, all held at the training step's peak memory. The
    copy costs one cast per weight in backward. Only for autocast with weights in another dtype, and only
    where a weight stays whole from forward to backward: not for parameters partitioned per module as ZeRO-3
    does, whose data is freed between the two (convert.py's autocast_linear=False)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x = x.to(dtype)
        ctx.save_for_backward(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_weight, grad_bias = linear_param_grads(grad, x, weight, bias)
        return grad @ weight.to(x.dtype), grad_weight, grad_bias, None


def autocast_dtype_for(weight: torch.Tensor, x: torch.Tensor):
    """The dtype AutocastLinear should compute in, or None where plain F.linear is as lean."""
    device = x.device.type
    if not (torch.is_grad_enabled() and weight.requires_grad and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype != dtype else None


def autocast_linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through AutocastLinear where autocast would keep a low-precision copy."""
    dtype = autocast_dtype_for(weight, x)
    if dtype is None:
        return F.linear(x, weight, bias)
    return AutocastLinear.apply(x, weight, bias, dtype)


def decode_logits(h, word_embeddings_weight, bias):
    """The tied MLM decoder h · word_embeddingsᵀ + bias (model/heads.py decode_logits) whose autocast copy of
    the word table (32k x 768 in bf16) is not kept for backward."""
    dtype = autocast_dtype_for(word_embeddings_weight, h)
    if dtype is None:
        return torch.matmul(h, word_embeddings_weight.t()) + bias
    return AutocastLinear.apply(h, word_embeddings_weight, None, dtype) + bias


class ActivationThenLinear(torch.autograd.Function):
    """linear(act(pre), weight, bias), keeping only `pre` for backward and computing act(pre) again
    there. Autograd would keep both pre (for act's backward) and act(pre) (for the weight's gradient):
    two [B, N, intermediate_size] tensors per layer, the largest a layer keeps after the attention
    probabilities. Backward pays one more activation."""

    @staticmethod
    def forward(ctx, pre, weight, bias, act):
        ctx.act = act
        ctx.save_for_backward(pre, weight, bias)
        return F.linear(act(pre), weight, bias)  # under autocast: the same casts as a Linear's

    @staticmethod
    def backward(ctx, grad):
        pre, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            pre_leaf = pre.detach().requires_grad_()
            activated = ctx.act(pre_leaf)
        grad = grad.to(activated.dtype)
        grad_weight, grad_bias = linear_param_grads(grad, activated.detach(), weight, bias)
        grad_activated = grad @ weight.to(grad.dtype)
        (grad_pre,) = torch.autograd.grad(activated, pre_leaf, grad_activated)
        return grad_pre, grad_weight, grad_bias, None


class FloatCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of logits [M, V] (any float dtype) against targets [M], computed in fp32 as
    F.cross_entropy(logits.float(), targets) is, without its [M, V] fp32 tensors: the float copy, the
    log-probabilities it keeps for backward, and backward's two. Forward keeps each row's log-sum-exp;
    both directions work `chunk` rows at a time. At masked positions with a 32k vocab those tensors come
    at the moment of the training step's peak memory (the whole forward's activations are still held)."""

    @staticmethod
    def forward(ctx, logits, targets, chunk=64):
        wide = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        lse = torch.empty(logits.shape[0], dtype=wide, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            lse[start:start + chunk] = torch.logsumexp(logits[start:start + chunk].to(wide), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).to(wide)
        ctx.chunk = chunk
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scale = grad.to(lse.dtype) / logits.shape[0]
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = (logits[rows].to(lse.dtype) - lse[rows, None]).exp_()  # softmax from the log-sum-exp; a new tensor
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1
            grad_logits[rows] = probs.mul_(scale)
        return grad_logits, None, None


def float_cross_entropy(logits, targets):
    """model/heads.py mean_cross_entropy (F.cross_entropy(logits.float(), targets)) through FloatCrossEntropy."""
    return FloatCrossEntropy.apply(logits, targets)
