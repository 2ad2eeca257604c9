"""Disentangled self-attention (DeBERTa paper §3.1, spec §1).

For query i and key j, with k = att_span and idx(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1):

    S[i, j] = ( Q_i·K_j  +  Q_i·Kr[idx(i,j)]  +  K_j·Qr[idx(i,j)] ) / sqrt(d_h · scale_factor)
                 c2c          c2p (content→position)   p2c (position→content)
    out_i   = Σ_j dropout(softmax_j(S[i, j] over the allowed keys)) · V_j

Kr and Qr are the shared relative-embedding table projected by the same key/query projections
(share_att_key) or by their own (pos_key_proj / pos_query_proj). The p2c index uses i - j like c2p,
as the released code does (the paper writes j - i; the checkpoints were trained with the code).

`math_attention` below is that formula term by term: it gathers the c2p and p2c terms from [B, H, N, 2k]
products, fills masked scores, applies softmax and nn.Dropout. It is what `attention_impl: "math"` runs and
the oracle the tests hold the fast paths against (model/fast/attention_paths.py: "eager", "sdpa", "fused";
"auto" is sdpa where CUDA is and eager elsewhere). The path is chosen once, when the module is built.

Padded query rows: the mask is m_i·m_j, so a padded query row has every key masked. Masked scores are
filled with the dtype's most negative value before softmax, which makes such a row attend uniformly
(transformers 5 does the same; the official code and transformers 4 output zeros there). Their outputs
are never used: padded keys are always masked and no loss reads padded positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.fast.attention_paths import fast_path
from model.layers import Dropout, Linear


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
            self.pos_dropout = Dropout(config.hidden_dropout_prob)
            if not self.share_att_key:
                if "c2p" in self.pos_att_type:
                    self.pos_key_proj = Linear(config.hidden_size, inner, std=std)
                if "p2c" in self.pos_att_type:
                    self.pos_query_proj = Linear(config.hidden_size, inner, std=std)
        self.dropout_p = config.attention_probs_dropout_prob
        if config.attention_impl == "math":
            self.attend, self.dropout = math_attention, nn.Dropout(self.dropout_p)
        else:
            self.attend = fast_path(config.attention_impl)

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
        mask4d: bool [B, 1, Nq, Nk], or None where every pair is allowed; rel_index: [Nq, Nk] or [B, Nq, Nk]
        rows of rel_embeddings [2k, D]."""
        q, k, v = self.project(hidden_states, query_states)
        q = q * (1.0 / self.scale)  # every term is divided by the scale: once here, on a small tensor
        if self.relative_attention and self.pos_att_type:
            rel_embeddings = self.pos_dropout(rel_embeddings)[: 2 * self.att_span]
        else:
            rel_embeddings = None
        context = self.attend(self, q, k, v, mask4d, rel_index, rel_embeddings)
        return context.transpose(-3, -2).flatten(-2)  # [B, Nq, H·d]

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
