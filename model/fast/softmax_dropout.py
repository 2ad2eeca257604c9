"""The attention's softmax, dropout and P·V in one autograd function that keeps fewer [B, H, N, N] tensors
for backward than autograd would, and the content scores added into the relative bias in place."""
import torch

from model.fast.dropout import draw_keep, dropout_scale, generator_state, keep_as, repeat_draws


class SoftmaxDropoutMatmul(torch.autograd.Function):
    """dropout(softmax(scores with ~mask filled with the dtype's minimum)) @ v, keeping for backward the
    probabilities, the attention mask, v and the random generator's state before the dropout draw.
    Autograd would also keep the dropped probabilities and the dropout mask, two more [B, H, N, N]
    tensors per layer; here backward draws the same mask again from the saved state (cheaper than
    storing it and reading it back, even as bits) and recomputes the dropped probabilities (one
    multiplication). The mask multiplies as 1.0 / 0.0 in the probabilities' dtype (keep_as), the dropout
    scale is applied to v and to the incoming gradient ([B, H, N, d]) instead of to [B, H, N, N]
    tensors, and softmax's backward runs in place in the gradient of the probabilities (on the CPU):
    backward holds two [B, H, N, N] tensors, not three.
    Dropout: each entry kept with probability 1 - p, scaled by 1 / (1 - p) (draw_keep, dropout_scale)."""

    @staticmethod
    def forward(ctx, scores, mask, v, p):
        # scores are filled in place: the caller's own sum, which no other autograd node saved (one
        # that did would raise in backward, as any in-place change does); backward masks the gradient.
        # mask None: every key of every row is allowed (no padding in the batch), nothing to fill.
        if mask is not None:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        # The probabilities in the scores' dtype (the kernel sums in fp32 for bf16/fp16 inputs), as
        # flash attention keeps them for its P·V product. torch.softmax would be cast to fp32 by CUDA's
        # autocast: fp32 [B, H, N, N] passes, casts back for P·V, and fp32 matmuls in this backward.
        # _softmax has no autocast rule on any device.
        # On the CPU it also runs in place (bitwise equal, tested): a new [B, H, N, N] tensor costs
        # more than the softmax itself there, its pages faulted in on first touch.
        out = scores if scores.device.type == "cpu" and scores.is_contiguous() else None
        probs = torch._softmax(scores, -1, False, out=out) if out is not None else torch._softmax(scores, -1, False)
        ctx.v_dtype, ctx.p = v.dtype, p
        v = v.to(probs.dtype)  # under autocast the probabilities may be bf16 while v is not
        ctx.save_for_backward(probs, mask, v)
        if p == 0:
            return torch.matmul(probs, v)
        ctx.rng_state = generator_state(probs.device)
        keep = keep_as(draw_keep(probs.shape, p, probs.device), probs.dtype)
        return torch.matmul(probs.mul(keep), v * dropout_scale(p)[1])

    @staticmethod
    def backward(ctx, grad):
        probs, mask, v = ctx.saved_tensors
        grad = grad.to(probs.dtype)
        keep = None
        if ctx.p:  # the forward's mask, drawn again
            generator = repeat_draws(probs.device, ctx.rng_state)
            keep = keep_as(draw_keep(probs.shape, ctx.p, probs.device, generator), probs.dtype)
            grad = grad * dropout_scale(ctx.p)[1]
        dropped = probs if keep is None else probs.mul(keep)
        grad_v = torch.matmul(dropped.transpose(-1, -2), grad).to(ctx.v_dtype)
        del dropped
        grad_scores = torch.matmul(grad, v.transpose(-1, -2))  # the gradient of the probabilities
        if keep is not None:
            grad_scores.mul_(keep)
        del keep
        # softmax's backward (what autograd calls), probs · (g - Σ g·probs); on the CPU in place (the
        # kernel reads each row before writing it: bitwise equal to the out-of-place call, tested)
        out = grad_scores if grad_scores.device.type == "cpu" else None
        grad_scores = torch._softmax_backward_data(grad_scores, probs, -1, probs.dtype, grad_input=out)
        if mask is not None:
            grad_scores.masked_fill_(~mask, 0)  # masked_fill's backward
        return grad_scores, None, grad_v, None


def content_scores(q, k, bias=None):
    """q·kᵀ [B, H, Nq, Nk], plus bias ([B·H, Nq, Nk], relative_bias's own tensor) when given: the matmul
    adds into the bias in place (baddbmm's β·C), so neither a pass over [B, H, N, N] for the add nor a
    new tensor of that size (on the CPU a fresh one costs as much as the add: its pages are faulted in)."""
    if bias is None:
        return torch.matmul(q, k.transpose(-1, -2))
    B, H, Nq, d = q.shape
    scores = bias.baddbmm_(q.reshape(B * H, Nq, d), k.reshape(B * H, -1, d).transpose(1, 2))
    return scores.view(B, H, Nq, -1)
