"""c2p + p2c for a square relative index on CUDA, through two Triton kernels (RelativeBias's GPU path).

The terms are the same as RelativeBias's (relative_bias.py): for each block of R query rows, one
matmul of the block's rows of q (c2p) or k (p2c) against the N + R table rows of the distances the
block reads, and the [R, N] term read from that product along a skew. On the CPU that skew is a strided
view (skew_view) copied or added block by block; on a GPU those strided copies, the transposed copy of
p2c and their mirror images in backward run at a fraction of the memory bandwidth. Here:

- forward: all blocks' products in one batched matmul ([H, NB, B·R, N+R], the table windows as one
  strided view), then one kernel reads both terms along their skews and writes c2p + p2cᵀ; p2c's tile is
  read along its contiguous axis and transposed in registers.
- backward: one kernel per term spreads the bias gradient back into the products' layout (zeros where
  the forward read nothing; p2c's through the same transposed tiles), then the same batched matmuls.

Used when triton imports and the tensors are on CUDA (or anywhere under TRITON_INTERPRET=1, which runs
the kernels in numpy: how the tests check them on the CPU); DEBERTA_DS_TRITON=0 turns it off.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs none of this
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x's device."""
    if triton is None or os.environ.get("DEBERTA_DS_TRITON", "1") == "0":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def product_rows(x, b, h, H, B, R, NB, W):
        """Offset of the product entry (x, y = 0) for rows x of one (b, h): products [H, NB, B·R, N+R] in
        reversed block order (block_windows), the skew R-1 - x % R folded in; entry (x, y) is at + y."""
        xx = x % R
        return h * (NB * B * R * W) + (NB - 1 - x // R) * (B * R * W) + b * (R * W) + xx * W + (R - 1 - xx)

    @triton.jit
    def _bias_kernel(c2p_ptr, p2c_ptr, out_ptr, H, B, N, R, NB,
                     HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """out[b·H + h, i, j] = c2p(i, j) + p2c(j, i), each term(x, y) read from its products at
        [h, NB-1 - x // R, b, x % R, (R-1 - x % R) + y] (blocks in reversed order: see block_windows)."""
        pid_bh = tl.program_id(0).to(tl.int64)
        b, h = pid_bh // H, pid_bh % H
        i = tl.program_id(1) * BI + tl.arange(0, BI)
        j = tl.program_id(2) * BJ + tl.arange(0, BJ)
        W = N + R
        inside = (i[:, None] < N) & (j[None, :] < N)
        acc = tl.zeros((BI, BJ), dtype=tl.float32)
        if HAS_C2P:
            row = product_rows(i, b, h, H, B, R, NB, W)
            acc += tl.load(c2p_ptr + row[:, None] + j[None, :], mask=inside, other=0.0).to(tl.float32)
        if HAS_P2C:  # rows are j: load [BJ, BI], contiguous along i, and transpose
            row = product_rows(j, b, h, H, B, R, NB, W)
            tile = tl.load(p2c_ptr + row[:, None] + i[None, :], mask=(j[:, None] < N) & (i[None, :] < N), other=0.0)
            acc += tl.trans(tile).to(tl.float32)
        out = out_ptr + pid_bh * N * N + i[:, None] * N + j[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _grad_products_kernel(grad_ptr, out_ptr, H, B, N, R, NB, Y0,
                              TRANSPOSED: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
        """The gradient of one term's products: out[h, NB-1 - x // R, b, x % R, c] = G[b·H + h, x, y]
        (G[.., y, x] when TRANSPOSED: p2c) with y = c - (R-1 - x % R); 0 where y is outside [0, N).
        Tiles run over (x, y), y from -Y0 (Y0 >= R-1, a multiple of BY: the loads start aligned) to at
        least N+R, so that every c of every row is written once."""
        pid_bh = tl.program_id(0).to(tl.int64)
        b, h = pid_bh // H, pid_bh % H
        x = tl.program_id(1) * BX + tl.arange(0, BX)
        y = tl.program_id(2) * BY + tl.arange(0, BY) - Y0
        W = N + R
        y_in = (y >= 0) & (y < N)
        x_in = x < N
        grad_base = grad_ptr + pid_bh * N * N
        if TRANSPOSED:  # G[y, x]: load [BY, BX], contiguous along x, and transpose
            tile = tl.trans(tl.load(grad_base + y[:, None] * N + x[None, :], mask=y_in[:, None] & x_in[None, :], other=0.0))
        else:
            tile = tl.load(grad_base + x[:, None] * N + y[None, :], mask=x_in[:, None] & y_in[None, :], other=0.0)
        xx = x % R
        c = y[None, :] + (R - 1 - xx)[:, None]
        row = h * (NB * B * R * W) + (NB - 1 - x // R) * (B * R * W) + b * (R * W) + xx * W
        tl.store(out_ptr + row[:, None] + c, tile.to(out_ptr.dtype.element_ty), mask=x_in[:, None] & (c >= 0) & (c < W))


def block_rows(x: torch.Tensor, R: int) -> torch.Tensor:
    """x [B, H, N, d] -> [H, NB, B·R, d], block n' holding rows of block NB-1-n' (see block_windows)."""
    B, H, N, d = x.shape
    return x.view(B, H, N // R, R, d).flip(2).permute(1, 2, 0, 3, 4).reshape(H, N // R, B * R, d)


def unblock_rows(rows: torch.Tensor, B: int) -> torch.Tensor:
    """block_rows' inverse: [H, NB, B·R, d] -> [B, H, N, d]."""
    H, NB, BR, d = rows.shape
    return rows.view(H, NB, B, BR // B, d).permute(2, 0, 1, 3, 4).flip(2).reshape(B, H, NB * BR // B, d)


def block_windows(table: torch.Tensor, N: int, R: int) -> torch.Tensor:
    """table [H, 2N, d] -> [H, NB, N+R, d]: the rows each block of R query rows reads, as one strided view.
    Block n (rows nR ... nR+R-1) reads rows N-R-nR ... 2N-1-nR; in reversed block order n' = NB-1-n the
    window starts at n'R, a positive stride, which a view can have."""
    table = table.contiguous()
    H, _, d = table.shape
    return table.as_strided((H, N // R, N + R, d), (table.stride(0), R * table.stride(1), table.stride(1), 1))


def launch_bias(c2p_products, p2c_products, B, H, N, R, dtype, device):
    out = torch.empty(B * H, N, N, dtype=dtype, device=device)
    BI, BJ = 64, 64
    grid = (B * H, triton.cdiv(N, BI), triton.cdiv(N, BJ))
    # a missing term's pointer is never read (HAS_C2P / HAS_P2C): the other term's stands in for it
    c2p = c2p_products if c2p_products is not None else p2c_products
    p2c = p2c_products if p2c_products is not None else c2p_products
    _bias_kernel[grid](c2p, p2c, out, H, B, N, R, N // R,
                       HAS_C2P=c2p_products is not None, HAS_P2C=p2c_products is not None, BI=BI, BJ=BJ)
    return out


def launch_grad_products(grad, B, H, N, R, transposed):
    out = torch.empty(H, N // R, B * R, N + R, dtype=grad.dtype, device=grad.device)
    BX, BY = 64, 64
    y0 = triton.cdiv(R - 1, BY) * BY  # y runs over [-y0, N + R)
    grid = (B * H, triton.cdiv(N, BX), triton.cdiv(N + R + y0, BY))
    _grad_products_kernel[grid](grad, out, H, B, N, R, N // R, y0, TRANSPOSED=transposed, BX=BX, BY=BY)
    return out


def blocked_products(q, k, c2p_table, p2c_table, R):
    """Each term's blocked products [H, NB, B·R, N+R] (q's rows for c2p, k's for p2c), or None where the
    table is None: one batched matmul per term, the table windows as one strided view."""
    N = q.shape[2]
    return [None if t is None else torch.matmul(block_rows(x, R), block_windows(t.to(x.dtype), N, R).transpose(-1, -2))
            for x, t in ((q, c2p_table), (k, p2c_table))]


def grads_from_products(x, table, grad_products, B, N, R):
    """The gradients of x ([B, H, N, d], the term's rows) and of its table from the gradient of the term's
    blocked products: the same batched matmuls, and the overlapping windows summed into the table."""
    windows = block_windows(table.to(grad_products.dtype), N, R)
    grad_x = unblock_rows(torch.matmul(grad_products, windows), B).to(x.dtype)
    grad_windows = torch.matmul(grad_products.transpose(-1, -2), block_rows(x.to(grad_products.dtype), R))
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)  # windows overlap
    for n in range(N // R):
        grad_table[:, n * R: n * R + N + R] += grad_windows[:, n]
    return grad_x, grad_table.to(table.dtype)


class RelativeBiasTriton(torch.autograd.Function):
    """RelativeBias (same arguments, same result) with the skewed reads and writes in Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, c2p_table, p2c_table, block):
        B, H, N, d = q.shape
        R = block if N % block == 0 else N  # equal blocks: one batched matmul, one layout
        ctx.R = R
        ctx.save_for_backward(q, k, c2p_table, p2c_table)
        with torch.autocast(q.device.type, enabled=False):  # every input is in the compute dtype already
            return launch_bias(*blocked_products(q, k, c2p_table, p2c_table, R), B, H, N, R, q.dtype, q.device)

    @staticmethod
    def backward(ctx, grad):
        q, k, c2p_table, p2c_table = ctx.saved_tensors
        B, H, N, d = q.shape
        R = ctx.R
        grad = grad.contiguous()
        grads = [None, None, None, None]
        for slot, (x, table, transposed) in enumerate(((q, c2p_table, False), (k, p2c_table, True))):
            if table is None:
                continue
            grad_products = launch_grad_products(grad, B, H, N, R, transposed)  # [H, NB, B·R, N+R]
            grads[slot], grads[slot + 2] = grads_from_products(x, table, grad_products, B, N, R)
        return grads[0], grads[1], grads[2], grads[3], None
