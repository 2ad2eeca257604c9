"""Disentangled self-attention (DeBERTa paper §3.1, spec §1).

For query i and key j, with k = att_span and idx(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1):

    S[i, j] = ( Q_i·K_j  +  Q_i·Kr[idx(i,j)]  +  K_j·Qr[idx(i,j)] ) / sqrt(d_h · scale_factor)
                 c2c          c2p (content→position)   p2c (position→content)

Kr and Qr are the shared relative-embedding table projected by the same key/query projections
(share_att_key) or by their own (pos_key_proj / pos_query_proj). The p2c index uses i - j like c2p,
as the released code does (the paper writes j - i; the checkpoints were trained with the code).

How the terms are computed (both paths): q is divided by the scale once. For the square index of a
forward (a function of i - j only) the table row of every distance d in (-N, N) is projected, one
[N, 2N] matmul per term gives Q_i·Kr[idx(d)] for all i and d, and the [N, N] term is read from it as
a strided view (`skew`, Transformer-XL's relative shift): no [B, H, N, N] index and no gather, whose
backward (a scatter-add) is slow. Other indices (the EMD's selected query rows) gather as the
official code does.

Two paths then compute the same attention: "reference" (eager: scores, masked softmax, dropout, @V, as
transformers and the official code do, with a backward that keeps fewer [B, H, N, N] tensors: see
SoftmaxDropoutMatmul) and "sdpa" (torch's scaled_dot_product_attention with c2p + p2c and the padding
mask as one additive mask: on CUDA the memory-efficient kernel then keeps no probabilities; on the CPU
a mask that needs a gradient takes SDPA's math path, which is no faster than "reference"; in bf16
inference on 2 cores SDPA was faster in a fresh process but slower once the allocator is warm).

Padded query rows: the mask is m_i·m_j, so a padded query row has every key masked. We fill masked
scores with the dtype's most negative value before softmax, which makes such a row attend uniformly
(transformers 5 does the same; the official code and transformers 4 output zeros there). Their
outputs are never used: padded keys are always masked and no loss reads padded positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.init import Dropout, Linear, dropout_keep_mask


def log_bucket_position(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Log buckets: distances up to bucket_size/2 stay exact, longer ones share log-spaced buckets.

    Evaluated without clamping |r| first (as transformers does); the official code clamps |r| to
    max_position-1 first, which differs only for |i - j| >= max_position (inputs longer than 512).
    """
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid),
                          torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    # fp32 log, as the checkpoints were trained with; the denominator as an fp32 tensor, as transformers
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign).long()


def relative_position_index(query_len: int, key_len: int, config, device=None) -> torch.Tensor:
    """[query_len, key_len] row of the relative-embedding table for each (i, j): clamp(bucket(i-j) + k)."""
    q = torch.arange(query_len, dtype=torch.long, device=device)
    k = torch.arange(key_len, dtype=torch.long, device=device)
    rel = q[:, None] - k[None, :]
    if config.position_buckets > 0:
        rel = log_bucket_position(rel, config.position_buckets, config.max_relative)
    span = config.att_span
    return torch.clamp(rel + span, 0, 2 * span - 1)


def attention_mask_2d_to_4d(mask: torch.Tensor) -> torch.Tensor:
    """[B, N] token mask (or [B, N, N] pair mask) -> bool [B, 1, N, N] with M[b,i,j] = m_i·m_j."""
    if mask.dim() == 2:
        m = mask.bool()
        return (m[:, None, :, None] & m[:, None, None, :])
    if mask.dim() == 3:
        return mask.bool().unsqueeze(1)
    if mask.dim() == 4:
        return mask.bool()
    raise ValueError(f"attention mask must have 2, 3 or 4 dimensions, got shape {tuple(mask.shape)}")


