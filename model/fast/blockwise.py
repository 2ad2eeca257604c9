"""Disentangled attention in blocks (attention_impl "blockwise"): flash attention's online softmax over blocks
of keys, written in PyTorch for the CPU, with memory linear in the sequence length.

For each block of query rows the keys are read block by block: the block's scores q·kᵀ + c2p + p2cᵀ, masked,
a running row maximum and row sum (flash attention 2), dropout, and P·V added into the block's output. The
relative terms of a block are gathered from the products q·Krᵀ and k·Qrᵀ ([B, H, N, 2k]: linear in N) with
that block's rows of the relative index. Forward keeps q, k, v, the two projected tables, the output and each
row's maximum and log-sum; backward recomputes each block's probabilities from them and forms
dS = P ⊙ (dP − rowsum(dO ⊙ O)) (flash attention 2; with dropout dP is the dropped probabilities' gradient
times the same mask, and rowsum(dO ⊙ O) still equals rowsum(dP ⊙ P)). No [B, H, N, N] tensor is made in
either direction: the largest temporaries are a block's [B, H, block, block] and the [B, H, N, 2k] products.

The relative index: for a square index (a function of i - j, the encoder's) only its first row and column
are read, as the table row of each distance (relative_bias.distance_index), and each block's [bq, bk] rows
are read from that [2N] vector; any other index (the EMD's selected query rows, [B, Nq, Nk] or [Nq, Nk]) is
sliced per block.

Dropout: one seed drawn from torch's default generator per forward; each (query block, key block) draws its
mask from a generator seeded from it and the block's number (block_keep), so backward draws the same masks
again and no mask is stored. The masks depend on the block size; `keep_mask` assembles the [B, H, Nq, Nk]
mask a forward used, for the tests. Masked pairs score fp32's minimum, as the math path fills with the
dtype's minimum: a padded query row (every key masked) attends uniformly. bf16 / fp16 inputs are computed
in fp32 and the output cast back.
"""
import torch

from model.fast.dropout import draw_keep, dropout_scale, keep_as
from model.fast.relative_bias import distance_index

# Query rows and keys per block: 128 x 128 fp32 per batch·head is 64 KiB, a few of them per block stay in a
# core's caches. One thread, 4 heads of 64 at N = 2048, forward + backward over two runs: 128 1.6-2.2 s,
# 256 2.0-2.3 s, 512 2.3 s (shared cores: within the noise of each other but for 512).
BLOCK = 128

# Mixes the block's number into the forward's seed (the golden ratio's 64-bit constant, odd): neighbouring
# blocks get seeds far apart.
SEED_STRIDE = 0x9E3779B97F4A7C15


def spans(n, block):
    """slice of each block of `n` rows, in order."""
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


class BlockIndex:
    """The relative index of each block: for a square index (a function of i - j) from the table row of
    each distance ([2N], distance_index's order), otherwise sliced from the index itself."""

    def __init__(self, rel_index, query_len, key_len):
        self.square = rel_index.dim() == 2 and query_len == key_len
        if self.square:
            self.by_distance = distance_index(rel_index)  # entry m: the row of i - j = N-1-m
            self.n = query_len
            # a square block's index depends on i0 - j0 and its shape only: one per diagonal of blocks
            # (2N/block of them, block² entries each: linear in N), made once per forward
            self.of_diagonal = {}
        else:
            self.rel_index = rel_index if rel_index.dim() == 2 else rel_index[:, None]  # [Nq, Nk] or [B, 1, Nq, Nk]

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """[bq, bk] (or [B, 1, bq, bk]) rows of the relative table for the block's (i, j)."""
        if not self.square:
            return self.rel_index[..., rows, cols]
        key = (rows.start - cols.start, rows.stop - rows.start, cols.stop - cols.start)
        if key not in self.of_diagonal:
            device = self.by_distance.device
            i = torch.arange(rows.start, rows.stop, device=device)
            j = torch.arange(cols.start, cols.stop, device=device)
            self.of_diagonal[key] = self.by_distance[(self.n - 1) - i[:, None] + j[None, :]]
        return self.of_diagonal[key]


def block_keep(seed, block_number, shape, p, device):
    """The dropout multiplier (1.0 kept, 0.0 dropped; fp32) of one block, from its own generator."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + block_number * SEED_STRIDE) % 2 ** 64)
    return keep_as(draw_keep(shape, p, device, generator), torch.float32)


def keep_mask(B, H, query_len, key_len, seed, p, block=BLOCK, device="cpu"):
    """bool [B, H, Nq, Nk]: the dropout mask a forward with this seed, p and block size used."""
    mask = torch.empty(B, H, query_len, key_len, dtype=torch.bool, device=device)
    cols_of = spans(key_len, block)
    for qi, rows in enumerate(spans(query_len, block)):
        for kj, cols in enumerate(cols_of):
            shape = (B, H, rows.stop - rows.start, cols.stop - cols.start)
            mask[:, :, rows, cols] = block_keep(seed, qi * len(cols_of) + kj, shape, p, device) != 0
    return mask


def draw_seed():
    """The forward's dropout seed, from torch's default (CPU) generator: torch.manual_seed fixes it, and
    activation checkpointing's saved RNG state repeats it."""
    return int(torch.randint(2 ** 62, ()))


