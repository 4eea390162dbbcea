"""Rotary position embeddings (rotate-half layout) in Triton: q and k in one launch.

One program per (batch, position): it loads that position's cos/sin row once and rotates
every query head and every key head there, so GQA (fewer key heads) costs nothing extra.
q and k are read through their strides (a transposed (B, T, H, D) view needs no copy); the
outputs are contiguous (B, H, T, D).

With d = D/2, x = (x1, x2) and the table row split the same way (c1, c2), (s1, s2):
  forward   y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2
  inverse   x1 = y1*c1 + y2*s2,   x2 = y2*c2 - y1*s1   (the transpose: rotation by -sin)
The inverse is the backward. It equals the true inverse when the halves of the tables repeat
(c1 == c2, s1 == s2, as real RoPE tables do), and is the exact gradient for any table.
"""
import torch
import triton
import triton.language as tl

from minigpt.kernels._util import next_pow2

MAX_TILE = 4096  # elements of one (heads x half) tile held in registers


@triton.jit
def _rotate_heads(X, O, b, t, H, T, sb, sh, st, c1, c2, s1, s2, HALF, D,
                  INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.arange(0, BLOCK_D)[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < H) & (j < HALF)
        src = X + b * sb + h.to(tl.int64) * sh + t * st + j
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        dst = O + ((b * H + h.to(tl.int64)) * T + t) * D + j
        tl.store(dst, y1.to(O.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS, T, Hq, Hk, D, HALF, L,
                 qsb, qsh, qst, ksb, ksh, kst, cos_bstride, pos_bstride,
                 HAS_POS: tl.constexpr, INVERSE: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    jd = tl.arange(0, BLOCK_D)
    dmask = jd < HALF
    if HAS_POS:
        p = tl.load(POS + b * pos_bstride + t).to(tl.int64)
        # The caller validates positions on CPU; on the GPU (no host sync) an out-of-range
        # position is masked here so it cannot read outside the table.
        dmask = dmask & (p >= 0) & (p < L)
        row = p * D
    else:
        row = b * cos_bstride + t * D
    c1 = tl.load(COS + row + jd, mask=dmask, other=0.0)[None, :]
    c2 = tl.load(COS + row + HALF + jd, mask=dmask, other=0.0)[None, :]
    s1 = tl.load(SIN + row + jd, mask=dmask, other=0.0)[None, :]
    s2 = tl.load(SIN + row + HALF + jd, mask=dmask, other=0.0)[None, :]
    _rotate_heads(Q, QO, b, t, Hq, T, qsb, qsh, qst, c1, c2, s1, s2, HALF, D,
                  INVERSE, BLOCK_HQ, BLOCK_D)
    _rotate_heads(K, KO, b, t, Hk, T, ksb, ksh, kst, c1, c2, s1, s2, HALF, D,
                  INVERSE, BLOCK_HK, BLOCK_D)


def _block_h(H, block_d):
    return max(1, min(next_pow2(H), MAX_TILE // block_d))


def rope(q, k, cos, sin, pos, inverse):
    """q (B, Hq, T, D), k (B, Hk, T, D) with unit last stride; cos/sin fp32 contiguous, (T, D)
    or (B, T, D) aligned with the queries, or tables (L, D) indexed by pos ((T,) or (B, T)
    int64). -> contiguous (q_rot, k_rot)."""
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    half = D // 2
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    BLOCK_D = next_pow2(half)
    has_pos = pos is not None
    cos_bstride = T * D if (not has_pos and cos.dim() == 3) else 0
    pos_bstride = T if (has_pos and pos.dim() == 2) else 0
    _rope_kernel[(B * T,)](
        q, k, qo, ko, cos, sin, pos if has_pos else cos, T, Hq, Hk, D, half, cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos_bstride, pos_bstride, HAS_POS=has_pos, INVERSE=inverse,
        BLOCK_HQ=_block_h(Hq, BLOCK_D), BLOCK_HK=_block_h(Hk, BLOCK_D), BLOCK_D=BLOCK_D,
        num_warps=4)
    return qo, ko
