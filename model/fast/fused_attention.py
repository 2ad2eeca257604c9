"""Disentangled attention in one pass per tile (attention_impl "fused"): flash attention with c2p and p2c
read inside the kernel, and dropout drawn inside it. No [B, H, N, N] tensor is written in forward: not
the scores, not the probabilities, not the bias, not a dropout mask.

What the "sdpa" path writes and reads per layer, and this one does not: the bias c2p + p2cᵀ (written by
relative_kernels' kernel, read by SDPA's memory-efficient kernel in forward and again in backward) and
the bias's gradient (written by SDPA, read by relative_kernels' spreading kernel). The relative terms are
read, as there, from the blocked products of relative_kernels ([H, NB, B·R, N+R]: for each block of R
query rows, its rows of q times the N + R table rows of the distances the block reads); a tile of c2p is
a skewed window of those products that is contiguous along each row, so it loads like a tile of K.

- forward, one program per (batch·head, block of query rows): for each block of keys, q·kᵀ plus the c2p
  tile plus the transposed p2c tile, the mask, an online softmax (the running maximum and sum, as flash
  attention 2), dropout from Philox draws (key: seed and batch·head, counter: i·N + j), and P·V. It keeps the
  log-sum-exp of each row for backward.
- backward, two kernels: one per block of keys (dK, dV), one per block of queries (dQ, and dS written
  straight into the two products' gradients, each (i, j) to one entry of each: no atomics). Both recompute
  the scores and draw the same dropout mask again. The products' gradients then go through the same
  batched matmuls as relative_kernels' backward.

Masked pairs score the fp32 minimum, not -inf, so a row with every key masked (a padded query) attends
uniformly to all N keys, as the eager path's fill with the dtype's minimum does. Its outputs are never
read (see model/attention.py).

Dropout draws differ from torch's generator: the same keep probability, another stream (the seed is drawn
from torch's CPU generator, so torch.manual_seed and activation checkpointing's saved RNG state fix it).
`keep_mask` writes the mask a forward used, for the tests.

Used when triton imports, the tensors are on CUDA (or TRITON_INTERPRET=1: the tests run it on the CPU),
the index is square and the head size is a power of two from 16 to 256; otherwise "fused" takes the path
"auto" gives (attention_paths.py). Checked on the CPU in Triton's interpreter against plain torch and the
math path (tests/unit/test_fused_attention.py).
"""
import torch

from model.fast import relative_kernels
from model.fast.relative_kernels import blocked_products, grads_from_products, triton

if triton is not None:
    from model.fast.relative_kernels import product_rows

if triton is not None:
    import triton.language as tl

MASKED = -3.4028234663852886e38  # fp32 minimum: a fully masked row still has finite scores


def supported(q: torch.Tensor, square: bool) -> bool:
    """Whether the kernels take this attention: a square index, a power-of-two head size the dots accept,
    batch·heads within CUDA's second grid dimension, and N·N within the 32-bit dropout counter."""
    B, H, N, d = q.shape
    return (square and relative_kernels.available(q) and 16 <= d <= 256 and d & (d - 1) == 0
            and B * H <= 65535 and N * N < 2 ** 31)


