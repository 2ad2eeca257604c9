"""c2p + p2c for a square relative index without gathers: blocked products read along their skew.

For the square index of a forward (a function of i - j only) the table row of every distance d in (-N, N)
is projected, and for each block of R query rows one matmul against the N + R table rows that block reads
gives q_i·Kr[idx(d)] for its i and d; the [N, N] term is read from it as a strided view (`skew_view`,
Transformer-XL's relative shift) and added to the scores while the block is in cache (RelativeBias). No
[B, H, N, N] index and no gather, whose backward (a scatter-add) is slow. On CUDA the same products go
through Triton kernels (relative_kernels.py). Other indices (the EMD's selected query rows) gather as the
official code does (GatherLast).
"""
import os

import torch


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
                # rows padded to N+32: transposing out of rows 2^k elements apart thrashes the cache
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


def relative_bias_function(q):
    """RelativeBias, or its Triton twin where the kernels run on q's device (the same arguments and result)."""
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return RelativeBias  # the kernels run nowhere else: triton is not even imported
    from model.fast import relative_kernels  # imports triton (when installed)
    return relative_kernels.RelativeBiasTriton if relative_kernels.available(q) else RelativeBias
