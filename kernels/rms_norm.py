"""RMSNorm (optionally fused with a residual add) in Triton: kernels, then launchers.

Same structure as kernels/layer_norm.py without the mean. Forward, one program per row: a row
that fits one block (N <= _util.MAX_FUSED) is loaded once and normalized from registers; a wider row
is streamed in BLOCK-sized chunks over two passes (sum of squares, normalize).

Backward, a fixed number of programs each owning a contiguous slice of rows: dx per row (a
narrow row's slice walked several rows at a time), and each program's partial sum of dweight
goes to its own row of a (programs, N) fp32 buffer (no atomics), which one torch .sum(0)
reduces at the end.
"""
import torch
import triton
import triton.language as tl

from minigpt.kernels._tiles import row_tile, walk_start, walk_step
from minigpt.kernels._util import (bwd_pipeline, bwd_programs, bwd_shape, row_block, row_warps,
                                   tuned_bwd_shape, x_grad_buffer)


@triton.jit
def _rms_fwd_kernel(X, R, W, Y, H, Rstd, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
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
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
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
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_bwd_kernel(DY, DH, Hx, W, Rstd, DX, DX2, DW, M, N, rows_per_prog,
                    HAS_DH: tl.constexpr, HAS_DX2: tl.constexpr, BLOCK: tl.constexpr,
                    ROWS: tl.constexpr, SINGLE: tl.constexpr, PIPELINE: tl.constexpr):
    # y = xhat * w with xhat = x * rstd:  dx = rstd * (w*dy - xhat * mean(xhat * w*dy)).
    # DX2 (HAS_DX2): dx once more in a narrower branch's dtype, as in layer_norm.
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    # The last program's slice may run past M: those rows are masked off rather than given a
    # data-dependent loop bound (which the interpreter cannot take).
    DW += pid.to(tl.int64) * N
    if SINGLE:
        # ROWS rows at a time (rows_per_prog is a multiple of ROWS), as in layer_norm.
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        end = row_start + rows_per_prog
        x_ahead, dy_ahead, dh_ahead = walk_start(Hx, DY, DH, row_start, end, M, N, cols, cmask,
                                                 ROWS, HAS_DH, PIPELINE)
        for i in range(0, rows_per_prog, ROWS):
            rows, off, mask = row_tile(row_start + i, end, M, N, cols, cmask, ROWS)
            valid = rows < M
            x, dy, dh, x_ahead, dy_ahead, dh_ahead = walk_step(
                Hx, DY, DH, x_ahead, dy_ahead, dh_ahead, row_start + i, end, M, N, cols, cmask,
                ROWS, HAS_DH, PIPELINE)
            rstd = tl.load(Rstd + rows, mask=valid, other=0.0)[:, None]
            xhat = x * rstd
            wdy = w * dy
            c1 = (tl.sum(xhat * wdy, axis=1) / N)[:, None]
            dx = (wdy - xhat * c1) * rstd
            if HAS_DH:
                dx += dh
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DX2:
                tl.store(DX2 + off, dx.to(DX.dtype.element_ty).to(DX2.dtype.element_ty),
                         mask=mask)
            dw += dy * xhat
        tl.store(DW + cols, tl.sum(dw, axis=0), mask=cmask)
    else:
        for c in range(0, N, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            tl.store(DW + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=cols < N)
        for i in range(0, rows_per_prog):
            row = row_start + i
            valid = row < M
            off = row.to(tl.int64) * N
            rstd = tl.load(Rstd + row, mask=valid, other=0.0)
            a1 = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, N, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                mask = (cols < N) & valid
                x = tl.load(Hx + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                a1 += x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
            c1 = tl.sum(a1, axis=0) / N
            for c in range(0, N, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                mask = (cols < N) & valid
                x = tl.load(Hx + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy - xhat * c1) * rstd
                if HAS_DH:
                    dx += tl.load(DH + off + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_DX2:
                    tl.store(DX2 + off + cols, dx.to(DX.dtype.element_ty).to(
                        DX2.dtype.element_ty), mask=mask)
                tl.store(DW + cols, tl.load(DW + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)


def rms_norm_fwd(x, weight, residual, eps, out_dtype=None):
    """x, residual: (M, N) contiguous, each its own float dtype; weight: (N,) fp32, bf16 or
    fp16 (read as fp32). -> y (in
    out_dtype, else h's), h (in the promoted dtype of x and residual; h empty without
    residual), rstd."""
    M, N = x.shape
    hd = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, N), dtype=out_dtype or hd, device=x.device)
    h = torch.empty((M, N), dtype=hd, device=x.device) if residual is not None else x.new_empty(0)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    BLOCK, single = row_block(N)
    _rms_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight, y,
        h if residual is not None else y, rstd, N, eps,
        HAS_RES=residual is not None, BLOCK=BLOCK, SINGLE=single, num_warps=row_warps(BLOCK))
    return y, h, rstd


def rms_norm_bwd(dy, dh, h, weight, rstd, x_dtype=None, config=None, split=False):
    """dy, dh, h: (M, N). -> dx (h's dtype), dx2 (dx in ``x_dtype``; empty unless x_dtype is
    given and differs from h's, or ``split``), dweight (summed in fp32, in weight's dtype)."""
    M, N = h.shape
    dx = torch.empty_like(h)
    two, dx2 = x_grad_buffer(h, x_dtype, split)
    BLOCK, single = row_block(N)
    # config: (ROWS, num_warps, programs per SM) in place of the measured one for this GPU
    # (norm_bwd_tuned.json), else bwd_shape's rule.
    ROWS, warps, per_sm = bwd_shape(
        BLOCK, single, config or tuned_bwd_shape("rms_norm", BLOCK, h.dtype, h.device))
    P, rows_per_prog = bwd_programs(h.device, M, ROWS, per_sm)
    dw_part = torch.empty((P, N), dtype=torch.float32, device=h.device)
    _rms_bwd_kernel[(P,)](
        dy, dh if dh is not None else dy, h, weight, rstd, dx, dx2 if two else dx, dw_part, M, N,
        rows_per_prog, HAS_DH=dh is not None, HAS_DX2=two, BLOCK=BLOCK, ROWS=ROWS,
        SINGLE=single, PIPELINE=bwd_pipeline(ROWS, BLOCK), num_warps=warps)
    return dx, dx2, dw_part.sum(0).to(weight.dtype)
