"""Disentangled self-attention (DeBERTa paper §3.1, spec §1).

For query i and key j, with k = att_span and idx(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1):

    S[i, j] = ( Q_i·K_j  +  Q_i·Kr[idx(i,j)]  +  K_j·Qr[idx(i,j)] ) / sqrt(d_h · scale_factor)
                 c2c          c2p (content→position)   p2c (position→content)

Kr and Qr are the shared relative-embedding table projected by the same key/query projections
(share_att_key) or by their own (pos_key_proj / pos_query_proj). The p2c index uses i - j like c2p,
as the released code does (the paper writes j - i; the checkpoints were trained with the code).

How the terms are computed (both paths): q is divided by the scale once. For the square index of a
forward (a function of i - j only) the table row of every distance d in (-N, N) is projected, and for each
block of 128 query rows one matmul against the rows of the distances that block reads gives Q_i·Kr[idx(d)]
for its i and d; the [N, N] term is read from it as a strided view (`skew_view`, Transformer-XL's relative
shift) and added to the scores while the block is in cache (RelativeBias): no [B, H, N, N] index and no
gather, whose backward (a scatter-add) is slow. The content term q·kᵀ is then added by the matmul itself
(baddbmm into the relative sum). Other indices (the EMD's selected query rows) gather as the official
code does.

Two paths then compute the same attention: "reference" (eager: scores, masked softmax, dropout, @V, as
transformers and the official code do, with a backward that keeps fewer [B, H, N, N] tensors: see
SoftmaxDropoutMatmul) and "sdpa" (torch's scaled_dot_product_attention with c2p + p2c and the padding
mask as one additive mask: on CUDA the memory-efficient kernel then keeps no probabilities; on the CPU
a mask that needs a gradient takes SDPA's math path, which is no faster than "reference"; in bf16
inference on 2 cores SDPA was faster in a fresh process but slower once the allocator is warm).
"auto" (the default) takes "sdpa" on CUDA and "reference" elsewhere: a 1.5B training step at batch
16 x 512 on an H200 ran at 1.64x transformers' tokens/s with "sdpa" and 1.37x with "reference".
On CUDA the square relative bias comes from Triton kernels (model/relative_kernels.py) when triton
imports. A third path, "fused" (model/fused_attention.py), is flash attention with c2p, p2c and dropout
inside Triton kernels; opt-in until it is timed on a GPU, and auto's path where it cannot run.

Padded query rows: the mask is m_i·m_j, so a padded query row has every key masked. We fill masked
scores with the dtype's most negative value before softmax, which makes such a row attend uniformly
(transformers 5 does the same; the official code and transformers 4 output zeros there). Their
outputs are never used: padded keys are always masked and no loss reads padded positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model import fused_attention, relative_kernels
from model.init import Dropout, Linear, draw_keep, dropout_scale, generator_state, keep_as, repeat_draws


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


def attention_mask_4d(mask: torch.Tensor):
    """attention_mask_2d_to_4d's mask, or None when it allows every pair (a batch without padding, as
    packed pretraining batches are): the attention then fills nothing, in forward or backward. The check
    reads one bool on the host once per forward; on a GPU that waits for the work queued before it."""
    return None if bool(mask.all()) else attention_mask_2d_to_4d(mask)


def distance_index(rel_index: torch.Tensor) -> torch.Tensor:
    """The table row for each distance, from a square relative index that depends only on i - j (as
    relative_position_index does): entry m is the row for i - j = N-1-m, m in [0, 2N-1), and one more
    entry (any valid row) pads the length to 2N, which skew_view needs and never reads."""
    return torch.cat([rel_index[:, 0].flip(0), rel_index[0, 1:], rel_index[0, :1]])


def skew_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., R, n + R] contiguous -> [..., R, n] view with y[r, j] = x[r, R-1-r+j] (Transformer-XL's
    relative shift): in the flat buffer y[r, j] sits at (R-1) + r·(n+R-1) + j, so y is a window of x read
    with row stride n+R-1. Row r of x holds one query's terms by distance, shifted one column per row."""
    R, W = x.shape[-2], x.shape[-1]
    return x.flatten(-2)[..., R - 1: R - 1 + R * (W - 1)].unflatten(-1, (R, W - 1))[..., :n]


