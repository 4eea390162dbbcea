"""LayerNorm (optionally fused with a residual add) in Triton: kernels, then launchers.

Forward, one program per row. A row that fits one block (N <= _util.MAX_FUSED) is loaded once and
normalized from registers; a wider row is streamed in BLOCK-sized chunks over three passes
(mean, variance, normalize) so any width up to memory works.

Backward, a fixed number of programs each owning a contiguous slice of rows: dx per row (a
narrow row's slice is walked several rows at a time, _util.bwd_rows), and each program's
partial sums of dweight/dbias go to its own row of a (programs, N) fp32 buffer (no atomics),
which one torch .sum(0) reduces at the end.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from minigpt.kernels._tiles import row_tile, walk_start, walk_step
from minigpt.kernels._util import (bwd_pipeline, bwd_programs, bwd_shape, interpreting,
                                   row_block, row_warps, tuned_bwd_shape, x_grad_buffer)


@triton.jit
def _ln_fwd_kernel(X, R, W, B, Y, H, Mean, Rstd, N, eps,
                   HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    if HAS_RES:
        R += row * N
        H += row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            hq = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + cols, hq, mask=mask)
            x = hq.to(tl.float32)  # normalize h as stored, like the unfused model would
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        src = X
        if HAS_RES:
            src = H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                hq = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H + cols, hq, mask=mask)
                x = hq.to(tl.float32)
            acc += x
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _mul_rn(a, b, EXACT: tl.constexpr):
    # A rounded product the compiler may not fuse into a later subtraction. dx = (w*dy - c2 -
    # xhat*c1) * rstd with w*dy fused as an FMA subtracts the rounded mean c2 from the exact
    # product: for N = 1 (where dx is exactly 0) that left the product's rounding error times
    # rstd (~316 at eps 1e-5), 2e-5 on an H200. The interpreter has no libdevice (and no FMA).
    if EXACT:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _ln_bwd_kernel(DY, DH, Hx, W, Mean, Rstd, DX, DX2, DW, DB, M, N, rows_per_prog,
                   HAS_DH: tl.constexpr, HAS_DX2: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr,
                   PIPELINE: tl.constexpr, EXACT_MUL: tl.constexpr):
    # DX2 (HAS_DX2): dx once more in DX2's dtype, for a branch x narrower than h (autocast:
    # bf16 x, fp32 residual stream), or in h's dtype for x and a residual that both need a
    # .grad of their own; a separate cast or copy kernel would read dx back.
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    # The last program's slice may run past M: those rows are masked off rather than given a
    # data-dependent loop bound (which the interpreter cannot take).
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N
    if SINGLE:
        # ROWS rows at a time (rows_per_prog is a multiple of ROWS): a narrow row alone is too
        # few bytes in flight to keep the memory system busy between the program's reductions.
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        db = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        end = row_start + rows_per_prog
        x_ahead, dy_ahead, dh_ahead = walk_start(Hx, DY, DH, row_start, end, M, N, cols, cmask,
                                                 ROWS, HAS_DH, PIPELINE)
        for i in range(0, rows_per_prog, ROWS):
            rows, off, mask = row_tile(row_start + i, end, M, N, cols, cmask, ROWS)
            valid = rows < M
            x, dy, dh, x_ahead, dy_ahead, dh_ahead = walk_step(
                Hx, DY, DH, x_ahead, dy_ahead, dh_ahead, row_start + i, end, M, N, cols, cmask,
                ROWS, HAS_DH, PIPELINE)
            mean = tl.load(Mean + rows, mask=valid, other=0.0)[:, None]
            rstd = tl.load(Rstd + rows, mask=valid, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = _mul_rn(w, dy, EXACT_MUL)
            c1 = (tl.sum(xhat * wdy, axis=1) / N)[:, None]
            c2 = (tl.sum(wdy, axis=1) / N)[:, None]
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += dh
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DX2:
                tl.store(DX2 + off, dx.to(DX.dtype.element_ty).to(DX2.dtype.element_ty),
                         mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(DW + cols, tl.sum(dw, axis=0), mask=cmask)
        if HAS_BIAS:
            tl.store(DB + cols, tl.sum(db, axis=0), mask=cmask)
    else:
        # Zero this program's partial rows, then accumulate into them chunk by chunk.
        for c in range(0, N, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            tl.store(DW + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
            if HAS_BIAS:
                tl.store(DB + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
        for i in range(0, rows_per_prog):
            row = row_start + i
            valid = row < M
            off = row.to(tl.int64) * N
            mean = tl.load(Mean + row, mask=valid, other=0.0)
            rstd = tl.load(Rstd + row, mask=valid, other=0.0)
            a1 = tl.zeros([BLOCK], dtype=tl.float32)
            a2 = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, N, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                mask = (cols < N) & valid
                x = tl.load(Hx + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                wdy = _mul_rn(tl.load(W + cols, mask=mask, other=0.0).to(tl.float32), dy, EXACT_MUL)
                a1 += xhat * wdy
                a2 += wdy
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            for c in range(0, N, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                mask = (cols < N) & valid
                x = tl.load(Hx + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                wdy = _mul_rn(tl.load(W + cols, mask=mask, other=0.0).to(tl.float32), dy, EXACT_MUL)
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + off + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_DX2:
                    tl.store(DX2 + off + cols, dx.to(DX.dtype.element_ty).to(
                        DX2.dtype.element_ty), mask=mask)
                tl.store(DW + cols, tl.load(DW + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    tl.store(DB + cols, tl.load(DB + cols, mask=mask, other=0.0) + dy, mask=mask)


def layer_norm_fwd(x, weight, bias, residual, eps, out_dtype=None):
    """x, residual: (M, N) contiguous, each its own float dtype; weight, bias: (N,) fp32, bf16
    or fp16 (read as fp32). -> y (in out_dtype, else h's), h (in the promoted dtype of x and
    residual), mean, rstd."""
    M, N = x.shape
    hd = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, N), dtype=out_dtype or hd, device=x.device)
    h = torch.empty((M, N), dtype=hd, device=x.device) if residual is not None else x.new_empty(0)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    BLOCK, single = row_block(N)
    _ln_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight, bias if bias is not None else weight,
        y, h if residual is not None else y, mean, rstd, N, eps,
        HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        BLOCK=BLOCK, SINGLE=single, num_warps=row_warps(BLOCK))
    return y, h, mean, rstd


def layer_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, x_dtype=None, config=None,
                   split=False):
    """dy, dh, h: (M, N). -> dx (h's dtype), dx2 (dx in ``x_dtype``; empty unless x_dtype is
    given and differs from h's, or ``split``), dweight, dbias (summed in fp32, in weight's
    dtype; dbias empty if no bias)."""
    M, N = h.shape
    dx = torch.empty_like(h)
    two, dx2 = x_grad_buffer(h, x_dtype, split)
    BLOCK, single = row_block(N)
    # config: (ROWS, num_warps, programs per SM) in place of the measured one for this GPU
    # (norm_bwd_tuned.json), else bwd_shape's rule.
    ROWS, warps, per_sm = bwd_shape(
        BLOCK, single, config or tuned_bwd_shape("layer_norm", BLOCK, h.dtype, h.device))
    P, rows_per_prog = bwd_programs(h.device, M, ROWS, per_sm)
    # dweight's and dbias's partial rows in one buffer: one reduction launch for both.
    parts = torch.empty((2 if has_bias else 1, P, N), dtype=torch.float32, device=h.device)
    dw_part, db_part = parts[0], parts[-1]
    _ln_bwd_kernel[(P,)](
        dy, dh if dh is not None else dy, h, weight, mean, rstd, dx, dx2 if two else dx,
        dw_part, db_part, M, N, rows_per_prog, HAS_DH=dh is not None, HAS_DX2=two,
        HAS_BIAS=has_bias,
        BLOCK=BLOCK, ROWS=ROWS, SINGLE=single, PIPELINE=bwd_pipeline(ROWS, BLOCK),
        EXACT_MUL=not interpreting(), num_warps=warps)
    sums = parts.sum(1)
    if weight.dtype != torch.float32:  # a 16-bit model's weights: their gradients as they are
        # dbias stays fp32: the bias's own dtype is not known here (an fp32 bias beside a
        # 16-bit weight got its gradient rounded to 16 bits); autograd casts it to the bias's.
        return (dx, dx2, sums[0].to(weight.dtype),
                sums[1].clone() if has_bias else weight.new_empty(0))
    # Separate storages: a custom op's outputs must not alias each other (torch.compile
    # refuses the graph otherwise), and db is only N floats.
    return dx, dx2, sums[0], (sums[1].clone() if has_bias else weight.new_empty(0))
