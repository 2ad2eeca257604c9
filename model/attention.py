"""Disentangled self-attention (DeBERTa paper §3.1, spec §1).

For query i and key j, with k = att_span and idx(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1):

    S[i, j] = ( Q_i·K_j  +  Q_i·Kr[idx(i,j)]  +  K_j·Qr[idx(i,j)] ) / sqrt(d_h · scale_factor)
                 c2c          c2p (content→position)   p2c (position→content)
    out_i   = Σ_j dropout(softmax_j(S[i, j] over the allowed keys)) · V_j

Kr and Qr are the shared relative-embedding table projected by the same key/query projections
(share_att_key) or by their own (pos_key_proj / pos_query_proj). The p2c index uses i - j like c2p,
as the released code does (the paper writes j - i; the checkpoints were trained with the code).

The module computes that formula term by term (`math_attention`): three projections, the c2p and p2c terms
gathered from [B, H, N, 2k] products, masked scores filled, softmax, nn.Dropout, P·V. It is the text to read
and the oracle the tests hold the fast paths against. The fast paths (`attention_impl` "eager", "sdpa",
"fused", "blockwise", "auto", with the three projections as one matmul) are applied from outside by
model/fast/convert.py, which swaps this module for a subclass that overrides `project` and `attend`.

Padded query rows: the mask is m_i·m_j, so a padded query row has every key masked. Masked scores are
filled with the dtype's most negative value before softmax, which makes such a row attend uniformly
(transformers 5 does the same; the official code and transformers 4 output zeros there). Their outputs
are never used: padded keys are always masked and no loss reads padded positions.
"""
import math

import torch
from torch import nn

from model.layers import Linear


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
    """[query_len, key_len] row of the relative-embedding table for each (i, j): clamp(bucket(i-j) + k).

    The row depends on i - j only: computed once per distance in (-key_len, query_len), then each query's
    row of the result is a window of that vector (the same values as evaluating the formula on the [N, N]
    differences, without its [N, N] temporaries: several GiB at N = 8192)."""
    rel = torch.arange(-(key_len - 1), query_len, dtype=torch.long, device=device)  # i - j, ascending
    if config.position_buckets > 0:
        rel = log_bucket_position(rel, config.position_buckets, config.max_relative)
    span = config.att_span
    rows = torch.clamp(rel + span, 0, 2 * span - 1)
    # out[i, j] = rows[i - j + key_len - 1]; reversed, that is entry query_len-1-i+j: row i is the window
    # of key_len entries from query_len-1-i, and the windows from the last row's upward are unfold's
    return rows.flip(0).unfold(0, key_len, 1).flip(0).contiguous()


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
        if self.relative_attention:
            self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = Linear(config.hidden_size, inner, std=std)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = Linear(config.hidden_size, inner, std=std)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)  # on the attention probabilities

    def forward(self, hidden_states, mask4d, rel_index=None, rel_embeddings=None, query_states=None):
        """hidden_states [B, Nk, D] give keys and values; query_states [B, Nq, D] (EMD) or None.
        mask4d: bool [B, 1, Nq, Nk], or None where every pair is allowed; rel_index: [Nq, Nk] or [B, Nq, Nk]
        rows of rel_embeddings [2k, D]."""
        q, k, v = self.project(hidden_states, query_states)
        q = q * (1.0 / self.scale)  # every term is divided by the scale: once here, on a small tensor
        if self.relative_attention and self.pos_att_type:
            rel_embeddings = self.pos_dropout(rel_embeddings)[: 2 * self.att_span]
        else:
            rel_embeddings = None
        context = self.attend(q, k, v, mask4d, rel_index, rel_embeddings)
        return context.transpose(-3, -2).flatten(-2)  # [B, Nq, H·d]

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H·d] -> [B, H, N, d]"""
        return x.view(*x.shape[:-1], self.num_heads, self.head_size).transpose(-3, -2)

    def project(self, hidden_states, query_states):
        """q (of the query input: query_states, or hidden_states), k and v (of hidden_states) as [B, H, N, d]."""
        query_input = hidden_states if query_states is None else query_states
        return (self.heads(self.query_proj(query_input)), self.heads(self.key_proj(hidden_states)),
                self.heads(self.value_proj(hidden_states)))

    def attend(self, q, k, v, mask4d, rel_index, rel_embeddings):
        """The context [B, H, Nq, d] (q already divided by the scale; rel_embeddings None: no relative terms)."""
        return math_attention(self, q, k, v, mask4d, rel_index, rel_embeddings)

    def position_keys(self, rel_embeddings, which):
        """The relative table projected by the key (c2p) or query (p2c) projection: [H, 2k, d]."""
        if which == "c2p":
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
        else:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
        return self.heads(proj(rel_embeddings))


def math_attention(attn, q, k, v, mask4d, rel_index, rel_embeddings):
    """The formula of the module docstring, term by term (q is already divided by the scale)."""
    scores = q @ k.transpose(-1, -2)  # c2c [B, H, Nq, Nk]
    if rel_embeddings is not None:
        B, H, Nq, Nk = scores.shape
        index = (rel_index if rel_index.dim() == 2 else rel_index[:, None]).expand(B, H, Nq, Nk)
        if "c2p" in attn.pos_att_type:  # c2p[i, j] = Q_i·Kr[idx(i, j)]
            c2p = q @ attn.position_keys(rel_embeddings, "c2p").transpose(-1, -2)  # [B, H, Nq, 2k]
            scores = scores + torch.gather(c2p, -1, index)
        if "p2c" in attn.pos_att_type:  # p2c[i, j] = K_j·Qr[idx(i, j)], over the scale like the rest
            p2c = k @ (attn.position_keys(rel_embeddings, "p2c") / attn.scale).transpose(-1, -2)  # [B, H, Nk, 2k]
            scores = scores + torch.gather(p2c, -1, index.transpose(-1, -2)).transpose(-1, -2)
    if mask4d is not None:
        scores = scores.masked_fill(~mask4d, torch.finfo(scores.dtype).min)
    probs = attn.dropout(torch.softmax(scores, dim=-1))
    return probs @ v
