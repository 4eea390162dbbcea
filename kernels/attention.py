"""Flash attention (FlashAttention-2 style) in Triton: forward, backward and flash-decoding.

Forward: one program per (block of BLOCK_M queries, batch x query head). It walks the key
blocks the block can see with an online softmax (running max m, running sum l, unnormalized
accumulator), so only BLOCK_M x BLOCK_N scores ever exist. Key blocks every row of the query
block sees entirely are processed without a mask; only the blocks on the causal diagonal and
the ragged last block pay for it. Scores are kept in base 2 (scale * log2(e) folded into one
multiply) so the exponentials are exp2; the saved logsumexp is converted back to natural log.

Backward (atomic-free, two kernels after a tiny preprocess delta = rowsum(dO * O)):
  * dK/dV: one program per (key block, batch x kv head). It loops over the query heads of its
    GQA group and their query blocks that can see the keys, recomputing P from the saved lse,
    so the group sum of dK/dV happens in registers, with no per-query-head buffer.
  * dQ: one program per (query block, batch x query head), looping over key blocks.

Decode (flash-decoding): one program per (batch x kv head, split of the keys) holds all query
heads of the GQA group (padded to 16 rows so tl.dot applies) and writes a partial result and
its logsumexp; a combine kernel merges the splits.

Dropout on the probabilities (DROPOUT, FlashAttention's way): the mask is never stored.
Probability (b, h, i, j) is kept when tl.rand(seed, ((b * Hq + h) * T + i) * S + j) >= p, a
counter-based Philox draw the forward and both backward kernels regenerate whatever their
tiles (minigpt/reference/philox.py computes the same mask on the host). The forward's
normalizer l and the saved lse stay those of the undropped softmax; the kept P V sum is scaled
by 1/(1-p) at the end. The backward needs no other change than dP times mask/(1-p) before
dS = P (dP - delta): delta = rowsum(dO * O) = rowsum(P * dP) holds with the dropped O too.
With DROPOUT off the seed and p arguments are unused and the code is the code without them.

The Triton interpreter computes tl.dot on bf16/fp16 wrongly, so under TRITON_INTERPRET=1 the
tiles are upcast to fp32 before every dot (DOT); compiled on a GPU the dots run on
bf16/fp16 tensor cores with fp32 accumulation, and fp32 inputs on three-pass TF32 (~fp32
accuracy; see _dot_mode).

Tile sizes: see tiles() and benchmarks/tune_attention.py.
"""
import os

import torch
import triton
import triton.language as tl