if triton is not None:
    @triton.jit
    def _scores(q, k_t, i, j, c2p_rows, c2p_ptr, p2c_ptr, mask_ptr, b, h, H, B, N, R, NB, W, stride_mask_b,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """The [BM, BN] tile of scores q·kᵀ + c2p + p2cᵀ in fp32: masked pairs at MASKED, columns beyond N
        at -inf (they are no keys at all)."""
        s = tl.dot(q, k_t, input_precision=PRECISION)
        inside = (i[:, None] < N) & (j[None, :] < N)
        if HAS_C2P:
            s += tl.load(c2p_ptr + c2p_rows[:, None] + j[None, :], mask=inside, other=0.0).to(tl.float32)
        if HAS_P2C:  # rows are j: load [BN, BM], contiguous along i, and transpose
            p2c_rows = product_rows(j, b, h, H, B, R, NB, W)
            tile = tl.load(p2c_ptr + p2c_rows[:, None] + i[None, :], mask=(j[:, None] < N) & (i[None, :] < N), other=0.0)
            s += tl.trans(tile).to(tl.float32)
        if HAS_MASK:
            allowed = tl.load(mask_ptr + b * stride_mask_b + i[:, None] * N + j[None, :], mask=inside, other=1)
            s = tl.where(allowed != 0, s, MASKED)
        return tl.where(j[None, :] < N, s, float("-inf"))

    @triton.jit
    def _row_stats(stats_ptr, pid_bh, i, N):
        row_max = tl.load(stats_ptr + pid_bh * N + i, mask=i < N, other=0.0)
        log_sum = tl.load(stats_ptr + (tl.num_programs(1) + pid_bh) * N + i, mask=i < N, other=0.0)
        return row_max, log_sum

    @triton.jit
    def _keep(seed, pid_bh, i, j, N, p_drop):
        """Philox keyed by (seed, batch·head) at counter i·N + j: 32-bit counters (64-bit ones would run
        Philox in 64-bit arithmetic), unique within a head for N up to 46340."""
        offsets = (i[:, None] * N + j[None, :]).to(tl.int32)
        return tl.rand(seed + (pid_bh << 32), offsets) >= p_drop

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, stats_ptr, c2p_ptr, p2c_ptr, mask_ptr,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stride_mask_b,
                        H, B, N, R, NB, seed, p_drop, keep_scale,
                        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr,
                        HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr,
                        DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(1).to(tl.int64)
        b, h = pid_bh // H, pid_bh % H
        i = tl.program_id(0) * BM + tl.arange(0, BM)
        dims = tl.arange(0, D)
        q_ptr += b * sqb + h * sqh
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        o_ptr += b * sob + h * soh  # the output's layout, which gradients share
        q = tl.load(q_ptr + i[:, None] * sqn + dims[None, :], mask=i[:, None] < N, other=0.0)
        W = N + R
        c2p_rows = product_rows(i, b, h, H, B, R, NB, W)
        row_max = tl.full((BM,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for j0 in range(0, TILES * BN, BN):
            j = j0 + tl.arange(0, BN)
            k_t = tl.load(k_ptr + j[None, :] * skn + dims[:, None], mask=j[None, :] < N, other=0.0)
            v = tl.load(v_ptr + j[:, None] * svn + dims[None, :], mask=j[:, None] < N, other=0.0)
            s = _scores(q, k_t, i, j, c2p_rows, c2p_ptr, p2c_ptr, mask_ptr, b, h, H, B, N, R, NB, W, stride_mask_b,
                        HAS_C2P, HAS_P2C, HAS_MASK, PRECISION)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(seed, pid_bh, i, j, N, p_drop), p, 0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max
        out = acc / row_sum[:, None]
        if DROPOUT:
            out = out * keep_scale
        tl.store(o_ptr + i[:, None] * son + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=i[:, None] < N)
        # the maximum and the log of the sum apart: for a row with every key masked, MASKED + log(N) would
        # round back to MASKED, and backward's exp(s - lse) would give 1 where softmax gave 1/N
        tl.store(stats_ptr + pid_bh * N + i, row_max, mask=i < N)
        tl.store(stats_ptr + (tl.num_programs(1) + pid_bh) * N + i, tl.log(row_sum), mask=i < N)

    @triton.jit
    def _backward_keys_kernel(q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dk_ptr, dv_ptr, c2p_ptr, p2c_ptr, mask_ptr,
                              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stride_mask_b,
                              H, B, N, R, NB, seed, p_drop, keep_scale,
                              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr,
                              HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr,
                              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """dK and dV for one block of keys, over all blocks of queries."""
        pid_bh = tl.program_id(1).to(tl.int64)
        b, h = pid_bh // H, pid_bh % H
        j = tl.program_id(0) * BN + tl.arange(0, BN)
        dims = tl.arange(0, D)
        q_ptr += b * sqb + h * sqh
        do_ptr += b * sob + h * soh
        k_t = tl.load(k_ptr + b * skb + h * skh + j[None, :] * skn + dims[:, None], mask=j[None, :] < N, other=0.0)
        v_t = tl.load(v_ptr + b * svb + h * svh + j[None, :] * svn + dims[:, None], mask=j[None, :] < N, other=0.0)
        W = N + R
        dk = tl.zeros((BN, D), tl.float32)
        dv = tl.zeros((BN, D), tl.float32)
        for i0 in range(0, TILES * BM, BM):
            i = i0 + tl.arange(0, BM)
            rows = i[:, None] < N
            q = tl.load(q_ptr + i[:, None] * sqn + dims[None, :], mask=rows, other=0.0)
            do = tl.load(do_ptr + i[:, None] * son + dims[None, :], mask=rows, other=0.0)
            row_max, log_sum = _row_stats(stats_ptr, pid_bh, i, N)
            delta = tl.load(delta_ptr + pid_bh * N + i, mask=i < N, other=0.0)
            c2p_rows = product_rows(i, b, h, H, B, R, NB, W)
            s = _scores(q, k_t, i, j, c2p_rows, c2p_ptr, p2c_ptr, mask_ptr, b, h, H, B, N, R, NB, W, stride_mask_b,
                        HAS_C2P, HAS_P2C, HAS_MASK, PRECISION)
            p = tl.where(rows, tl.exp((s - row_max[:, None]) - log_sum[:, None]), 0.0)  # rows beyond N: no query, no gradient
            grad_p = tl.dot(do, v_t, input_precision=PRECISION)
            if DROPOUT:
                keep = _keep(seed, pid_bh, i, j, N, p_drop)
                dropped = tl.where(keep, p * keep_scale, 0.0)
                grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
            else:
                dropped = p
            dv += tl.dot(tl.trans(dropped.to(do.dtype)), do, input_precision=PRECISION)
            grad_s = p * (grad_p - delta[:, None])
            if HAS_MASK:  # masked pairs were replaced, not added to: no gradient flows to them
                grad_s = tl.where(s != MASKED, grad_s, 0.0)
            dk += tl.dot(tl.trans(grad_s.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(dk_ptr + b * sob + h * soh + j[:, None] * son + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=j[:, None] < N)
        tl.store(dv_ptr + b * sob + h * soh + j[:, None] * son + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=j[:, None] < N)

    @triton.jit
    def _backward_queries_kernel(q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dq_ptr, c2p_ptr, p2c_ptr, mask_ptr,
                                 grad_c2p_ptr, grad_p2c_ptr,
                                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stride_mask_b,
                                 H, B, N, R, NB, seed, p_drop, keep_scale,
                                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr,
                                 HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_MASK: tl.constexpr,
                                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """dQ for one block of queries, and dS stored into each term's products' gradient (the entry the
        forward read for (i, j): one per pair, so plain stores)."""
        pid_bh = tl.program_id(1).to(tl.int64)
        b, h = pid_bh // H, pid_bh % H
        i = tl.program_id(0) * BM + tl.arange(0, BM)
        rows = i[:, None] < N
        dims = tl.arange(0, D)
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        q = tl.load(q_ptr + b * sqb + h * sqh + i[:, None] * sqn + dims[None, :], mask=rows, other=0.0)
        do = tl.load(do_ptr + b * sob + h * soh + i[:, None] * son + dims[None, :], mask=rows, other=0.0)
        row_max, log_sum = _row_stats(stats_ptr, pid_bh, i, N)
        delta = tl.load(delta_ptr + pid_bh * N + i, mask=i < N, other=0.0)
        W = N + R
        c2p_rows = product_rows(i, b, h, H, B, R, NB, W)
        dq = tl.zeros((BM, D), tl.float32)
        for j0 in range(0, TILES * BN, BN):
            j = j0 + tl.arange(0, BN)
            k_t = tl.load(k_ptr + j[None, :] * skn + dims[:, None], mask=j[None, :] < N, other=0.0)
            v_t = tl.load(v_ptr + j[None, :] * svn + dims[:, None], mask=j[None, :] < N, other=0.0)
            s = _scores(q, k_t, i, j, c2p_rows, c2p_ptr, p2c_ptr, mask_ptr, b, h, H, B, N, R, NB, W, stride_mask_b,
                        HAS_C2P, HAS_P2C, HAS_MASK, PRECISION)
            p = tl.where(rows, tl.exp((s - row_max[:, None]) - log_sum[:, None]), 0.0)
            grad_p = tl.dot(do, v_t, input_precision=PRECISION)
            if DROPOUT:
                grad_p = tl.where(_keep(seed, pid_bh, i, j, N, p_drop), grad_p * keep_scale, 0.0)
            grad_s = p * (grad_p - delta[:, None])
            if HAS_MASK:
                grad_s = tl.where(s != MASKED, grad_s, 0.0)
            dq += tl.dot(grad_s.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
            inside = rows & (j[None, :] < N)
            if HAS_C2P:
                tl.store(grad_c2p_ptr + c2p_rows[:, None] + j[None, :], grad_s.to(grad_c2p_ptr.dtype.element_ty), mask=inside)
            if HAS_P2C:  # transposed, so that each row's stores are contiguous along i
                p2c_rows = product_rows(j, b, h, H, B, R, NB, W)
                tl.store(grad_p2c_ptr + p2c_rows[:, None] + i[None, :], tl.trans(grad_s).to(grad_p2c_ptr.dtype.element_ty),
                         mask=(j[:, None] < N) & (i[None, :] < N))
        tl.store(dq_ptr + b * sob + h * soh + i[:, None] * son + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _keep_mask_kernel(out_ptr, N, seed, p_drop, BM: tl.constexpr, BN: tl.constexpr):
        pid_bh = tl.program_id(2).to(tl.int64)
        i = tl.program_id(0) * BM + tl.arange(0, BM)
        j = tl.program_id(1) * BN + tl.arange(0, BN)
        keep = _keep(seed, pid_bh, i, j, N, p_drop)
        tl.store(out_ptr + pid_bh * N * N + i[:, None] * N + j[None, :], keep.to(tl.int8),
                 mask=(i[:, None] < N) & (j[None, :] < N))


# BM = BN: the loops run over TILES blocks of either. TILES is a compile-time constant (one compiled
# variant per sequence length rounded up to 64) because Triton 3.6's interpreter cannot loop to a runtime
# bound with numpy >= 2.3 (it converts the bound with int() on a 1-element array).
BLOCK_M = BLOCK_N = 64


def keep_mask(B, H, N, seed, p, device):
    """bool [B, H, N, N]: the dropout mask a fused forward with this seed and p used."""
    out = torch.empty(B * H, N, N, dtype=torch.int8, device=device)
    grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(N, BLOCK_N), B * H)
    _keep_mask_kernel[grid](out, N, seed, p, BM=BLOCK_M, BN=BLOCK_N)
    return out.view(B, H, N, N).bool()


def new_heads(like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, d] in the projections' layout ([B, N, H, d] memory): the output and every
    gradient the kernels write, so that the caller's transpose back to [B, N, H·d] copies nothing."""
    B, H, N, d = like.shape
    return torch.empty(B, N, H, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


class FusedDisentangledAttention(torch.autograd.Function):
    """dropout(softmax(q·kᵀ + c2p + p2cᵀ, masked)) @ v for q [B, H, N, d] already divided by the scale, the
    tables as RelativeBias takes them ([H, 2N, d] by distance, p2c's reversed and scaled; None where the
    term is off), mask4d bool [B, 1, N, N] or None, dropout p. Returns [B, H, N, d]."""

    @staticmethod
    def forward(ctx, q, k, v, c2p_table, p2c_table, mask4d, p, block):
        B, H, N, d = q.shape
        R = block if N % block == 0 else N
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            products = blocked_products(q, k, c2p_table, p2c_table, R)
            # the output in the projections' layout [B, N, H, d]: the caller's transpose back is free
            out = new_heads(q)
            stats = torch.empty(2, B * H, N, dtype=torch.float32, device=q.device)  # row maxima, log row sums
            seed = int(torch.randint(2 ** 32, ())) if p > 0 else 0  # the key's low word
            relative, rest, meta = launch_args(q, k, v, out, products, mask4d, R, seed, p)
            _forward_kernel[(triton.cdiv(N, BLOCK_M), B * H)](q, k, v, out, stats, *relative, *rest, **meta)
        ctx.R, ctx.p, ctx.seed = R, p, seed
        ctx.save_for_backward(q, k, v, out, stats, c2p_table, p2c_table, mask4d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, stats, c2p_table, p2c_table, mask4d = ctx.saved_tensors
        B, H, N, d = q.shape
        R = ctx.R
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype)
            if grad_out.stride() != out.stride():
                grad_out = new_heads(out).copy_(grad_out)
            delta = (grad_out.float() * out.float()).sum(-1).reshape(B * H, N)  # Σ_j P·dP per row
            products = blocked_products(q, k, c2p_table, p2c_table, R)  # recomputed, not kept
            relative, rest, meta = launch_args(q, k, v, out, products, mask4d, R, ctx.seed, ctx.p)
            grad_k, grad_v = new_heads(k), new_heads(v)
            _backward_keys_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
                q, k, v, grad_out, stats, delta, grad_k, grad_v, *relative, *rest, **meta)
            # zeros where the forward read nothing (the corners of each skewed block)
            grad_products = [None if x is None else torch.zeros_like(x) for x in products]
            grad_q = new_heads(q)
            _backward_queries_kernel[(triton.cdiv(N, BLOCK_M), B * H)](
                q, k, v, grad_out, stats, delta, grad_q, *relative, *present_or(q, *grad_products), *rest, **meta)
            grads = [grad_q, grad_k, None, None]
            for slot, (x, table) in enumerate(((q, c2p_table), (k, p2c_table))):
                if table is not None:
                    grad_x, grads[slot + 2] = grads_from_products(x, table, grad_products[slot], B, N, R)
                    grads[slot] = grads[slot] + grad_x
        return grads[0], grads[1], grad_v, grads[2], grads[3], None, None, None


def present_or(fallback, *tensors):
    """tensors with each None replaced by a present one (or fallback): the pointer of a term that is off
    is never read (HAS_C2P / HAS_P2C), but the kernel still takes one."""
    stand_in = next((t for t in tensors if t is not None), fallback)
    return [stand_in if t is None else t for t in tensors]


def launch_args(q, k, v, out, products, mask4d, R, seed, p):
    """The kernels' shared arguments: (the two products and the mask: pointers), (strides and sizes),
    compile-time flags."""
    B, H, N, d = q.shape
    mask = mask4d.expand(B, 1, N, N).contiguous().view(torch.int8) if mask4d is not None else q
    relative = (*present_or(q, *products), mask)
    rest = (*strides(q, k, v, out), N * N if mask4d is not None else 0,
            H, B, N, R, N // R, seed, p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    meta = dict(D=d, BM=BLOCK_M, BN=BLOCK_N, TILES=triton.cdiv(N, BLOCK_M),
                HAS_C2P=products[0] is not None, HAS_P2C=products[1] is not None, HAS_MASK=mask4d is not None,
                DROPOUT=p > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return relative, rest, meta
