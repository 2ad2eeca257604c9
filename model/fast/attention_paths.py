"""The fast implementations of disentangled attention, each the same function of its inputs as the plain
`math` path in model/attention.py (which the tests hold every one of them against):

  eager  c2p + p2c as one [B·H, N, N] bias from blocked products (relative_bias.py; Triton kernels on CUDA),
         q·kᵀ added into it by the matmul itself, then softmax, dropout and P·V in one autograd function
         that keeps fewer [B, H, N, N] tensors (softmax_dropout.py)
  sdpa   the same bias plus the padding mask as one additive mask to torch's scaled_dot_product_attention:
         on CUDA its memory-efficient kernel keeps no probabilities (it recomputes them in backward); on the
         CPU a mask that needs a gradient takes SDPA's math path
  fused  flash attention with c2p, p2c and dropout inside Triton kernels (fused_attention.py): no
         [B, H, N, N] tensor in forward. Where its kernels cannot take an attention (no CUDA and no
         TRITON_INTERPRET, a head size that is not a power of two, the EMD's selected query rows, which are
         not a square index) it runs the path `auto` gives.
  blockwise  flash attention's online softmax over blocks of keys in PyTorch, for the CPU (blockwise.py): no
         [B, H, N, N] tensor in forward or backward, memory linear in N; slower than eager at short lengths.
  auto   sdpa where CUDA is; on the CPU eager below BLOCKWISE_FROM keys and blockwise from there, decided
         per call.

Every path takes (attention module, q, k, v, mask4d, rel_index, rel_embeddings) with q already divided by
the scale and rel_embeddings None when the layer has no relative terms, and returns the context [B, H, Nq, d].
convert.py sets a module's path (FastAttention.path). Triton is imported only where its kernels may run: by
`fused` when chosen, and by relative_bias.py on CUDA (or under TRITON_INTERPRET).
"""
import torch
import torch.nn.functional as F

from model.fast.blockwise import blockwise
from model.fast.relative_bias import RELATIVE_BLOCK, GatherLast, distance_index, relative_bias_function
from model.fast.softmax_dropout import SoftmaxDropoutMatmul, content_scores


def square_tables(attn, rel_index, rel_embeddings):
    """For a square index (a function of i - j), the projected table row of each distance ([H, 2N, d],
    distance_index's order) for c2p, and for p2c the same reversed (p2c reads i - j from j's side) and
    divided by the scale; None for a term that is off. The blocked products read them along their skew."""
    by_distance = distance_index(rel_index)
    reverse = torch.cat([by_distance[:-1].flip(0), by_distance[-1:]])
    c2p_table = attn.position_keys(rel_embeddings, "c2p")[..., by_distance, :] if "c2p" in attn.pos_att_type else None
    p2c_table = (attn.position_keys(rel_embeddings, "p2c")[..., reverse, :] * (1.0 / attn.scale)
                 if "p2c" in attn.pos_att_type else None)
    return c2p_table, p2c_table


def relative_bias(attn, q, k, rel_index, rel_embeddings):
    """c2p + p2c (divided by the scale: q already is) as one new contiguous [B·H, Nq, Nk] tensor."""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if rel_index.dim() == 2 and Nq == Nk:
        return relative_bias_function(q).apply(q, k, *square_tables(attn, rel_index, rel_embeddings), RELATIVE_BLOCK)
    # any other index (the EMD's selected query rows: [B, Nq, Nk]): gather from [B, H, N, 2k], as the
    # official code does. Each term is copied to [B·H, Nq, Nk] before the add (p2c's is transposed,
    # and adding a transposed view reads it element by element, several times slower than a copy).
    index = rel_index.expand(B, H, Nq, Nk) if rel_index.dim() == 2 else rel_index[:, None].expand(B, H, Nq, Nk)
    bias = None
    if "c2p" in attn.pos_att_type:
        c2p_all = torch.matmul(q, attn.position_keys(rel_embeddings, "c2p").transpose(-1, -2))
        bias = GatherLast.apply(c2p_all, index).view(B * H, Nq, Nk)
        del c2p_all
    if "p2c" in attn.pos_att_type:
        pos_query = attn.position_keys(rel_embeddings, "p2c") * (1.0 / attn.scale)
        p2c_all = torch.matmul(k, pos_query.transpose(-1, -2))  # [B, H, Nk, 2k]: p2c[j, r] = K_j·Qr_r
        # out[i, j] = p2c[j, idx(i, j)]: gather along the table axis with the transposed index
        term = GatherLast.apply(p2c_all, index.transpose(-1, -2)).transpose(-1, -2).reshape(B * H, Nq, Nk)
        bias = term if bias is None else bias.add_(term)  # in place: no autograd node saved bias
    return bias