from minigpt.kernels._util import (capped_launch, cdiv, interpreting, next_pow2, num_programs,
                                   tuned_table)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    if DOT == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, D, S, T,
               qk_scale, start, stop, rng_rows, seed, dropout_p, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
               DROPOUT: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[None, :] < S) & dmask[:, None]
        else:
            kv_mask = dmask[:, None]
        kt = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None], mask=kv_mask, other=0.0)
        qk = _dot(q, kt, DOT) * qk_scale
        if MASKED:
            keep = cols[None, :] < S
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (S - T))
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 there so exp2 gives 0
        # instead of exp2(-inf - -inf) = nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :], mask=tl.trans(kv_mask),
                    other=0.0)
        if DROPOUT:
            # l_i above is the undropped normalizer; only the P V sum loses the dropped terms.
            keep = tl.rand(seed, rng_rows[:, None] + cols[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
                     H, T, S, D, REP, qk_scale, seed: tl.int64, dropout_p, drop_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query blocks see the most keys: launch them first, so the light blocks
        # fill the final wave instead of leaving SMs idle behind one heavy block.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    K += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=qmask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m0 = pid_m * BLOCK_M
    if CAUSAL:
        # Keys < m0 + S - T + 1 are seen by every row of the block; keys up to the last row's
        # limit need the mask.
        full = tl.maximum(tl.minimum(m0 + S - T + 1, S), 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(m0 + BLOCK_M + S - T, S)
    else:
        full = S // BLOCK_N * BLOCK_N
        end = S
    # Flat index of (b, h, row, key 0) in the (B, Hq, T, S) probabilities: the RNG offset base.
    rng_rows = (pid_bh.to(tl.int64) * T + offs_m) * S
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, sks, svs, offs_m, offs_d, D, S, T,
                               qk_scale, 0, full, rng_rows, seed, dropout_p, False, CAUSAL,
                               BLOCK_N, DOT, DROPOUT)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, sks, svs, offs_m, offs_d, D, S, T,
                               qk_scale, full, end, rng_rows, seed, dropout_p, True, CAUSAL,
                               BLOCK_N, DOT, DROPOUT)
    seen = l_i > 0.0
    if DROPOUT:
        out = acc * (drop_scale / tl.where(seen, l_i, 1.0))[:, None]
    else:
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # A row that saw no key (l = 0) gets lse = +inf (P = 0 in the backward); a NaN row (a NaN
    # or inf in q or k) keeps lse = NaN, so the backward's P and dV are NaN as the
    # reference's, not 0 and finite.
    lse = tl.where(l_i == 0.0, float("inf"),
                   (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453)
    O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, H, T, D, sob, soh, sot, sdb, sdh, sdt,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQA, b, hk, REP, Hq, T, S, D, sqb, sqh, sqt,
                sdb, sdh, sdt, offs_n, offs_d, dmask, qk_scale, scale, first_m, n_blocks,
                seed, dropout_p, drop_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK/dV of one key block over ``n_blocks`` query blocks from ``first_m``, for
    every query head of the GQA group. One flat loop over (head, query block) rather than two
    nested ones: Triton software-pipelines only the innermost loop, and the nested form kept
    the outer loop's pointers live beside the accumulators (spills on sm_90 for GQA).
    MASKED: apply the causal mask (the blocks on the diagonal). Padded key rows (past S) need
    no mask: they only reach their own rows of dK/dV, which are never stored.
    DROPOUT: dV sums the kept P unscaled (the caller scales dV by 1/(1-p) once); dP is masked
    and scaled before dS.
    ATOMIC_DQ: also add this key block's share of dQ, dS K * scale, into the fp32 (B, Hq, T, D)
    buffer DQA with atomics (FlashAttention-2's backward), so no dQ kernel has to recompute
    S and dP. Padded key rows are masked then: their P = exp2(-lse) can overflow, and inf x
    a zero key row would poison a real row of dQ."""
    offs_mb = tl.arange(0, BLOCK_M)
    for it in range(0, REP * n_blocks):
        g = it // n_blocks
        offs_m = first_m + (it - g * n_blocks) * BLOCK_M + offs_mb
        h = hk * REP + g
        row = (b * Hq + h).to(tl.int64) * T
        qmask = (offs_m[:, None] < T) & dmask[None, :]
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt
                    + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                     + offs_d[None, :], mask=qmask, other=0.0)
        # Padded query rows get lse = +inf, hence P = 0.
        lse2 = tl.load(LSE + row + offs_m, mask=offs_m < T, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
        qkT = _dot(k, tl.trans(q), DOT) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + (S - T), pT, 0.0)
        if ATOMIC_DQ:
            pT = tl.where(offs_n[:, None] < S, pT, 0.0)
        if DROPOUT:
            keepT = tl.rand(seed, (row + offs_m)[None, :] * S + offs_n[:, None]) >= dropout_p
            dv += _dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, DOT)
            dpT = tl.where(keepT, _dot(v, tl.trans(do), DOT) * drop_scale, 0.0)
        else:
            dv += _dot(pT.to(do.dtype), do, DOT)
            dpT = _dot(v, tl.trans(do), DOT)
        dsT = pT * (dpT - delta[None, :])
        if MASKED:
            # 0, not 0 * (dP - delta): a NaN in v or in a query's row must not reach dK (or
            # dQ) through a pair the mask hides. Keyed on P = 0, not on the mask: the mask
            # kept alive across the two dots above cost 128 -> 180 registers and half the
            # blocks an SM on sm_90 (tests/test_triton_compile.py).
            dsT = tl.where(pT == 0.0, 0.0, dsT)
        dk += _dot(dsT.to(q.dtype), q, DOT)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dsT.to(k.dtype)), k, DOT) * scale  # (BLOCK_M, BLOCK_D)
            tl.atomic_add(DQA + (row + offs_m)[:, None] * D + offs_d[None, :], dq, mask=qmask)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQA,
                     sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                     sgb, sgh, sgs,
                     Hq, Hkv, T, S, D, REP, qk_scale, scale, seed: tl.int64, dropout_p,
                     drop_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                     DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kvmask = (offs_n[:, None] < S) & dmask[None, :]
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * sks
                + offs_d[None, :], mask=kvmask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svs
                + offs_d[None, :], mask=kvmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Query blocks before lo see none of these keys (the first query that sees key n0 is
        # n0 - (S - T)); those from lo up to `full` see some (masked); from `full` on, every
        # query sees every key of the block.
        lo = tl.maximum(n0 - (S - T), 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M,
                          lo)
        n_masked = tl.cdiv(tl.maximum(tl.minimum(full, T) - lo, 0), BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQA, b, hk, REP, Hq, T, S, D,
                             sqb, sqh, sqt, sdb, sdh, sdt, offs_n, offs_d, dmask, qk_scale,
                             scale, lo, n_masked, seed, dropout_p, drop_scale, True, BLOCK_M,
                             DOT, DROPOUT, ATOMIC_DQ)
    else:
        full = 0
    n_full = tl.cdiv(tl.maximum(T - full, 0), BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQA, b, hk, REP, Hq, T, S, D, sqb,
                         sqh, sqt, sdb, sdh, sdt, offs_n, offs_d, dmask, qk_scale, scale, full,
                         n_full, seed, dropout_p, drop_scale, False, BLOCK_M, DOT, DROPOUT,
                         ATOMIC_DQ)
    if DROPOUT:
        dv = dv * drop_scale
    # dK and dV share one layout (sgb, sgh, sgs): the launcher allocates both alike.
    out = b.to(tl.int64) * sgb + hk.to(tl.int64) * sgh + offs_n[:, None] * sgs + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, sks, svs, offs_m, offs_d, dmask, S, T, qk_scale,
              start, stop, rng_rows, seed, dropout_p, drop_scale, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
              DROPOUT: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks in [start, stop). MASKED: the end
    of the keys, and the causal mask if CAUSAL. The last, ragged key block needs the latter even
    without causality: its zero-padded keys give P = exp2(-lse), which can overflow to inf,
    and inf x 0 would poison a real row of dQ."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        kvmask = (cols[None, :] < S) & dmask[:, None]
        kt = tl.load(K + cols[None, :] * sks + offs_d[:, None], mask=kvmask, other=0.0)
        vt = tl.load(V + cols[None, :] * svs + offs_d[:, None], mask=kvmask, other=0.0)
        qk = _dot(q, kt, DOT) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < S
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (S - T))
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, vt, DOT)
        if DROPOUT:
            keep = tl.rand(seed, rng_rows[:, None] + cols[None, :]) >= dropout_p
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                   sgb, sgh, sgt,
                   H, T, S, D, REP, qk_scale, scale, seed: tl.int64, dropout_p, drop_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query blocks see the most keys: launch them first, so the light blocks
        # fill the final wave instead of leaving SMs idle behind one heavy block.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    K += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = (offs_m[:, None] < T) & dmask[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt
                + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :], mask=qmask, other=0.0)
    row = pid_bh.to(tl.int64) * T
    lse2 = tl.load(LSE + row + offs_m, mask=offs_m < T, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks below `full` are seen whole by every row of the block, as in the forward.
    if CAUSAL:
        full = tl.maximum(tl.minimum(m0 + S - T + 1, S), 0) // BLOCK_N * BLOCK_N
        end = tl.minimum(m0 + BLOCK_M + S - T, S)
    else:
        full = S // BLOCK_N * BLOCK_N
        end = S
    rng_rows = (row + offs_m) * S
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, sks, svs, offs_m, offs_d, dmask, S, T,
                   qk_scale, 0, full, rng_rows, seed, dropout_p, drop_scale, False, CAUSAL,
                   BLOCK_N, DOT, DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, sks, svs, offs_m, offs_d, dmask, S, T,
                   qk_scale, full, end, rng_rows, seed, dropout_p, drop_scale, True, CAUSAL,
                   BLOCK_N, DOT, DROPOUT)
    if CAUSAL:
        # A query that sees no key (lse = +inf; only under a causal mask with T > S) has
        # dQ = 0, whatever 0 * (dP - delta) made of a NaN in v on its masked pairs (a hidden
        # pair makes no NaN in any other row's dQ that the reference's delta does not). Per
        # row, after the loop: masking dS inside it cost the dropout kernel 166 -> 255
        # registers and a block an SM on sm_90.
        dq = tl.where((lse2 == float("inf"))[:, None], 0.0, dq)
    tl.store(DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + offs_m[:, None] * sgt
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _decode_split_kernel(Q, K, V, SEQLENS, OP, LSEP,
                         sqb, sqh, skb, skh, sks, svb, svh, svs,
                         Hq, Hkv, D, REP, S_max, split_len, NSPLIT, qk_scale,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    L = tl.minimum(tl.load(SEQLENS + b), S_max)  # never read past the cache
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    gmask = offs_g < REP
    heads = hk * REP + offs_g
    q = tl.load(Q + b.to(tl.int64) * sqb + heads[:, None].to(tl.int64) * sqh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    K += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kvmask = (cols[None, :] < hi) & dmask[:, None]
        kt = tl.load(K + cols[None, :] * sks + offs_d[:, None], mask=kvmask, other=0.0)
        qk = _dot(q, kt, DOT) * qk_scale
        qk = tl.where(cols[None, :] < hi, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svs + offs_d[None, :], mask=tl.trans(kvmask), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
        m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Empty split (past this sequence's length): lse2 = -inf, weight 0 in the combine.
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (b * Hq + heads).to(tl.int64) * NSPLIT + split
    tl.store(OP + part[:, None] * D + offs_d[None, :], o, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSEP + part, lse2, mask=gmask)


@triton.jit
def _decode_combine_kernel(OP, LSEP, O, D, NSPLIT,
                           BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    lse2 = tl.load(LSEP + pid * NSPLIT + offs_s, mask=offs_s < NSPLIT, other=float("-inf"))
    m = tl.max(lse2, 0)  # finite when cache_seqlens >= 1 (split 0 holds key 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all empty: weights 0, not nan
    den = tl.sum(tl.math.exp2(lse2 - m), 0)
    # The partial outputs are summed CHUNK splits at a time: a whole (splits x head dim) tile
    # in registers spilled 12 KB a thread on sm_90 at 512 splits x 256.
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NSPLIT, CHUNK):
        rows = s0 + offs_c
        w = tl.math.exp2(tl.load(LSEP + pid * NSPLIT + rows, mask=rows < NSPLIT,
                                 other=float("-inf")) - m)
        o = tl.load(OP + (pid * NSPLIT + rows[:, None]) * D + offs_d[None, :],
                    mask=(rows[:, None] < NSPLIT) & (offs_d[None, :] < D), other=0.0)
        out += tl.sum(o * w[:, None], 0)
    out = out / tl.where(den > 0.0, den, 1.0)
    tl.store(O + pid * D + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


# Tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel ("fwd", "dkdv", "dq"). BLOCK_M
# counts queries and BLOCK_N keys in all three. The defaults below were chosen without a GPU
# to time them: each compiles for sm_90 within the 227 KiB of shared memory and without
# register spills, or with the fewest found (tests/test_triton_compile.py prints the table).
# benchmarks/tune_attention.py times alternatives on a GPU and writes the fastest to
# attention_tuned.json beside this file, whose entries take precedence.
# The 16-bit backward at head dims 64 and 128 follows the Triton tutorial's Hopper geometry
# (dK/dV: 128 keys a program, 32 queries a step; dQ: 128 queries, 32 keys a step), each key
# or query block held once while the other side streams by, at 8 warps where the tutorial's 4
# spilled here (D 64 dK/dV: 76 bytes). The 64 x 64 tiles before measured 0.45-0.86x (D 64) and
# 0.52-0.69x (D 128) SDPA-flash's backward on an H200, timed per call; these are unmeasured.
_DEFAULT_16BIT = {  # BLOCK_D -> kernel -> tiles, for bf16/fp16 on tensor cores
    64: {"fwd": (128, 64, 4, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 4, 5)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 8, 3)},
    256: {"fwd": (64, 32, 8, 2), "dkdv": (64, 32, 8, 2), "dq": (64, 32, 8, 2)},
}
# fp32 runs three-pass TF32 dots (_dot_mode), which hold a high and a low half of every
# operand tile: smaller tiles than 16-bit. Head dim 256 spills at every backward tile tried
# (fewest below, ~150-400 bytes a thread); fp32 is the accuracy path, not the fast one.
_DEFAULT_FP32 = {
    64: {"fwd": (64, 64, 4, 3), "dkdv": (32, 32, 4, 2), "dq": (64, 32, 8, 2)},
    128: {"fwd": (32, 32, 4, 2), "dkdv": (32, 16, 8, 2), "dq": (16, 32, 4, 2)},
    256: {"fwd": (16, 32, 4, 2), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)},
}
# Dropout draws ten Philox rounds per probability in registers: at some tiles above that
# spills on sm_90. These replace them with dropout on (no spills). fp32 at head dim 256 spills
# at every tile tried: its forward 28 bytes a thread here (556 without dropout at the default
# tiles), its backward keeps the default tiles, the fewest found, at 700 (dK/dV) and 276 (dQ)
# bytes against 348 and 164 without dropout.
_DROPOUT_16BIT = {
    64: {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 8, 3), "dq": (64, 64, 4, 3)},
    128: {"dkdv": (32, 64, 8, 3), "dq": (32, 64, 8, 3)},
    256: {"dq": (32, 32, 8, 2)},
}
_DROPOUT_FP32 = {
    64: {"fwd": (64, 32, 4, 3), "dq": (32, 32, 8, 2)},
    128: {},
    256: {"fwd": (16, 32, 8, 2)},
}
_INTERPRETER_TILES = (32, 32, 4, 1)  # the interpreter: small tiles run fastest
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tuned.json")
_tuned_cache = {}


def config_key(kernel, dtype, block_d, causal, dropout=False):
    """The key of one entry of attention_tuned.json, e.g. "fwd/16bit/d128/causal" (with
    "/dropout" appended for the dropout variants)."""
    prec = "fp32" if dtype == torch.float32 else "16bit"
    return f"{kernel}/{prec}/d{block_d}/{'causal' if causal else 'full'}" + (
        "/dropout" if dropout else "")


def _tuned(device):
    """The tuned entries for this GPU's architecture ("sm90"), read once per architecture."""
    return tuned_table(TUNED_PATH, _tuned_cache, device, "tiles")


def tiles(kernel, dtype, block_d, causal, device, dropout=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one of the three kernels."""
    if device.type != "cuda":
        return _INTERPRETER_TILES
    found = _tuned(device).get(config_key(kernel, dtype, block_d, causal, dropout))
    if found is not None:
        return found
    if dropout:
        table = _DROPOUT_FP32 if dtype == torch.float32 else _DROPOUT_16BIT
        found = table[max(64, block_d)].get(kernel)
        if found is not None:
            return found
    table = _DEFAULT_FP32 if dtype == torch.float32 else _DEFAULT_16BIT
    return table[max(64, block_d)][kernel]


# Whether the launchers shrink a tile whose grid would leave SMs without a program
# (_fill_sms). tests/test_triton_compile.py turns it off to compile the tables' own tiles at
# its small shapes, and back on for cases of the shrunk ones.
FILL_SMS = True


def atomic_dq(tiles_) -> bool:
    """Whether dK/dV tiles ask for the atomic dQ (a fifth entry, 1): the dK/dV kernel then adds
    each key block's dQ share with atomics and no dQ kernel runs (FlashAttention-2's backward:
    five products per tile pair instead of seven, for fp32 atomics into dQ; dQ's summation
    order, hence its last bits, then varies from run to run). Only a tuned entry
    (tune_attention.py, where it measured faster) turns it on."""
    return len(tiles_) > 4 and bool(tiles_[4])


def _fill_sms(tiles_, kernel, length, others, device):
    """``tiles_`` with the block a program owns (queries for fwd and dq, keys for dK/dV)
    halved (warps and stages kept) while the grid, cdiv(length, block) x others programs,
    is smaller than the GPU's SM count, down to 32: then some SMs would get no work at all,
    and halving only spreads the same work over more of them. B * H = 32 heads at T = 512
    with 128-row tiles is 128 programs, under an H100's 132 SMs. Grids of a wave or more keep
    their tiles (what tune_attention.py measured)."""
    if not FILL_SMS or device.type != "cuda":
        return tiles_
    bm, bn, warps, stages, *mode = tiles_
    sms = num_programs(device, 1 << 30, per_sm=1)
    if kernel == "dkdv":
        while bn > 32 and cdiv(length, bn) * others < sms:
            bn //= 2
    else:
        while bm > 32 and cdiv(length, bm) * others < sms:
            bm //= 2
    return (bm, bn, warps, stages, *mode)


# Suffix of a tuned entry for grids under a wave (a short sequence or few heads), measured at
# such a length (tune_attention.py --seqlen 512 --kernel-time): launch_tiles prefers it to
# _fill_sms's halving there. Entries without it are tuned at T = 4096 and hold elsewhere.
SHORT = "/short"


def _under_a_wave(tiles_, kernel, length, others, device) -> bool:
    """Whether cdiv(length, the owned block) x others programs leave an SM without work."""
    block = tiles_[1] if kernel == "dkdv" else tiles_[0]
    return cdiv(length, block) * others < num_programs(device, 1 << 30, per_sm=1)


def launch_tiles(kernel, dtype, block_d, causal, device, dropout, length, others):
    """The tiles a launcher runs: the table's (tiles()); where their grid is under a wave, the
    tuned "/short" entry for this point if there is one, else the table's halved by
    _fill_sms."""
    t = tiles(kernel, dtype, block_d, causal, device, dropout)
    if not FILL_SMS or device.type != "cuda" or not _under_a_wave(t, kernel, length, others,
                                                                   device):
        return t
    short = _tuned(device).get(config_key(kernel, dtype, block_d, causal, dropout) + SHORT)
    return short if short is not None else _fill_sms(t, kernel, length, others, device)


def _block_d(D):
    return max(16, next_pow2(D))


def _dot_mode(dtype, fp32="tf32x3"):
    """How the kernels' tl.dot runs (their DOT constexpr):
    * "native": bf16/fp16 tiles on tensor cores, fp32 accumulation;
    * "tf32x3": fp32 inputs on a GPU. Triton's default for fp32 is one TF32 pass (~1e-3
      relative error); IEEE fp32 dots run on CUDA cores with whole operand rows in registers
      and spilled kilobytes a thread on sm_90 at every tile tried. Three TF32 passes (hi*hi +
      hi*lo + lo*hi) keep the tensor-core tiles and give ~fp32 accuracy;
    * "ieee": the interpreter, for every dtype (its bf16/fp16 dot is wrong, and it computes
      in fp32 anyway).
    The decode kernel keeps IEEE fp32 (``fp32="ieee"``): its tiles are 16 query rows, small
    enough for CUDA cores without spilling (decode_blocks)."""
    if interpreting():
        return "ieee"
    return fp32 if dtype == torch.float32 else "native"


def _dropout_args(dropout_p, seed):
    """(seed, p, 1/(1-p), DROPOUT) kernel arguments; seed an int in [0, 2**63)."""
    if dropout_p > 0.0:
        return int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p), True
    return 0, 0.0, 1.0, False


def heads_inner(B, H, T, D, dtype, device):
    """An empty (B, H, T, D) tensor stored as (B, T, H, D): the layout of the outputs and
    gradients here. A model's (B, T, H * D) activations are that storage, so
    ``y.transpose(1, 2).reshape(B, T, H * D)`` and the gradients' way back to (B, T, H * D)
    are views, where a contiguous (B, H, T, D) needed a copy each (four per layer a training
    step). SDPA's flash backend returns the same layout. Contiguous (B, H, T, D) instead when
    that layout's positions would lie too far apart for the kernels' 32-bit offsets
    (fit_int32)."""
    t = torch.empty((B, T, H, D), dtype=dtype, device=device).transpose(1, 2)
    if _span(t) < 2 ** 31:
        return t
    return _compact(torch.empty((B, H, T, D), dtype=dtype, device=device))


def _span(t):
    """How many elements past a batch item and head's first element its last one lies."""
    if t.shape[2] == 0 or t.shape[3] == 0:
        return 0
    return (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)


def _compact(t):
    if _span(t) >= 2 ** 31:
        raise ValueError(
            f"attention (triton): a tensor of shape {tuple(t.shape)} holds {_span(t) + 1:,} "
            "elements for one batch item and head, past the 2**31 the Triton kernels address; "
            "use backend='cuda' (64-bit offsets) or split the sequence")
    return t


def fit_int32(t):
    """t, or a contiguous copy of it when its positions lie too far apart for the kernels.

    The kernels add a position's offset (position x its stride) to a pointer in 32-bit
    arithmetic; only the batch and head offsets are 64-bit. A tensor whose last position lies
    2**31 or more elements past its first, within one batch item and head, would wrap and read
    elsewhere: a q of 262,145 positions at 8192 wide (a (B, T, H, D) layout), or a view into a
    wide packed tensor. A contiguous (B, H, T, D) copy brings that span down to T x D. Taking
    64-bit offsets in the kernels instead would cost every call registers and address math
    for a case this rare, so the copy is paid only here."""
    if t is None or _span(t) < 2 ** 31:
        return t
    return _compact(t.contiguous())


def attention_fwd(q, k, v, causal, scale, config=None, dropout_p=0.0, seed=0):
    """q (B, Hq, T, D), k, v (B, Hkv, S, D), unit last stride -> out (heads_inner layout),
    lse fp32 (contiguous). ``config``: tiles to use instead of tiles("fwd", ...) (the tuner's
    candidates). ``dropout_p`` > 0: dropout on the probabilities, mask drawn from ``seed``
    (module doc)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v = fit_int32(q), fit_int32(k), fit_int32(v)
    out = heads_inner(B, H, T, D, q.dtype, q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    BD = _block_d(D)
    seed, p, drop_scale, dropout = _dropout_args(dropout_p, seed)
    BM, BN, warps, stages = config or launch_tiles("fwd", q.dtype, BD, causal, q.device,
                                                   dropout, T, B * H)
    grid = (cdiv(T, BM), B * H)
    dot = _dot_mode(q.dtype)
    capped_launch(
        _attn_fwd_kernel, grid, ("fwd", q.dtype, BM, BN, BD, warps, stages, causal, dot,
                                 dropout), q.device,
        q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        out.stride(2), H, T, S, D, H // Hkv,
        scale * LOG2E, seed, p, drop_scale, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
        DOT=dot, DROPOUT=dropout, num_warps=warps, num_stages=stages)
    return out, lse


def attention_bwd(do, q, k, v, out, lse, causal, scale, dkdv_config=None, dq_config=None,
                  dropout_p=0.0, seed=0, grads=None):
    """-> dq, dk, dv in the heads_inner layout, in q's dtype. ``out`` in any layout with a
    unit last stride. ``dkdv_config``/``dq_config``: tiles to use instead of
    tiles("dkdv"/"dq", ...). ``dropout_p``, ``seed``: the forward's. ``grads``: (dq, dk, dv)
    to write into instead, of q's, k's and v's shapes with unit last strides and dk's strides
    dv's (e.g. the q | k | v views of one packed (B, T, (Hq + 2 Hkv) D) gradient)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    given = None
    if grads is not None:
        dq, dk, dv = grads
        if dk.stride() != dv.stride() or any(g.stride(-1) != 1 for g in grads):
            raise ValueError("attention_bwd: grads must have unit last strides and dk's "
                             "strides dv's")
        if any(_span(g) >= 2 ** 31 for g in grads):
            given, grads = grads, None  # written in a layout that fits, copied there at the end
    if grads is None:
        dq = heads_inner(B, H, T, D, q.dtype, q.device)
        dk = heads_inner(B, Hkv, S, D, k.dtype, q.device)
        dv = heads_inner(B, Hkv, S, D, v.dtype, q.device)
    if out.stride(-1) != 1:
        out = out.contiguous()
    q, k, v, do, out = (fit_int32(t) for t in (q, k, v, do, out))
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _attention_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, causal, scale, dkdv_config,
                   dq_config, dropout_p, seed)
    if given is not None:
        for g, t in zip(given, (dq, dk, dv)):
            g.copy_(t)
        return given
    return dq, dk, dv


def _attention_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, causal, scale, dkdv_config,
                   dq_config, dropout_p, seed):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    BD = _block_d(D)
    _bwd_preprocess_kernel[(cdiv(T, 64), B * H)](
        out, do, delta, H, T, D, out.stride(0), out.stride(1), out.stride(2), do.stride(0),
        do.stride(1), do.stride(2), BLOCK_M=64, BLOCK_D=BD)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    dot = _dot_mode(q.dtype)
    drop = _dropout_args(dropout_p, seed)
    dkdv_tiles = dkdv_config or launch_tiles("dkdv", q.dtype, BD, causal, q.device, drop[3], S,
                                             B * Hkv)
    bm, bn, warps, stages = dkdv_tiles[:4]
    atomic = atomic_dq(dkdv_tiles)
    # The atomic dQ's fp32 sum: (B, H, T, D) contiguous, zeroed (dk stands in when unused).
    dqa = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device) if atomic else dk
    capped_launch(
        _bwd_dkdv_kernel, (cdiv(S, bn), B * Hkv), ("dkdv", q.dtype, bm, bn, BD, warps, stages,
                                                   causal, dot, drop[3], atomic),
        q.device, q, k, v, do, lse, delta, dk, dv, dqa, *strides, dk.stride(0), dk.stride(1),
        dk.stride(2), H, Hkv, T, S, D, rep, scale * LOG2E, scale,
        *drop[:3], CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, DOT=dot,
        DROPOUT=drop[3], ATOMIC_DQ=atomic, num_warps=warps, num_stages=stages)
    if atomic:
        dq.copy_(dqa)
        return
    bm, bn, warps, stages = dq_config or launch_tiles("dq", q.dtype, BD, causal, q.device,
                                                      drop[3], T, B * H)
    capped_launch(
        _bwd_dq_kernel, (cdiv(T, bm), B * H), ("dq", q.dtype, bm, bn, BD, warps, stages, causal,
                                               dot, drop[3]),
        q.device, q, k, v, do, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        H, T, S, D, rep, scale * LOG2E, scale,
        *drop[:3], CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, DOT=dot,
        DROPOUT=drop[3], num_warps=warps, num_stages=stages)