def distance_index(rel_index: torch.Tensor) -> torch.Tensor:
    """The table row for each distance, from a square relative index that depends only on i - j (as
    relative_position_index does): entry m is the row for i - j = N-1-m, m in [0, 2N-1), and one more
    entry (any valid row) pads the length to 2N, which skew_view needs and never reads."""
    return torch.cat([rel_index[:, 0].flip(0), rel_index[0, 1:], rel_index[0, :1]])


def skew_view(x: torch.Tensor) -> torch.Tensor:
    """[..., N, 2N] contiguous, x[i, m] the term for distance i - j = N-1-m  ->  [..., N, N] view with
    y[i, j] = x[i, N-1-i+j] (Transformer-XL's relative shift): in the flat buffer y[i, j] sits at
    (N-1) + i·(2N-1) + j, so y is a window of x read with row stride 2N-1."""
    n = x.shape[-2]
    return x.flatten(-2)[..., n - 1: n - 1 + n * (2 * n - 1)].unflatten(-1, (n, 2 * n - 1))[..., :n]


class Skew(torch.autograd.Function):
    """skew_view with a lean backward: autograd's own (two slices) would zero-fill the [N, 2N] gradient
    twice and copy into it twice; here one strided copy, and zeros only where no (i, j) reads."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return skew_view(x)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_empty(ctx.shape)
        skew_view(grad_x).copy_(grad)
        n = ctx.shape[-2]
        flat = grad_x.flatten(-2)
        flat[..., : n - 1].zero_()
        flat[..., n - 1: n - 1 + n * (2 * n - 1)].unflatten(-1, (n, 2 * n - 1))[..., n:].zero_()
        flat[..., n - 1 + n * (2 * n - 1):].zero_()
        return grad_x


class SoftmaxDropoutMatmul(torch.autograd.Function):
    """dropout(softmax(scores with ~mask filled with the dtype's minimum)) @ v, keeping for backward the
    probabilities, the dropout mask (bool), the attention mask and v. Autograd would also keep the
    dropped probabilities, one more [B, H, N, N] per layer; here they are recomputed in backward (one
    multiplication). The dropout scale is applied to v and to the incoming gradient ([B, H, N, d])
    instead of to [B, H, N, N] tensors, and softmax's backward and the mask's run in place in the
    gradient of the probabilities (on the CPU): backward holds two [B, H, N, N] tensors, not three.
    Dropout: each entry kept with probability 1 - p, scaled by 1 / (1 - p) (dropout_keep_mask)."""

    @staticmethod
    def forward(ctx, scores, mask, v, p):
        # scores are filled in place: the caller's own sum, which no other autograd node saved (one
        # that did would raise in backward, as any in-place change does); backward masks the gradient
        probs = torch.softmax(scores.masked_fill_(~mask, torch.finfo(scores.dtype).min), dim=-1)
        ctx.v_dtype = v.dtype
        v = v.to(probs.dtype)  # under autocast the probabilities may be bf16 while v is not
        keep, ctx.scale = None, 1.0
        if p > 0:
            keep, ctx.scale = dropout_keep_mask(probs.shape, p, probs.device)
        ctx.save_for_backward(probs, keep, mask, v)
        if keep is None:
            return torch.matmul(probs, v)
        return torch.matmul(torch.mul(probs, keep), v * ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        probs, keep, mask, v = ctx.saved_tensors
        grad = grad.to(probs.dtype)
        if keep is not None:
            grad = grad * ctx.scale
        dropped = probs if keep is None else torch.mul(probs, keep)
        grad_v = torch.matmul(dropped.transpose(-1, -2), grad).to(ctx.v_dtype)
        del dropped
        grad_scores = torch.matmul(grad, v.transpose(-1, -2))  # the gradient of the probabilities
        if keep is not None:
            grad_scores.mul_(keep)
        # softmax's backward (what autograd calls), probs · (g - Σ g·probs); on the CPU in place (the
        # kernel reads each row before writing it: bitwise equal to the out-of-place call, tested)
        out = grad_scores if grad_scores.device.type == "cpu" else None
        grad_scores = torch._softmax_backward_data(grad_scores, probs, -1, probs.dtype, grad_input=out)
        grad_scores.masked_fill_(~mask, 0)  # masked_fill's backward
        return grad_scores, None, grad_v, None


class DisentangledSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        inner = self.num_heads * self.head_size
        std = config.initializer_range
        self.query_proj = Linear(config.hidden_size, inner, std=std)
        self.key_proj = Linear(config.hidden_size, inner, std=std)
        self.value_proj = Linear(config.hidden_size, inner, std=std)
        self.relative_attention = config.relative_attention
        self.pos_att_type = list(config.pos_att_type)
        self.share_att_key = config.share_att_key
        self.att_span = config.att_span
        self.scale = math.sqrt(self.head_size * config.scale_factor)
        self.impl = config.attention_impl
        if self.relative_attention:
            self.pos_dropout = Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = Linear(config.hidden_size, inner, std=std)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = Linear(config.hidden_size, inner, std=std)
        self.dropout_p = config.attention_probs_dropout_prob

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H·d] -> [B, H, N, d]"""
        return x.view(*x.shape[:-1], self.num_heads, self.head_size).transpose(-3, -2)

    def project(self, hidden_states, query_states):
        """q, k, v as [B, H, N, d]. One matmul on the concatenated weights where the inputs are shared
        (the parameters stay three modules, as the release format names them). Under ZeRO-3 a
        parameter is only gathered when its own module runs, so partitioned weights go module by module."""
        projs = (self.query_proj, self.key_proj, self.value_proj)
        if any(hasattr(p.weight, "ds_id") for p in projs):
            query_input = hidden_states if query_states is None else query_states
            return tuple(self.heads(proj(x)) for proj, x in zip(projs, (query_input, hidden_states, hidden_states)))
        fused = projs if query_states is None else projs[1:]
        out = F.linear(hidden_states, torch.cat([p.weight for p in fused]), torch.cat([p.bias for p in fused]))
        parts = [self.heads(t) for t in out.chunk(len(fused), dim=-1)]
        if query_states is not None:
            parts.insert(0, self.heads(self.query_proj(query_states)))
        return tuple(parts)

    def forward(self, hidden_states, mask4d, rel_index=None, rel_embeddings=None, query_states=None):
        """hidden_states [B, Nk, D] give keys and values; query_states [B, Nq, D] (EMD) or None.
        mask4d: bool [B, 1, Nq, Nk]; rel_index: [Nq, Nk] or [B, Nq, Nk] rows of rel_embeddings [2k, D]."""
        q, k, v = self.project(hidden_states, query_states)
        q = q * (1.0 / self.scale)  # every term is divided by the scale: once here, on a small tensor
        relative = self.relative_attention and bool(self.pos_att_type)
        if relative:
            rel_embeddings = self.pos_dropout(rel_embeddings)[: 2 * self.att_span]
        if self.impl == "sdpa":
            bias = self.add_relative(None, q, k, rel_index, rel_embeddings) if relative else None
            context = self.sdpa(q, k, v, bias, mask4d)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            if relative:
                scores = self.add_relative(scores, q, k, rel_index, rel_embeddings)
            context = self.reference(scores, v, mask4d)
        return context.transpose(-3, -2).flatten(-2)  # [B, Nq, H·d]

    def position_keys(self, rel_embeddings, which):
        """The relative table projected by the key (c2p) or query (p2c) projection: [H, 2k, d]."""
        if which == "c2p":
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
        else:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
        return self.heads(proj(rel_embeddings))

    def add_relative(self, total, q, k, rel_index, rel_embeddings):
        """total + c2p + p2c (divided by the scale: q already is), [B, H, Nq, Nk]; total None: c2p + p2c.
        The terms are added one at a time, in place, so that one [N, 2N] product exists at a time."""
        for term in self.relative_terms(q, k, rel_index, rel_embeddings):
            if total is None:
                total = term.clone(memory_format=torch.contiguous_format)
            else:
                total += term  # in place: neither the matmul before nor this add needs total for backward
            del term
        return total

    def relative_terms(self, q, k, rel_index, rel_embeddings):
        """Yields c2p and/or p2c, each [B, H, Nq, Nk]."""
        Nq, Nk = q.shape[-2], k.shape[-2]
        if rel_index.dim() == 2 and Nq == Nk:
            # A square index is a function of i - j (relative_position_index): project the table row of
            # each distance, one [N, 2N] matmul per term, and read the [N, N] terms as views (skew)
            # instead of gathering them from [B, H, N, 2k] with a [B, H, N, N] index.
            # The matmuls run per head over all B·N rows ([H, B·N, d] @ [H, d, 2N]): no broadcasting of
            # the table over the batch, whose backward would copy it B times and sum the copies.
            B, H, N, d = q.shape
            by_distance = distance_index(rel_index)

            def per_distance(x, table):  # x [B, H, N, d], table [H, 2N, d] -> [B, H, N, N] (a view)
                rows = torch.matmul(x.transpose(0, 1).reshape(H, B * N, d), table.transpose(-1, -2))
                return Skew.apply(rows.view(H, B, N, 2 * N)).transpose(0, 1)

            if "c2p" in self.pos_att_type:
                yield per_distance(q, self.position_keys(rel_embeddings, "c2p")[..., by_distance, :])
            if "p2c" in self.pos_att_type:
                # p2c[i, j] = K_j·Qr[idx(i - j)]: the same skew with rows j and the distances reversed
                reverse = torch.cat([by_distance[:-1].flip(0), by_distance[-1:]])
                pos_query = self.position_keys(rel_embeddings, "p2c")[..., reverse, :] * (1.0 / self.scale)
                yield per_distance(k, pos_query).transpose(-1, -2)
            return
        # any other index (the EMD's selected query rows: [B, Nq, Nk]): gather from [B, H, N, 2k]
        B, H = q.shape[:2]
        index = rel_index.expand(B, H, Nq, Nk) if rel_index.dim() == 2 else rel_index[:, None].expand(B, H, Nq, Nk)
        if "c2p" in self.pos_att_type:
            yield torch.gather(torch.matmul(q, self.position_keys(rel_embeddings, "c2p").transpose(-1, -2)), -1, index)
        if "p2c" in self.pos_att_type:
            pos_query = self.position_keys(rel_embeddings, "p2c") * (1.0 / self.scale)
            p2c = torch.matmul(k, pos_query.transpose(-1, -2))  # [B, H, Nk, 2k]: p2c[j, r] = K_j·Qr_r
            # out[i, j] = p2c[j, idx(i, j)]: gather along the table axis with the transposed index
            yield torch.gather(p2c, -1, index.transpose(-1, -2)).transpose(-1, -2)

    def reference(self, scores, v, mask4d):  # scores: this forward's own tensor, filled in place
        return SoftmaxDropoutMatmul.apply(scores, mask4d, v, self.dropout_p if self.training else 0.0)

    def sdpa(self, q, k, v, bias, mask4d):
        """The bias and the mask as one additive mask; on CUDA the memory-efficient kernel then keeps
        no probabilities (it recomputes them in backward). On the CPU a mask that needs a gradient takes
        the math path, no faster than `reference`."""
        if bias is None:
            additive = torch.zeros(mask4d.shape, dtype=q.dtype, device=q.device)
        else:
            additive = bias.to(q.dtype)  # in bf16 autocast bias is bf16 already
        # in place: bias is add_relative's own sum, which nothing else reads
        additive = additive.masked_fill_(~mask4d, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=1.0,
                                              dropout_p=self.dropout_p if self.training else 0.0)