def eager(attn, q, k, v, mask4d, rel_index, rel_embeddings):
    bias = None if rel_embeddings is None else relative_bias(attn, q, k, rel_index, rel_embeddings)
    # the scores are this forward's own tensor, filled in place by SoftmaxDropoutMatmul
    return SoftmaxDropoutMatmul.apply(content_scores(q, k, bias), mask4d, v, attn.dropout_p if attn.training else 0.0)


def sdpa(attn, q, k, v, mask4d, rel_index, rel_embeddings):
    bias = None if rel_embeddings is None else relative_bias(attn, q, k, rel_index, rel_embeddings)
    if bias is not None:
        additive = bias.view(*q.shape[:2], *bias.shape[1:]).to(q.dtype)  # in bf16 autocast bias is bf16 already
    elif mask4d is not None:
        additive = torch.zeros(mask4d.shape, dtype=q.dtype, device=q.device)
    else:
        additive = None  # nothing to add, nothing masked
    if mask4d is not None:  # in place: the bias is relative_bias's own sum, which nothing else reads
        additive = additive.masked_fill_(~mask4d, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=1.0,
                                          dropout_p=attn.dropout_p if attn.training else 0.0)


# The key length from which `auto` takes blockwise on the CPU: the shortest at which blockwise is no slower
# than eager, and from which eager's memory quadruples per doubling. `python -m bench.long_attention
# --threads 1` (one layer, 4 heads of 64, forward + backward; two runs on 2 shared cores, times varying by up
# to ±50% run to run), eager / blockwise seconds: 512: 0.06 / 0.10, 0.11 / 0.07; 1024: 0.18 / 0.27, 0.19 / 0.21;
# 2048: 1.54 / 0.85, 0.90 / 0.92; 4096: 4.36 / 4.93, 3.87 / 2.78; 8192: 25.6 / 20.4, 13.2 / 10.7. Peak memory
# (the second run) 0.25, 0.70, 2.35 GiB for eager at 2048, 4096, 8192; 0.14, 0.22, 0.42 GiB for blockwise.
BLOCKWISE_FROM = 2048


def cpu_auto(attn, q, k, v, mask4d, rel_index, rel_embeddings):
    """`auto` on the CPU: eager for sequences shorter than BLOCKWISE_FROM keys, blockwise from there. Decided by
    the key length, the sequence's: the EMD's few selected query rows take the path of the encoder's layers."""
    path = blockwise if k.shape[2] >= BLOCKWISE_FROM else eager
    return path(attn, q, k, v, mask4d, rel_index, rel_embeddings)


def auto_path():
    """`auto`: sdpa where CUDA is, cpu_auto elsewhere (decided when the module is built)."""
    return sdpa if torch.cuda.is_available() else cpu_auto


class Fused:
    """The fused kernels where they take the attention, `auto`'s path elsewhere."""

    def __init__(self):
        from model.fast import fused_attention  # noqa: F401  imports triton (when installed): where fused is chosen
        self.fallback = auto_path()

    def __call__(self, attn, q, k, v, mask4d, rel_index, rel_embeddings):
        from model.fast import fused_attention  # imported by __init__ already; not kept on the instance, which
        # a model holds (a module object would stop the model from being copied or pickled)
        relative = rel_embeddings is not None
        square = not relative or (rel_index.dim() == 2 and q.shape[2] == k.shape[2])
        if not fused_attention.supported(q, square):
            return self.fallback(attn, q, k, v, mask4d, rel_index, rel_embeddings)
        tables = square_tables(attn, rel_index, rel_embeddings) if relative else (None, None)
        return fused_attention.FusedDisentangledAttention.apply(
            q, k, v, *tables, mask4d, attn.dropout_p if attn.training else 0.0, RELATIVE_BLOCK)


def fast_path(name):
    """The path a module converted with attention_impl `name` runs (convert.py; "math" is model/attention.py's)."""
    if name == "eager":
        return eager
    if name == "sdpa":
        return sdpa
    if name == "fused":
        return Fused()
    if name == "blockwise":
        return blockwise
    if name == "auto":
        return auto_path()
    raise ValueError(f"no fast attention path {name!r}")