def decode_splits(B, Hkv, S_max, device):
    """Keys per split and number of splits: enough programs to fill the GPU (flash-decoding);
    in the interpreter a few splits of 32 keys so the combine is exercised."""
    if device.type == "cuda":
        target = num_programs(device, 1 << 30, per_sm=2)
        nsplit = max(1, min(cdiv(S_max, 256), cdiv(target, B * Hkv)))
        split_len = cdiv(cdiv(S_max, nsplit), 64) * 64
    else:
        split_len = 32
    return split_len, cdiv(S_max, split_len)


def decode_blocks(D, rep, split_len, dtype, device):
    """(BLOCK_H, BLOCK_N, BLOCK_D) for the decode split kernel. fp32 dots are IEEE, on CUDA
    cores, with their operand tiles in registers: on sm_90 a 64-key tile spills at BLOCK_D =
    128 and spills ~16 KB a thread at 256, where its three stages (276 KiB) also exceed the
    227 KiB of shared memory an H100 block can have. So an fp32 key tile holds at most 64 x 64
    elements for 16 query rows, half that for 32 (BLOCK_N 32 at 128, 16 at 256 or at 128 with
    32 rows), and fp32 launches 8 warps above 2048 query-row x head-dim elements: no spills
    (see tests/test_triton_compile.py)."""
    BD = _block_d(D)
    BH = max(16, next_pow2(rep))
    if device.type != "cuda":
        BN = 32
    elif dtype == torch.float32:
        BN = max(16, min(64, 4096 * 16 // (BD * BH)))
    else:
        BN = 64
    return BH, min(BN, split_len), BD


def _combine_chunk(nsplit, BD):
    if interpreting():
        return 2  # so the interpreter tests (a few splits) run the combine loop several times
    return max(2, min(next_pow2(nsplit), 4096 // BD))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale):
    """q (B, Hq, 1, D), caches (B, Hkv, S_max, D), cache_seqlens (B,) int32 -> out."""
    B, H, _, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    # A cache too long for 32-bit offsets in its layout is copied whole at every call, which
    # costs about as much as the decode step reads; still the right answer, where refusing
    # would end the generation.
    k_cache, v_cache = fit_int32(k_cache), fit_int32(v_cache)
    rep = H // Hkv
    split_len, nsplit = decode_splits(B, Hkv, S_max, q.device)
    BH, BN, BD = decode_blocks(D, rep, split_len, q.dtype, q.device)
    o_part = torch.empty((B, H, nsplit, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, nsplit), dtype=torch.float32, device=q.device)
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    _decode_split_kernel[(B * Hkv, nsplit)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), H, Hkv, D, rep, S_max, split_len, nsplit,
        scale * LOG2E,
        BLOCK_H=BH, BLOCK_N=BN, BLOCK_D=BD, DOT=_dot_mode(q.dtype, fp32="ieee"),
        num_warps=8 if q.dtype == torch.float32 and BH * BD > 2048 else 4)
    _decode_combine_kernel[(B * H,)](
        o_part, lse_part, out, D, nsplit, BLOCK_S=max(2, next_pow2(nsplit)),
        CHUNK=_combine_chunk(nsplit, BD), BLOCK_D=BD)
    return out