def relative_products(q, k, c2p_table, p2c_table):
    """q·Krᵀ and k·Qrᵀ ([B, H, N, 2k], or None for a term that is off): each block gathers its terms from them."""
    c2p = None if c2p_table is None else torch.matmul(q, c2p_table.to(q.dtype).transpose(-1, -2))
    p2c = None if p2c_table is None else torch.matmul(k, p2c_table.to(k.dtype).transpose(-1, -2))
    return c2p, p2c


class Blocks:
    """What every block of one call reads: q, k, v in fp32, the relative products, the index and the mask."""

    def __init__(self, q, k, v, c2p_table, p2c_table, mask4d, index, block):
        self.q, self.k, self.v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q, k, v))
        self.c2p, self.p2c = relative_products(self.q, self.k, c2p_table, p2c_table)
        self.mask4d, self.index = mask4d, index
        self.rows_of, self.cols_of = spans(q.shape[2], block), spans(k.shape[2], block)

    def keys_of(self, qi):
        """(block number, keys) of each block of the qi-th block of query rows."""
        for kj, cols in enumerate(self.cols_of):
            yield qi * len(self.cols_of) + kj, cols

    def each(self):
        """(block number, query rows, keys) of every block, query block by query block."""
        for qi, rows in enumerate(self.rows_of):
            for number, cols in self.keys_of(qi):
                yield number, rows, cols

    def index_of(self, rows, cols, shape):
        """The block's relative index expanded to its scores' shape [B, H, bq, bk]."""
        return self.index.block(rows, cols).expand(shape)

    def scores(self, rows, cols):
        """The block's scores q·kᵀ + c2p + p2cᵀ [B, H, bq, bk] in fp32, masked pairs at fp32's minimum."""
        s = torch.matmul(self.q[:, :, rows], self.k[:, :, cols].transpose(-1, -2))
        if self.c2p is not None or self.p2c is not None:
            index = self.index_of(rows, cols, s.shape)
            if self.c2p is not None:  # c2p[i, j] = q_i·Kr[idx(i, j)]
                s += torch.gather(self.c2p[:, :, rows], -1, index)
            if self.p2c is not None:  # p2c[i, j] = k_j·Qr[idx(i, j)]: k's rows, the transposed index
                s += torch.gather(self.p2c[:, :, cols], -1, index.transpose(-1, -2)).transpose(-1, -2)
        if self.mask4d is not None:
            s.masked_fill_(~self.mask4d[:, :, rows, cols], torch.finfo(s.dtype).min)
        return s


