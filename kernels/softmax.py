"""softmax(scale * x) over the last dim, optionally causal, in Triton: kernels, then launchers.

One program per row. A row that fits one block (N <= _util.MAX_FUSED) is loaded once and finished
from registers. A wider row is streamed in BLOCK-sized chunks: one pass keeps a running max and
a running sum rescaled whenever the max grows ("online softmax"), a second pass writes
exp(z - max) / sum, so any width works with two reads instead of three.

Causal rows: row r is query i = r % T of a (T, N) block and keeps columns j < i + N - T + 1
(clamped to [0, N]). Masked columns are not even loaded; they are stored as zeros, and a row
that keeps nothing sums to 0, which the kernels turn into a row of zeros (not 0/0).
"""
import torch
import triton
import triton.language as tl

from minigpt.kernels._util import row_block, row_warps


@triton.jit
def _row_len(row, N, T, CAUSAL: tl.constexpr):
    # One return: the compiler types every return statement of a function, even one after a
    # constexpr branch that returned, and the causal length is int64 (row is) while N is int32.
    if CAUSAL:
        i = row % T
        L = tl.minimum(tl.maximum(i + N - T + 1, 0), N)
    else:
        L = N
    return L


@triton.jit
def _softmax_fwd_kernel(X, Y, N, T, scale, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                        SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    L = _row_len(row, N, T, CAUSAL)
    # exp(scale * x - max) as exp((z - max(z)) * |scale|) with z = sign(scale) * x, which is
    # exact: the row's largest value gets exp(0) = 1 exactly. In the plain form the compiler
    # may fuse `x * scale - max` into an FMA that skips the rounding the max was taken from;
    # at |scale * x| ~ 1e10 that put the largest value's exponent ~+-1e3 off (the C++ kernel
    # returned rows of zeros).
    # scale == 0: z = 0 and a = 1, so the -inf of masked columns stays -inf, not -inf * 0.
    sg = tl.where(scale < 0, -1.0, tl.where(scale > 0, 1.0, 0.0))
    a = tl.where(scale == 0, 1.0, tl.abs(scale))
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        keep = cols < L
        z = tl.load(X + cols, mask=keep, other=float("-inf")).to(tl.float32) * sg
        z = tl.where(keep, z, float("-inf"))  # scale < 0 would turn the -inf fill into +inf
        m = tl.max(z, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: exp(-inf) = 0, no NaN
        e = tl.exp((z - m) * a)
        d = tl.sum(e, axis=0)
        inv = tl.where(d == 0, 0.0, 1.0 / tl.where(d == 0, 1.0, d))  # NaN d: a NaN row
        tl.store(Y + cols, (e * inv).to(Y.dtype.element_ty), mask=cols < N)
    else:
        # Per-lane running max and sum; lanes are merged once at the end.
        m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        d_vec = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            keep = cols < L
            z = tl.load(X + cols, mask=keep, other=float("-inf")).to(tl.float32) * sg
            z = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m_vec, z)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf - -inf would be NaN
            d_vec = d_vec * tl.exp((m_vec - m_ref) * a) + tl.exp((z - m_ref) * a)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        d = tl.sum(d_vec * tl.exp((m_vec - m) * a), axis=0)
        inv = tl.where(d == 0, 0.0, 1.0 / tl.where(d == 0, 1.0, d))  # NaN d: a NaN row
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            keep = cols < L
            z = tl.load(X + cols, mask=keep, other=float("-inf")).to(tl.float32) * sg
            z = tl.where(keep, z, float("-inf"))
            tl.store(Y + cols, (tl.exp((z - m) * a) * inv).to(Y.dtype.element_ty), mask=cols < N)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, N, scale, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    DY += row * N
    Y += row * N
    DX += row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(dy * y, axis=0)
        tl.store(DX + cols, (scale * y * (dy - s)).to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            acc += dy * y
        s = tl.sum(acc, axis=0)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < N
            y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + cols, (scale * y * (dy - s)).to(DX.dtype.element_ty), mask=mask)


def softmax_fwd(x, scale, causal, T):
    """x: (M, N) contiguous. -> y like x. With ``causal`` the rows are (..., T, N) blocks."""
    M, N = x.shape
    y = torch.empty_like(x)
    if M == 0:
        return y
    BLOCK, single = row_block(N)
    _softmax_fwd_kernel[(M,)](x, y, N, max(int(T), 1), float(scale), CAUSAL=bool(causal),
                              BLOCK=BLOCK, SINGLE=single, num_warps=row_warps(BLOCK))
    return y


def softmax_bwd(dy, y, scale):
    """dy, y: (M, N) contiguous. -> dx like y."""
    M, N = y.shape
    dx = torch.empty_like(y)
    if M == 0:
        return dx
    BLOCK, single = row_block(N)
    _softmax_bwd_kernel[(M,)](dy, y, dx, N, float(scale), BLOCK=BLOCK, SINGLE=single,
                              num_warps=row_warps(BLOCK))
    return dx