def zero_unread(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zeroes the entries of x that skew_view(x, n) does not read (in place): R-1 before the window,
    R-1 at the end of each of its rows, one after it."""
    R, W = x.shape[-2], x.shape[-1]
    flat = x.flatten(-2)
    flat[..., : R - 1].zero_()
    flat[..., R - 1: R - 1 + R * (W - 1)].unflatten(-1, (R, W - 1))[..., n:].zero_()
    flat[..., R - 1 + R * (W - 1):].zero_()
    return x


# Query rows per block of the relative products (below). Row i reads N of the 2N distances, so a block
# of R rows needs N + R of them: R = 128 at N = 512 does 62.5% of the unblocked product's work, and a
# block's product ([H, B·R, N+R]) is small enough to be added to the scores while still in cache.
RELATIVE_BLOCK = 128


def relative_blocks(x, block):
    """For each block of rows [i0, i0 + r) of x [B, H, N, d]: (i0, r, x's rows as [H, B·r, d], and the
    slice of table rows the block reads). A table [H, 2N, d] holds the row of each distance in
    distance_index's order: the block's rows read entries N-r-i0 ... 2N-1-i0 (N + r of them)."""
    B, H, N, d = x.shape
    for i0 in range(0, N, block):
        r = min(block, N - i0)
        yield i0, r, x[:, :, i0:i0 + r].transpose(0, 1).reshape(H, B * r, d), slice(N - r - i0, 2 * N - i0)


def relative_block_terms(x, table, block):
    """For each block of rows of x: (i0, r, the block's terms x_i·table[m(i - j)] as [B, H, r, N], a view)."""
    B, H, N, d = x.shape
    # transposed once: a slice of its columns is a matrix the matmul reads in place, where a transposed
    # slice of the table would be copied for every block
    table_t = table.transpose(1, 2).contiguous()
    for i0, r, rows, cols in relative_blocks(x, block):
        product = torch.bmm(rows, table_t[:, :, cols]).view(H, B, r, N + r)
        yield i0, r, skew_view(product, N).transpose(0, 1)


class RelativeBias(torch.autograd.Function):
    """c2p + p2c for a square index that depends on i - j only, as a new [B·H, N, N] tensor.

    c2p[i, j] = q_i·Kr[m(i - j)]: for a block of query rows, one matmul against the table rows of the
    distances the block reads, and the block's [r, N] terms read from it with skew_view (no gather, whose
    backward is a scatter-add). p2c[i, j] = k_j·Qr[m(i - j)] is the same with k's rows and the distances
    reversed (the caller passes the reversed table), which gives p2cᵀ: its blocks are written as rows of a
    temporary and transposed once (a transposed copy is fast, a transposed add is not). Saved for backward:
    q and k (which the content matmul saves anyway) and the two small tables; backward recomputes each
    block's rows of q or k and runs the same blocks."""

    @staticmethod
    def forward(ctx, q, k, c2p_table, p2c_table, block):
        B, H, N, d = q.shape
        ctx.block = block
        ctx.save_for_backward(q, k, c2p_table, p2c_table)
        bias = q.new_empty(B * H, N, N)  # a tensor of its own, not a view: the caller adds into it in place
        scores = bias.view(B, H, N, N)
        with torch.autocast(q.device.type, enabled=False):  # every input is in the compute dtype already
            if p2c_table is not None:
                # rows padded to N+32: transposing out of rows 2^k elements apart thrashes the cache (5.7 ms
                # against 3.4 ms per layer at N = 512, bf16)
                rows_first = q.new_empty(B, H, N, N + 32)[..., :N]
                for j0, r, term in relative_block_terms(k, p2c_table.to(k.dtype), block):
                    rows_first[:, :, j0:j0 + r].copy_(term)
                scores.copy_(rows_first.transpose(-1, -2))
                del rows_first
            if c2p_table is not None:
                for i0, r, term in relative_block_terms(q, c2p_table.to(q.dtype), block):
                    if p2c_table is None:
                        scores[:, :, i0:i0 + r].copy_(term)
                    else:
                        scores[:, :, i0:i0 + r].add_(term)
        return bias

    @staticmethod
    def backward(ctx, grad):
        q, k, c2p_table, p2c_table = ctx.saved_tensors
        B, H, N, d = q.shape
        grad = grad.reshape(B, H, N, N)
        grad_q = grad_k = grad_c2p = grad_p2c = None
        if c2p_table is not None:
            grad_q, grad_c2p = RelativeBias.block_grads(q, c2p_table, grad, ctx.block)
        if p2c_table is not None:
            grad_k, grad_p2c = RelativeBias.block_grads(k, p2c_table, grad.transpose(-1, -2).contiguous(), ctx.block)
        return grad_q, grad_k, grad_c2p, grad_p2c, None

    @staticmethod
    def block_grads(x, table, grad, block):
        """Gradients of x [B, H, N, d] and table [H, 2N, d] for the term whose rows are x's, given its
        gradient [B, H, N, N] (rows: x's rows). Each block's gradient is spread back to the product's
        layout (skew_view in reverse, zeros where the forward read nothing) and multiplied out."""
        B, H, N, d = x.shape
        grad_x = grad.new_empty(H, B, N, d)
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)  # blocks overlap
        rows_of = table.to(grad.dtype)
        for i0, r, rows, cols in relative_blocks(x.to(grad.dtype), block):
            grad_prod = zero_unread(grad.new_empty(H, B, r, N + r), N)
            skew_view(grad_prod, N).copy_(grad[:, :, i0:i0 + r].transpose(0, 1))
            grad_prod = grad_prod.view(H, B * r, N + r)
            grad_x[:, :, i0:i0 + r] = torch.bmm(grad_prod, rows_of[:, cols]).view(H, B, r, d)
            grad_table[:, cols] += torch.bmm(grad_prod.transpose(1, 2), rows)
        return grad_x.transpose(0, 1).to(x.dtype), grad_table.to(table.dtype)


class GatherLast(torch.autograd.Function):
    """torch.gather(x, -1, index) whose backward keeps only the index and x's shape. Autograd's gather
    keeps x itself: for the EMD's p2c that is a [B, H, N, 2k] product per step, never read in backward."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.save_for_backward(index)
        return torch.gather(x, -1, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype).scatter_add_(-1, index, grad.to(ctx.dtype)), None


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
        # autocast: fp32 [B, H, N, N] passes, casts back for P·V, and fp32 matmuls in this backward
        # (about 15% of a 1.5B training step on an H200). _softmax has no autocast rule on any device.
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
        mask4d: bool [B, 1, Nq, Nk], or None where every pair is allowed; rel_index: [Nq, Nk] or [B, Nq, Nk] rows of rel_embeddings [2k, D]."""
        q, k, v = self.project(hidden_states, query_states)
        q = q * (1.0 / self.scale)  # every term is divided by the scale: once here, on a small tensor
        relative = self.relative_attention and bool(self.pos_att_type)
        if relative:
            rel_embeddings = self.pos_dropout(rel_embeddings)[: 2 * self.att_span]
        impl = self.impl
        if impl == "fused":
            square = not relative or (rel_index.dim() == 2 and q.shape[2] == k.shape[2])
            if fused_attention.supported(q, square):
                tables = self.square_tables(rel_index, rel_embeddings) if relative else (None, None)
                context = fused_attention.FusedDisentangledAttention.apply(
                    q, k, v, *tables, mask4d, self.dropout_p if self.training else 0.0, RELATIVE_BLOCK)
                return context.transpose(-3, -2).flatten(-2)
        if impl not in ("reference", "sdpa"):  # auto, or fused where its kernels cannot run
            impl = "sdpa" if q.is_cuda else "reference"
        bias = self.relative_bias(q, k, rel_index, rel_embeddings) if relative else None
        if impl == "sdpa":
            context = self.sdpa(q, k, v, bias, mask4d)
        else:
            context = self.reference(content_scores(q, k, bias), v, mask4d)
        return context.transpose(-3, -2).flatten(-2)  # [B, Nq, H·d]

    def position_keys(self, rel_embeddings, which):
        """The relative table projected by the key (c2p) or query (p2c) projection: [H, 2k, d]."""
        if which == "c2p":
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
        else:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
        return self.heads(proj(rel_embeddings))

    def square_tables(self, rel_index, rel_embeddings):
        """For a square index (a function of i - j: relative_position_index), the projected table row of
        each distance ([H, 2N, d], distance_index's order) for c2p, and for p2c the same reversed (p2c
        reads i - j from j's side) and divided by the scale; None for a term that is off. RelativeBias's
        blocked products read them through skew_view."""
        by_distance = distance_index(rel_index)
        reverse = torch.cat([by_distance[:-1].flip(0), by_distance[-1:]])
        c2p_table = self.position_keys(rel_embeddings, "c2p")[..., by_distance, :] if "c2p" in self.pos_att_type else None
        p2c_table = (self.position_keys(rel_embeddings, "p2c")[..., reverse, :] * (1.0 / self.scale)
                     if "p2c" in self.pos_att_type else None)
        return c2p_table, p2c_table

    def relative_bias(self, q, k, rel_index, rel_embeddings):
        """c2p + p2c (divided by the scale: q already is) as one new contiguous [B·H, Nq, Nk] tensor."""
        B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        c2p, p2c = "c2p" in self.pos_att_type, "p2c" in self.pos_att_type
        if rel_index.dim() == 2 and Nq == Nk:
            function = relative_kernels.RelativeBiasTriton if relative_kernels.available(q) else RelativeBias
            return function.apply(q, k, *self.square_tables(rel_index, rel_embeddings), RELATIVE_BLOCK)
        # any other index (the EMD's selected query rows: [B, Nq, Nk]): gather from [B, H, N, 2k], as the
        # official code does. Each term is copied to [B·H, Nq, Nk] before the add (p2c's is transposed,
        # and adding a transposed view reads it element by element, several times slower than a copy).
        index = rel_index.expand(B, H, Nq, Nk) if rel_index.dim() == 2 else rel_index[:, None].expand(B, H, Nq, Nk)
        bias = None
        if c2p:
            c2p_all = torch.matmul(q, self.position_keys(rel_embeddings, "c2p").transpose(-1, -2))
            bias = GatherLast.apply(c2p_all, index).view(B * H, Nq, Nk)
            del c2p_all
        if p2c:
            pos_query = self.position_keys(rel_embeddings, "p2c") * (1.0 / self.scale)
            p2c_all = torch.matmul(k, pos_query.transpose(-1, -2))  # [B, H, Nk, 2k]: p2c[j, r] = K_j·Qr_r
            # out[i, j] = p2c[j, idx(i, j)]: gather along the table axis with the transposed index
            term = GatherLast.apply(p2c_all, index.transpose(-1, -2)).transpose(-1, -2).reshape(B * H, Nq, Nk)
            bias = term if bias is None else bias.add_(term)  # in place: no autograd node saved bias
        return bias

    def reference(self, scores, v, mask4d):  # scores: this forward's own tensor, filled in place
        return SoftmaxDropoutMatmul.apply(scores, mask4d, v, self.dropout_p if self.training else 0.0)

    def sdpa(self, q, k, v, bias, mask4d):
        """The bias and the mask as one additive mask; on CUDA the memory-efficient kernel then keeps
        no probabilities (it recomputes them in backward). On the CPU a mask that needs a gradient takes
        the math path, no faster than `reference`."""
        if bias is not None:
            additive = bias.view(*q.shape[:2], *bias.shape[1:]).to(q.dtype)  # in bf16 autocast bias is bf16 already
        elif mask4d is not None:
            additive = torch.zeros(mask4d.shape, dtype=q.dtype, device=q.device)
        else:
            additive = None  # nothing to add, nothing masked
        if mask4d is not None:  # in place: bias is relative_bias's own sum, which nothing else reads
            additive = additive.masked_fill_(~mask4d, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=1.0,
                                              dropout_p=self.dropout_p if self.training else 0.0)
