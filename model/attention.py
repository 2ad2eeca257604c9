"""Disentangled self-attention (DeBERTa paper §3.1, spec §1).

For query i and key j, with k = att_span and idx(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1):

    S[i, j] = ( Q_i·K_j  +  Q_i·Kr[idx(i,j)]  +  K_j·Qr[idx(i,j)] ) / sqrt(d_h · scale_factor)
                 c2c          c2p (content→position)   p2c (position→content)

Kr and Qr are the shared relative-embedding table projected by the same key/query projections
(share_att_key) or by their own (pos_key_proj / pos_query_proj). The p2c index uses i - j like c2p,
as the released code does (the paper writes j - i; the checkpoints were trained with the code).

Two paths compute the same attention: "reference" (eager: scores, masked softmax, dropout, @V; what
transformers and the official code do) and "sdpa" (torch's scaled_dot_product_attention with the
c2p + p2c terms and the padding mask as one additive bias, so the softmax/dropout/probabilities are
never materialised by us).

Padded query rows: the mask is m_i·m_j, so a padded query row has every key masked. We fill masked
scores with the dtype's most negative value before softmax, which makes such a row attend uniformly
(transformers 5 does the same; the official code and transformers 4 output zeros there). Their
outputs are never used: padded keys are always masked and no loss reads padded positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.init import Linear


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
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = Linear(config.hidden_size, inner, std=std)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = Linear(config.hidden_size, inner, std=std)
        self.dropout_p = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(self.dropout_p)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H·d] -> [B, H, N, d]"""
        return x.view(*x.shape[:-1], self.num_heads, self.head_size).transpose(-3, -2)

    def forward(self, hidden_states, mask4d, rel_index=None, rel_embeddings=None, query_states=None):
        """hidden_states [B, Nk, D] give keys and values; query_states [B, Nq, D] (EMD) or None.
        mask4d: bool [B, 1, Nq, Nk]; rel_index: [Nq, Nk] or [B, Nq, Nk] rows of rel_embeddings [2k, D]."""
        query_input = hidden_states if query_states is None else query_states
        q = self.heads(self.query_proj(query_input))
        k = self.heads(self.key_proj(hidden_states))
        v = self.heads(self.value_proj(hidden_states))
        bias = None
        if self.relative_attention and self.pos_att_type:
            bias = self.relative_bias(q, k, rel_index, self.pos_dropout(rel_embeddings))
        if self.impl == "sdpa":
            context = self.sdpa(q, k, v, bias, mask4d)
        else:
            context = self.reference(q, k, v, bias, mask4d)
        return context.transpose(-3, -2).flatten(-2)  # [B, Nq, H·d]

    def relative_bias(self, q, k, rel_index, rel_embeddings):
        """c2p + p2c, already divided by the scale: [B, H, Nq, Nk]."""
        rel_embeddings = rel_embeddings[: 2 * self.att_span]
        B, H, Nq, _ = q.shape
        Nk = k.shape[-2]
        index = rel_index.expand(B, H, Nq, Nk) if rel_index.dim() == 2 else rel_index[:, None].expand(B, H, Nq, Nk)
        bias = 0
        if "c2p" in self.pos_att_type:
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
            pos_key = self.heads(proj(rel_embeddings))  # [H, 2k, d]
            c2p = torch.matmul(q, pos_key.transpose(-1, -2))  # [B, H, Nq, 2k]
            bias = bias + torch.gather(c2p, -1, index) / self.scale
        if "p2c" in self.pos_att_type:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
            pos_query = self.heads(proj(rel_embeddings))  # [H, 2k, d]
            p2c = torch.matmul(k, pos_query.transpose(-1, -2))  # [B, H, Nk, 2k]: p2c[j, r] = K_j·Qr_r
            # out[i, j] = p2c[j, idx(i, j)]: gather along the bucket axis with the transposed index
            bias = bias + torch.gather(p2c, -1, index.transpose(-1, -2)).transpose(-1, -2) / self.scale
        return bias

    def reference(self, q, k, v, bias, mask4d):
        scores = torch.matmul(q, k.transpose(-1, -2) / torch.tensor(self.scale, dtype=q.dtype))
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~mask4d, torch.finfo(scores.dtype).min)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        return torch.matmul(probs, v)

    def sdpa(self, q, k, v, bias, mask4d):
        additive = torch.zeros(mask4d.shape, dtype=q.dtype, device=q.device)
        additive = additive.masked_fill(~mask4d, torch.finfo(q.dtype).min)
        if bias is not None:
            additive = (bias + additive).masked_fill(~mask4d, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=1.0 / self.scale,
                                              dropout_p=self.dropout_p if self.training else 0.0)