class BlockwiseAttention(torch.autograd.Function):
    """dropout(softmax(q·kᵀ + c2p + p2cᵀ, masked)) @ v for q [B, H, Nq, d] already divided by the scale, k and
    v [B, H, Nk, d], the projected tables [H, 2k, d] (p2c's divided by the scale; None for a term that is
    off), mask4d bool [B, 1, Nq, Nk] or None, a BlockIndex (None without relative terms), dropout p and the
    block size. Returns [B, H, Nq, d] in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, c2p_table, p2c_table, mask4d, index, p, block):
        with torch.autocast(q.device.type, enabled=False):  # every product in fp32, as written here
            blocks = Blocks(q, k, v, c2p_table, p2c_table, mask4d, index, block)
            seed = draw_seed() if p > 0 else 0
            B, H, Nq, d = q.shape
            out = torch.empty(B, H, Nq, d, dtype=blocks.q.dtype, device=q.device)
            # each row's maximum and log-sum, kept apart: a padded row's maximum is fp32's minimum, to which
            # the log-sum would add nothing
            stats = torch.empty(2, B, H, Nq, dtype=blocks.q.dtype, device=q.device)
            for qi, rows in enumerate(blocks.rows_of):
                row_max = torch.full((B, H, rows.stop - rows.start), float("-inf"), dtype=out.dtype, device=q.device)
                row_sum = torch.zeros_like(row_max)
                acc = torch.zeros(B, H, rows.stop - rows.start, d, dtype=out.dtype, device=q.device)
                for number, cols in blocks.keys_of(qi):
                    s = blocks.scores(rows, cols)
                    new_max = torch.maximum(row_max, s.amax(-1))
                    rescale = torch.exp(row_max - new_max)
                    probs = s.sub_(new_max[..., None]).exp_()
                    row_sum = row_sum * rescale + probs.sum(-1)
                    if p > 0:  # dropped after the row sum: the softmax's denominator counts every key
                        probs.mul_(block_keep(seed, number, probs.shape, p, q.device))
                    acc = acc.mul_(rescale[..., None]).add_(torch.matmul(probs, blocks.v[:, :, cols]))
                    row_max = new_max
                scale = dropout_scale(p)[1] if p > 0 else 1.0
                out[:, :, rows] = acc.mul_(scale / row_sum[..., None])
                stats[0, :, :, rows], stats[1, :, :, rows] = row_max, torch.log(row_sum)
        out = out.to(q.dtype)
        ctx.index, ctx.p, ctx.block, ctx.seed = index, p, block, seed
        ctx.save_for_backward(q, k, v, c2p_table, p2c_table, mask4d, out, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, c2p_table, p2c_table, mask4d, out, stats = ctx.saved_tensors
        p = ctx.p
        with torch.autocast(q.device.type, enabled=False):
            blocks = Blocks(q, k, v, c2p_table, p2c_table, mask4d, ctx.index, ctx.block)
            grad_out = grad_out.to(blocks.q.dtype)
            delta = (grad_out * out.to(grad_out.dtype)).sum(-1)  # rowsum(dO ⊙ O) = rowsum(dP ⊙ P)
            grad_q, grad_k, grad_v = (torch.zeros_like(t) for t in (blocks.q, blocks.k, blocks.v))
            grad_c2p = None if blocks.c2p is None else torch.zeros_like(blocks.c2p)
            grad_p2c = None if blocks.p2c is None else torch.zeros_like(blocks.p2c)
            scale = dropout_scale(p)[1] if p > 0 else 1.0
            for number, rows, cols in blocks.each():
                row_max, log_sum = stats[:, :, :, rows, None]
                probs = blocks.scores(rows, cols).sub_(row_max).sub_(log_sum).exp_()
                grad_rows = grad_out[:, :, rows]
                grad_probs = torch.matmul(grad_rows, blocks.v[:, :, cols].transpose(-1, -2))
                if p > 0:
                    keep = block_keep(ctx.seed, number, probs.shape, p, q.device).mul_(scale)
                    grad_probs.mul_(keep)
                    dropped = probs * keep
                else:
                    dropped = probs
                grad_v[:, :, cols] += torch.matmul(dropped.transpose(-1, -2), grad_rows)
                grad_s = grad_probs.sub_(delta[:, :, rows, None]).mul_(probs)
                if mask4d is not None:
                    grad_s.masked_fill_(~mask4d[:, :, rows, cols], 0)  # masked_fill's backward
                grad_q[:, :, rows] += torch.matmul(grad_s, blocks.k[:, :, cols])
                grad_k[:, :, cols] += torch.matmul(grad_s.transpose(-1, -2), blocks.q[:, :, rows])
                if grad_c2p is not None or grad_p2c is not None:
                    index = blocks.index_of(rows, cols, grad_s.shape)
                    if grad_c2p is not None:  # gather's backward
                        grad_c2p[:, :, rows].scatter_add_(-1, index, grad_s)
                    if grad_p2c is not None:
                        grad_p2c[:, :, cols].scatter_add_(-1, index.transpose(-1, -2), grad_s.transpose(-1, -2))
            grad_tables = [None, None]
            for slot, (x, grad_x, table, grad_product) in enumerate(
                    ((blocks.q, grad_q, c2p_table, grad_c2p), (blocks.k, grad_k, p2c_table, grad_p2c))):
                if table is not None:  # the product x·tableᵀ's backward
                    grad_x += torch.matmul(grad_product, table.to(grad_product.dtype))
                    grad_tables[slot] = torch.einsum("bhnr,bhnd->hrd", grad_product, x).to(table.dtype)
        return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), *grad_tables,
                None, None, None, None)


def blockwise(attn, q, k, v, mask4d, rel_index, rel_embeddings, block=BLOCK):
    """The attention path (attention_paths.py's signature): the tables projected here, through autograd,
    so that the relative embeddings and the projections get their gradients outside the function."""
    c2p_table = p2c_table = index = None
    if rel_embeddings is not None:
        if "c2p" in attn.pos_att_type:
            c2p_table = attn.position_keys(rel_embeddings, "c2p")
        if "p2c" in attn.pos_att_type:
            p2c_table = attn.position_keys(rel_embeddings, "p2c") * (1.0 / attn.scale)
        index = BlockIndex(rel_index, q.shape[2], k.shape[2])
    p = attn.dropout_p if attn.training else 0.0
    return BlockwiseAttention.apply(q, k, v, c2p_table, p2c_table, mask4d, index, p, block)
