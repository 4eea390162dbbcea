// Flash attention CUDA kernels (forward, backward, flash-decoding) and their extern "C"
// launchers, in two families:
// - Tensor cores, for bf16/fp16 with D <= 128 on sm_80 and later: FlashAttention-2's forward
//   and atomic-free backward on mma.sync, fragments through ldmatrix, tiles double-buffered
//   with cp.async (attn_fwd_mma_kernel, attn_dq_mma_kernel, attn_dkdv_mma_kernel, below).
// - CUDA cores, for everything else (fp32, D up to 256): simple and exact rather than fast,
//   fp32 math, tiles staged in shared memory as fp32. For scores a lane owns one key (or one
//   query) of a 32-wide tile and computes its dot product over the head dimension alone; for
//   the accumulations a lane owns head dims d = lane + 32 * n (n < NS, so D <= 32 * NS) and the
//   per-key (per-query) weights are broadcast with __shfl_sync.
//   forward: block = BM queries (4 warps x RPW rows) walking 32-key tiles, online softmax
//            in base 2 (q pre-multiplied by scale * log2 e), then lse = ln(2) * (m + log2 l).
//   backward (recompute P from lse, atomic-free): delta = rowsum(dO * O); dQ with the forward's
//            layout; dK/dV with a block per 32 keys (each warp owns 8 of them) looping over the
//            GQA group's query heads and their 32-query tiles.
// Neither family ever forms the T x S matrix. Decode (flash-decoding) splits the keys: a block
// per (batch, kv head, split) reads K and V once for the group's query heads in coalesced
// 16-byte packs (decode_split_vec_kernel; else a warp per query head and split), writes each
// head's partial output and base-2 logsumexp, and a combine kernel merges the splits.
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_launchers.h"

using namespace minigpt_cuda;

namespace {

constexpr int BM = 16;        // queries per forward / dQ block
constexpr int WARPS = 4;
constexpr int RPW = BM / WARPS;  // query rows per warp
constexpr int KPW = 8;        // keys per warp in the dK/dV kernel (32 keys per block)
constexpr unsigned FULL = 0xffffffffu;
constexpr float LN2F = 0.6931471805599453f;
constexpr float LOG2EF = 1.4426950408889634f;

__device__ __forceinline__ bool visible(int64_t i, int64_t j, const MgAttnGeo& g) {
  return i < g.T && j < g.S && (!g.causal || j <= i + g.S - g.T);
}

// The forward, dQ and dK/dV kernels' grid: (batch x head) row bh and sequence block blk
// (queries; keys for dK/dV), in the order a (nbh, nblk) grid runs them, bh fastest, but all on
// grid x: on grid y (at most 65535 blocks) the sequence blocks ran out at 1,048,560 queries of
// 16 a block, and the launch failed; x takes 2^31 - 1 (checked by too_many_blocks).
struct SeqBlock {
  int64_t bh, blk, nblk;
};
__device__ __forceinline__ SeqBlock seq_block(int64_t nbh) {
  const int64_t lin = blockIdx.x;
  return {lin % nbh, lin / nbh, (int64_t)gridDim.x / nbh};
}
inline dim3 seq_grid(int64_t nbh, int64_t nblk) { return dim3((unsigned)(nbh * nblk)); }

template <typename T, int NS>
__global__ void __launch_bounds__(WARPS * 32)
attn_fwd_kernel(MgAttnGeo g, const T* __restrict__ q, const T* __restrict__ k,
                const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                float qk_scale) {
  extern __shared__ float smem[];
  const int D = (int)g.D, LD = D + 1;  // +1: lane-per-key reads of a row hit distinct banks
  float* qs = smem;             // BM x D
  float* ks = qs + BM * D;      // 32 x LD
  float* vs = ks + 32 * LD;     // 32 x D
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const SeqBlock sb = seq_block(g.B * g.Hq);
  const int64_t bh = sb.bh, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const int64_t i0 = sb.blk * BM;
  const T* qb = q + b * g.qb + h * g.qh;
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    qs[idx] = (i0 + r < g.T) ? to_f(qb[(i0 + r) * g.qt + d]) * qk_scale : 0.f;
  }
  float m[RPW], l[RPW], o[RPW][NS];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int n = 0; n < NS; ++n) o[rr][n] = 0.f;
  }
  const int64_t end = g.causal ? min(g.S, i0 + BM + g.S - g.T) : g.S;
  for (int64_t j0 = 0; j0 < end; j0 += 32) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < 32 * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx % D;
      const int64_t j = j0 + jj;
      ks[jj * LD + d] = j < g.S ? to_f(kb[j * g.ks + d]) : 0.f;
      vs[jj * D + d] = j < g.S ? to_f(vb[j * g.vs + d]) : 0.f;
    }
    __syncthreads();
    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      const int64_t i = i0 + r;
      const float* qr = qs + r * D;
      const float* kr = ks + lane * LD;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
      const bool ok = visible(i, j, g);
      s = ok ? s : -INFINITY;
      // NaN counts as +inf for the max: fmaxf drops NaN, so a row of NaN scores (a NaN in q)
      // kept m = -inf, was skipped as one that has seen no key and came out 0, not NaN.
      const float m_new = fmaxf(m[rr], warp_max(s != s ? INFINITY : s));
      if (m_new == -INFINITY) continue;  // warp-uniform: this row has seen no key yet
      const float p = ok ? exp2f(s - m_new) : 0.f;
      const float alpha = exp2f(m[rr] - m_new);
      l[rr] = l[rr] * alpha + warp_sum(p);
      m[rr] = m_new;
#pragma unroll
      for (int n = 0; n < NS; ++n) o[rr][n] *= alpha;
      for (int jj = 0; jj < 32; ++jj) {
        const float pj = __shfl_sync(FULL, p, jj);
        const float* vr = vs + jj * D;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          const int d = lane + 32 * n;
          if (d < D) o[rr][n] += pj * vr[d];
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    if (i >= g.T) continue;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    T* orow = out + (bh * g.T + i) * g.D;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const int d = lane + 32 * n;
      if (d < D) orow[d] = from_f<T>(o[rr][n] * inv);
    }
    // A row that saw no key: lse = +inf, so the backward's exp2(s - lse) is 0 there. A NaN
    // row (NaN or inf in q or k) keeps lse = NaN, so its P and dV stay NaN as the reference's.
    if (lane == 0) lse[bh * g.T + i] = l[rr] == 0.f ? INFINITY : (m[rr] + log2f(l[rr])) * LN2F;
  }
}

// ---- tensor-core kernels (16-bit q/k/v, D <= 128) ---------------------------------------------
// FlashAttention-2 on mma.sync.m16n8k16 (fp32 accumulation). A block of MMA_WARPS warps, 16
// rows a warp, walks tiles staged in shared memory as loaded (16-bit), the head dimension
// padded with zeros to DP (32, 64, 96 or 128) and rows to a pitch of DP + 8 elements (+16
// bytes: the 8 rows an ldmatrix reads start in different banks). The walk is double-buffered:
// the next tile's cp.async copies are issued before the current tile's products, and one
// __syncthreads a tile both publishes the copies and frees the buffer they overwrite.
// Operand fragments come from the staged tiles through ldmatrix (.trans where the k dimension
// runs down the rows), four 8x8 matrices an instruction. The score-shaped accumulators (S, and
// in the backward dP, S^T, dP^T) are laid out as the A operand of the next product, so P and dS
// never go through shared memory. Masks are applied only on tiles that cross the causal
// diagonal or the end of the keys.
constexpr int MMA_BM = 64, MMA_BN = 64, MMA_WARPS = 4;

// c += A (16 x 16, row-major) * B (16 x 8, column-major), fp32 accumulate. Fragments as the PTX
// ISA lays them out for mma.m16n8k16 with 16-bit inputs (g = lane / 4, t = lane % 4; each 32-bit
// register holds two elements, the lower column or row in its low half):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]                       c[2], c[3] = C[g+8][2t, 2t+1]
// Off the GPU (the CPU emulator, tests/cuda_emu) the same product is formed lane by lane from
// those layouts with warp shuffles, so a kernel that gets a fragment's layout wrong fails there.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int src = 0; src < 4; ++src) {  // lanes 4g' + src hold A's and B's k = 2src.. pairs
    uint32_t ar[4];
    for (int r = 0; r < 4; ++r) ar[r] = __shfl_sync(FULL, a[r], g * 4 + src);
    const uint32_t b0c0 = __shfl_sync(FULL, b[0], (2 * t) * 4 + src);
    const uint32_t b1c0 = __shfl_sync(FULL, b[1], (2 * t) * 4 + src);
    const uint32_t b0c1 = __shfl_sync(FULL, b[0], (2 * t + 1) * 4 + src);
    const uint32_t b1c1 = __shfl_sync(FULL, b[1], (2 * t + 1) * 4 + src);
    for (int e = 0; e < 2; ++e) {  // k = 2src + e (a[0], a[1], b[0]) and k + 8 (a[2], a[3], b[1])
      const int sh = 16 * e;
      const float a0 = from_bits16<T>(ar[0] >> sh & 0xffff), a1 = from_bits16<T>(ar[1] >> sh & 0xffff);
      const float a2 = from_bits16<T>(ar[2] >> sh & 0xffff), a3 = from_bits16<T>(ar[3] >> sh & 0xffff);
      const float p0 = from_bits16<T>(b0c0 >> sh & 0xffff), p1 = from_bits16<T>(b0c1 >> sh & 0xffff);
      const float q0 = from_bits16<T>(b1c0 >> sh & 0xffff), q1 = from_bits16<T>(b1c1 >> sh & 0xffff);
      c[0] += a0 * p0 + a2 * q0;
      c[1] += a0 * p1 + a2 * q1;
      c[2] += a1 * p0 + a3 * q0;
      c[3] += a1 * p1 + a3 * q1;
    }
  }
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix.x4), one register each:
// lane l passes the address of row l % 8 of matrix l / 8 (16-byte aligned) and receives, of
// matrix m, in r[m] the elements 2 (l % 4) and 2 (l % 4) + 1 of row l / 4; with TRANS, those of
// column l / 4 in rows 2 (l % 4) and 2 (l % 4) + 1. Those are mma_16816's fragment layouts:
// an A fragment is four matrices, a B fragment two (TRANS where B's k runs down the rows).
// Off the GPU: the same from each row's address, taken from its lane by a shuffle.
template <bool TRANS, typename T>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const T* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint4 probe = *reinterpret_cast<const uint4*>(p);  // the alignment the hardware needs
  (void)probe;
  const unsigned long long mine = (unsigned long long)(uintptr_t)p;
  for (int m = 0; m < 4; ++m) {
    if constexpr (TRANS) {
      const T* r0 = (const T*)(uintptr_t)__shfl_sync(FULL, mine, m * 8 + 2 * t);
      const T* r1 = (const T*)(uintptr_t)__shfl_sync(FULL, mine, m * 8 + 2 * t + 1);
      r[m] = bits16(r0[g]) | (bits16(r1[g]) << 16);
    } else {
      const T* row = (const T*)(uintptr_t)__shfl_sync(FULL, mine, m * 8 + g);
      r[m] = *reinterpret_cast<const uint32_t*>(row + 2 * t);
    }
  }
#endif
}

// Two values as one 32-bit register of 16-bit elements, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(from_f<T>(lo)) | (bits16(from_f<T>(hi)) << 16);
}

// Rows row0 .. row0 + ROWS - 1 of a (L, D) matrix with row stride `ld` (elements) into shared
// memory rows of pitch DP + 8, zeros past L and past D. vec (rows and D whole 16-byte packs):
// cp.async copies the caller commits and waits for; else plain loads and stores.
template <typename T, int DP, int ROWS>
__device__ __forceinline__ void mma_stage(T* dst, const T* __restrict__ src, int64_t ld,
                                          int64_t row0, int64_t L, int D, bool vec) {
  constexpr int LDS = DP + 8;
  if (vec) {
    constexpr int CH = DP / 8;  // 16-byte chunks a row
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += blockDim.x) {
      const int r = idx / CH, c = (idx % CH) * 8;
      T* d = dst + r * LDS + c;
      if (row0 + r < L && c < D) cp_async16(d, src + (row0 + r) * ld + c);
      else *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += blockDim.x) {
      const int r = idx / DP, c = idx % DP;
      dst[r * LDS + c] = (row0 + r < L && c < D) ? src[(row0 + r) * ld + c] : from_f<T>(0.f);
    }
  }
}

// The K and V tiles of keys j0 .. j0 + MMA_BN - 1 into one buffer (K, then V, a tile of
// MMA_BN rows each), as one cp.async batch.
template <typename T, int DP>
__device__ __forceinline__ void stage_kv(T* dst, const T* __restrict__ kb,
                                         const T* __restrict__ vb, const MgAttnGeo& g,
                                         int64_t j0, bool vec) {
  mma_stage<T, DP, MMA_BN>(dst, kb, g.ks, j0, g.S, (int)g.D, vec);
  mma_stage<T, DP, MMA_BN>(dst + MMA_BN * (DP + 8), vb, g.vs, j0, g.S, (int)g.D, vec);
  cp_async_commit();
}

// This lane's place in a tensor-core block (MMA_WARPS warps of 16 rows each): its lane, gr =
// lane / 4 and tc = lane % 4 as mma_16816's fragment layouts use them, and w0, its warp's
// first row of the block (the lane's own rows are w0 + gr and w0 + gr + 8).
struct MmaLane {
  int lane, gr, tc, w0;
};
__device__ __forceinline__ MmaLane mma_lane() {
  const int lane = threadIdx.x & 31;
  return {lane, lane >> 2, lane & 3, (int)(threadIdx.x >> 5) * 16};
}

// The A fragment of rows w0 .. w0 + 15, k-step kk, of a staged tile with pitch LDS: matrices
// (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
template <typename T, int LDS>
__device__ __forceinline__ void mma_a_frag(uint32_t (&a)[4], const T* tile, int w0, int kk,
                                           int lane) {
  const int m = lane >> 3;
  ldsm_x4<false>(a, tile + (w0 + (lane & 7) + (m & 1) * 8) * LDS + kk * 16 + (m >> 1) * 8);
}

// B fragments of B[k][n] = tile[n][k] (a product with a staged tile transposed), k-step kk, for
// the n-tiles n0 (b[0], b[1]) and n0 + 8 (b[2], b[3]): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15).
template <typename T, int LDS>
__device__ __forceinline__ void mma_bt_frag2(uint32_t (&b)[4], const T* tile, int n0, int kk,
                                             int lane) {
  const int m = lane >> 3;
  ldsm_x4<false>(b, tile + (n0 + (lane & 7) + (m >> 1) * 8) * LDS + kk * 16 + (m & 1) * 8);
}

// B fragments of B[k][n] = tile[k][n] (a staged tile as it is: k runs down rows), rows k0 ..
// k0 + 15, for the n-tiles n0 (b[0], b[1]) and n0 + 8 (b[2], b[3]): transposed matrices
// (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <typename T, int LDS>
__device__ __forceinline__ void mma_b_frag2(uint32_t (&b)[4], const T* tile, int k0, int n0,
                                            int lane) {
  const int m = lane >> 3;
  ldsm_x4<true>(b, tile + (k0 + (lane & 7) + (m & 1) * 8) * LDS + n0 + (m >> 1) * 8);
}

// An accumulator pair of n-tiles (2 kj, 2 kj + 1) as the A fragment for k-step kj.
template <typename T>
__device__ __forceinline__ void acc_as_a(uint32_t (&a)[4], const float (&lo)[4],
                                         const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// acc += P tile: the warp's 16 x (NT * 8) score-shaped accumulators `sc` (P, dS, P^T or dS^T)
// as A operands, k-step kj from n-tiles 2 kj and 2 kj + 1, times the staged tile's first NT * 8
// rows (the k dimension) and DT * 8 columns: O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <typename T, int LDS, int NT, int DT>
__device__ __forceinline__ void mma_acc_tile(float (&acc)[DT][4], const float (&sc)[NT][4],
                                             const T* tile, int lane) {
#pragma unroll
  for (int kj = 0; kj < NT / 2; ++kj) {
    uint32_t a[4];
    acc_as_a<T>(a, sc[2 * kj], sc[2 * kj + 1]);
#pragma unroll
    for (int d = 0; d < DT; d += 2) {
      uint32_t b[4];
      mma_b_frag2<T, LDS>(b, tile, kj * 16, d * 8, lane);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_16816<T>(acc[d], a, b0);
      mma_16816<T>(acc[d + 1], a, b1);
    }
  }
}

// c = A B^T for the warp's 16 rows (from w0) of staged tile A against the NT * 8 rows of staged
// tile B, over KD k-steps; A's fragments from registers (af) or, with af null, from the tile.
template <typename T, int LDS, int KD, int NT>
__device__ __forceinline__ void mma_nt(float (&c)[NT][4], const uint32_t (*af)[4], const T* a,
                                       int w0, const T* b, int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    uint32_t fa[4];
    if (af) {
#pragma unroll
      for (int i = 0; i < 4; ++i) fa[i] = af[kk][i];
    } else {
      mma_a_frag<T, LDS>(fa, a, w0, kk, lane);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t fb[4];
      mma_bt_frag2<T, LDS>(fb, b, nt * 8, kk, lane);
      const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
      mma_16816<T>(c[nt], fa, b0);
      mma_16816<T>(c[nt + 1], fa, b1);
    }
  }
}

// A warp's accumulator (16 rows x DT n-tiles, this lane's rows `row[0]`, `row[1]` of `n`) into
// the contiguous (n, D) matrix `out`, row r's values times mul[r].
template <typename T, int DT>
__device__ __forceinline__ void store_acc(T* __restrict__ out, const float (&acc)[DT][4],
                                          const int64_t (&row)[2], const float (&mul)[2],
                                          int64_t n, int D, int tc) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= n) continue;
    T* o = out + row[r] * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = dt * 8 + 2 * tc + e;
        if (d < D) o[d] = from_f<T>(acc[dt][2 * r + e] * mul[r]);
      }
  }
}

// A query block of the forward and dQ kernels (seq_grid: B * Hq, then query blocks): its (batch,
// head) row bh, batch, head, kv head, and first query. Causal, the last query blocks walk the
// most keys: they take the first block indices, so that they start in the first wave rather
// than leave a tail of long blocks at the end.
struct MmaQueryBlock {
  int64_t bh, b, h, hk, i0;
};
__device__ __forceinline__ MmaQueryBlock mma_query_block(const MgAttnGeo& g) {
  const SeqBlock sb = seq_block(g.B * g.Hq);
  const int64_t bh = sb.bh, h = bh % g.Hq;
  const int64_t qb = g.causal ? sb.nblk - 1 - sb.blk : sb.blk;
  return {bh, bh / g.Hq, h, h / (g.Hq / g.Hkv), qb * MMA_BM};
}

// Whether a tile of queries from i0 sees every key of j0 .. j0 + cols - 1, so that it needs no
// mask: its first query does (later ones see more; rows past T are the zero rows of a partial
// block: computed, never stored).
__device__ __forceinline__ bool tile_unmasked(const MgAttnGeo& g, int64_t i0, int64_t j0,
                                              int cols) {
  return j0 + cols <= g.S && (!g.causal || j0 + cols - 1 <= i0 + g.S - g.T);
}

// Forward. Q's fragments stay in registers for the whole walk; Q is staged in the second
// buffer's K slot, free until the first prefetch (the tiles and the query block are 64 rows).
template <typename T, int DP>
__global__ void __launch_bounds__(MMA_WARPS * 32)
attn_fwd_mma_kernel(MgAttnGeo g, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                    float qk_scale, int vec) {
  static_assert(MMA_BM == MMA_BN, "Q is staged in a K buffer");
  constexpr int LDS = DP + 8, TILE = MMA_BN * LDS;
  constexpr int KD = DP / 16, NT = MMA_BN / 8, DT = DP / 8;
  extern __shared__ uint4 mma_smem[];
  T* const buf = reinterpret_cast<T*>(mma_smem);  // K0, V0, K1, V1
  const auto [lane, gr, tc, w0] = mma_lane();
  const auto [bh, b, h, hk, i0] = mma_query_block(g);
  const int D = (int)g.D;
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  const int64_t end = g.causal ? min(g.S, i0 + MMA_BM + g.S - g.T) : g.S;
  mma_stage<T, DP, MMA_BM>(buf + 2 * TILE, q + b * g.qb + h * g.qh, g.qt, i0, g.T, D, vec);
  stage_kv<T, DP>(buf, kb, vb, g, 0, vec);
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) mma_a_frag<T, LDS>(qf[kk], buf + 2 * TILE, w0, kk, lane);
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int64_t rows[2] = {i0 + w0 + gr, i0 + w0 + gr + 8};
  int cur = 0;
  for (int64_t j0 = 0; j0 < end; j0 += MMA_BN, cur ^= 1) {
    // Tile j0 has landed (the wait below, or before the loop); every warp is done with the
    // previous tile (and, the first time, has its Q fragments), so its buffer takes the next.
    __syncthreads();
    if (j0 + MMA_BN < end) stage_kv<T, DP>(buf + 2 * TILE * (cur ^ 1), kb, vb, g, j0 + MMA_BN, vec);
    const T* Ks = buf + 2 * TILE * cur;
    const T* Vs = Ks + TILE;
    float s[NT][4];  // S = Q K^T
    mma_nt<T, LDS, KD, NT>(s, qf, nullptr, w0, Ks, lane);
    // Online softmax in base 2 on the lane's two rows; a row's 4 lanes (same gr) share it.
    float mx[2] = {-INFINITY, -INFINITY};
    const bool unmasked = tile_unmasked(g, i0, j0, MMA_BN);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * qk_scale;
        if (!unmasked && !visible(rows[e >> 1], j0 + nt * 8 + 2 * tc + (e & 1), g)) x = -INFINITY;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float base[2], alpha[2], rsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: exp2(-inf) = 0
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = m_new;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - base[e >> 1]);
        s[nt][e] = p;
        rsum[e >> 1] += p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rsum[r] += __shfl_xor_sync(FULL, rsum[r], 1);
      rsum[r] += __shfl_xor_sync(FULL, rsum[r], 2);
      l[r] = l[r] * alpha[r] + rsum[r];
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
    mma_acc_tile<T, LDS, NT, DT>(o, s, Vs, lane);  // O += P V, P straight from S's registers
    cp_async_wait_all();  // the next tile's copies, in flight during this tile's products
  }
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
  store_acc<T, DT>(out + bh * g.T * g.D, o, rows, inv, g.T, D, tc);
#pragma unroll
  for (int r = 0; r < 2; ++r)  // as the other forward: a row that saw no key gets lse = +inf
    if (tc == 0 && rows[r] < g.T)
      lse[bh * g.T + rows[r]] = l[r] == 0.f ? INFINITY : (m[r] + log2f(l[r])) * LN2F;
}

// ---- tensor-core backward (16-bit, D <= 128): FlashAttention-2's, without atomics ------------
// Two kernels as the CUDA-core backward: dQ with a block per 64 queries walking the key tiles,
// and dK/dV with a block per 64 keys walking the GQA group's query heads and their query tiles.
// Each recomputes P = exp2(S * scale * log2 e - lse * log2 e) from the forward's logsumexp and
// dS = P (dP - delta), delta = rowsum(dO o O) (attn_delta_kernel). The dK/dV kernel computes
// S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T come out of the accumulators in the
// layout of the A operand of dV += P^T dO and dK += dS^T Q, as P does in the forward. The
// stationary operands (Q and dO; K and V) stay in shared memory and are read as fragments one
// k-step at a time, keeping registers for the accumulators; the walked tiles are
// double-buffered as in the forward.

template <typename T, int DP>
__global__ void __launch_bounds__(MMA_WARPS * 32)
attn_dq_mma_kernel(MgAttnGeo g, const T* __restrict__ dout, int64_t db, int64_t dh, int64_t dt,
                   const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const float* __restrict__ lse, const float* __restrict__ delta,
                   T* __restrict__ dq, float qk_scale, float scale, int vec) {
  constexpr int LDS = DP + 8, TILE = MMA_BN * LDS, KD = DP / 16, NT = MMA_BN / 8, DT = DP / 8;
  extern __shared__ uint4 mma_smem[];
  T* Qs = reinterpret_cast<T*>(mma_smem);
  T* dOs = Qs + MMA_BM * LDS;
  T* const buf = dOs + MMA_BM * LDS;  // K0, V0, K1, V1
  const auto [lane, gr, tc, w0] = mma_lane();
  const auto [bh, b, h, hk, i0] = mma_query_block(g);
  const int D = (int)g.D;
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  const int64_t end = g.causal ? min(g.S, i0 + MMA_BM + g.S - g.T) : g.S;
  mma_stage<T, DP, MMA_BM>(Qs, q + b * g.qb + h * g.qh, g.qt, i0, g.T, D, vec);
  mma_stage<T, DP, MMA_BM>(dOs, dout + b * db + h * dh, dt, i0, g.T, D, vec);
  stage_kv<T, DP>(buf, kb, vb, g, 0, vec);  // one batch with Q and dO
  const int64_t rows[2] = {i0 + w0 + gr, i0 + w0 + gr + 8};
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = rows[r] < g.T ? lse[bh * g.T + rows[r]] * LOG2EF : INFINITY;
    dl[r] = rows[r] < g.T ? delta[bh * g.T + rows[r]] : 0.f;
  }
  float acc[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  cp_async_wait_all();
  int cur = 0;
  for (int64_t j0 = 0; j0 < end; j0 += MMA_BN, cur ^= 1) {
    __syncthreads();  // tile j0 has landed; every warp is done with the other buffer
    if (j0 + MMA_BN < end) stage_kv<T, DP>(buf + 2 * TILE * (cur ^ 1), kb, vb, g, j0 + MMA_BN, vec);
    const T* Ks = buf + 2 * TILE * cur;
    const T* Vs = Ks + TILE;
    float s[NT][4], dp[NT][4];
    mma_nt<T, LDS, KD, NT>(s, nullptr, Qs, w0, Ks, lane);    // S = Q K^T
    mma_nt<T, LDS, KD, NT>(dp, nullptr, dOs, w0, Vs, lane);  // dP = dO V^T
    const bool unmasked = tile_unmasked(g, i0, j0, MMA_BN);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool vis = unmasked || visible(rows[e >> 1], j0 + nt * 8 + 2 * tc + (e & 1), g);
        const float p = vis ? exp2f(s[nt][e] * qk_scale - lse2[e >> 1]) : 0.f;
        // dS = 0 where masked, not 0 * (dP - delta): no NaN of v or of a row through a hidden pair
        s[nt][e] = vis ? p * (dp[nt][e] - dl[e >> 1]) : 0.f;  // dS
      }
    mma_acc_tile<T, LDS, NT, DT>(acc, s, Ks, lane);  // dQ += dS K
    cp_async_wait_all();
  }
  const float mul[2] = {scale, scale};
  store_acc<T, DT>(dq + bh * g.T * g.D, acc, rows, mul, g.T, D, tc);
}

// The query tile i0 .. i0 + BQ - 1 of query head h for a dK/dV block: Q, dO, and the rows'
// lse (base 2) and delta.
template <typename T, int DP, int BQ>
__device__ __forceinline__ void dkdv_stage(T* Qs, T* dOs, float* lse2s, float* dls,
                                           const MgAttnGeo& g, const T* __restrict__ q,
                                           const T* __restrict__ dout, int64_t db, int64_t dh,
                                           int64_t dt, const float* __restrict__ lse,
                                           const float* __restrict__ delta, int64_t b,
                                           int64_t h, int64_t i0, bool vec) {
  const int64_t qh = b * g.Hq + h;
  mma_stage<T, DP, BQ>(Qs, q + b * g.qb + h * g.qh, g.qt, i0, g.T, (int)g.D, vec);
  mma_stage<T, DP, BQ>(dOs, dout + b * db + h * dh, dt, i0, g.T, (int)g.D, vec);
  for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
    const int64_t i = i0 + r;
    lse2s[r] = i < g.T ? lse[qh * g.T + i] * LOG2EF : INFINITY;  // padded rows: P = 0
    dls[r] = i < g.T ? delta[qh * g.T + i] : 0.f;
  }
}

template <typename T, int DP, int BQ>
__global__ void __launch_bounds__(MMA_WARPS * 32)
attn_dkdv_mma_kernel(MgAttnGeo g, const T* __restrict__ dout, int64_t db, int64_t dh,
                     int64_t dt, const T* __restrict__ q, const T* __restrict__ k,
                     const T* __restrict__ v, const float* __restrict__ lse,
                     const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                     float qk_scale, float scale, int vec) {
  constexpr int LDS = DP + 8, KD = DP / 16, NT = BQ / 8, DT = DP / 8;
  constexpr int QTILE = BQ * LDS;  // one buffer: Q, dO (16-bit), then lse2, delta (fp32)
  constexpr int BUF = 2 * QTILE + 2 * BQ * (int)(sizeof(float) / sizeof(T));
  extern __shared__ uint4 mma_smem[];
  T* Ks = reinterpret_cast<T*>(mma_smem);
  T* Vs = Ks + MMA_BN * LDS;
  T* const buf = Vs + MMA_BN * LDS;
  const auto [lane, gr, tc, w0] = mma_lane();  // this lane's keys: w0 + gr and w0 + gr + 8
  const int D = (int)g.D;
  const SeqBlock sb = seq_block(g.B * g.Hkv);
  const int64_t bh = sb.bh, b = bh / g.Hkv, hk = bh % g.Hkv, rep = g.Hq / g.Hkv;
  const int64_t j0 = sb.blk * MMA_BN;
  // The first query that sees key j0 is j0 - (S - T); it is < T as j0 < S.
  const int64_t lo = g.causal ? max((int64_t)0, j0 - (g.S - g.T)) / BQ * BQ : 0;
  // The walk: the GQA group's query heads one after another, each from query tile `lo`.
  const int64_t tiles = rep * ((g.T - lo + BQ - 1) / BQ);
  mma_stage<T, DP, MMA_BN>(Ks, k + b * g.kb + hk * g.kh, g.ks, j0, g.S, D, vec);
  mma_stage<T, DP, MMA_BN>(Vs, v + b * g.vb + hk * g.vh, g.vs, j0, g.S, D, vec);
  auto bufs = [&](int c, T*& Qs, T*& dOs, float*& lse2s, float*& dls) {
    Qs = buf + c * BUF;
    dOs = Qs + QTILE;
    lse2s = reinterpret_cast<float*>(dOs + QTILE);
    dls = lse2s + BQ;
  };
  {
    T *Qs, *dOs;
    float *lse2s, *dls;
    bufs(0, Qs, dOs, lse2s, dls);
    dkdv_stage<T, DP, BQ>(Qs, dOs, lse2s, dls, g, q, dout, db, dh, dt, lse, delta, b,
                          hk * rep, lo, vec);
  }
  cp_async_commit();
  const int64_t keys[2] = {j0 + w0 + gr, j0 + w0 + gr + 8};
  float adk[DT][4], adv[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[d][e] = adv[d][e] = 0.f;
  cp_async_wait_all();
  // i0: this tile's first query; nh, ni: the next tile's query head and first query
  int64_t i0 = lo, nh = hk * rep, ni = lo;
  for (int64_t u = 0; u < tiles; ++u, i0 = ni) {
    __syncthreads();  // tile u has landed; every warp is done with the other buffer
    ni += BQ;
    if (ni >= g.T) {
      ni = lo;
      ++nh;
    }
    if (u + 1 < tiles) {
      T *Qn, *dOn;
      float *ln, *dn;
      bufs((int)((u + 1) & 1), Qn, dOn, ln, dn);
      dkdv_stage<T, DP, BQ>(Qn, dOn, ln, dn, g, q, dout, db, dh, dt, lse, delta, b, nh, ni, vec);
      cp_async_commit();
    }
    T *Qs, *dOs;
    float *lse2s, *dls;
    bufs((int)(u & 1), Qs, dOs, lse2s, dls);
    // S^T = K Q^T, dP^T = V dO^T: rows this warp's keys, columns the tile's queries
    float st[NT][4], dpt[NT][4];
    mma_nt<T, LDS, KD, NT>(st, nullptr, Ks, w0, Qs, lane);
    mma_nt<T, LDS, KD, NT>(dpt, nullptr, Vs, w0, dOs, lane);
    const bool unmasked = tile_unmasked(g, i0, j0, MMA_BN);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = nt * 8 + 2 * tc + (e & 1);
        const bool vis = unmasked || visible(i0 + qc, keys[e >> 1], g);
        const float p = vis ? exp2f(st[nt][e] * qk_scale - lse2s[qc]) : 0.f;
        st[nt][e] = p;                                        // P^T
        dpt[nt][e] = vis ? p * (dpt[nt][e] - dls[qc]) : 0.f;  // dS^T, 0 where masked
      }
    mma_acc_tile<T, LDS, NT, DT>(adv, st, dOs, lane);  // dV += P^T dO
    mma_acc_tile<T, LDS, NT, DT>(adk, dpt, Qs, lane);  // dK += dS^T Q
    cp_async_wait_all();
  }
  const float mk[2] = {scale, scale}, mv[2] = {1.f, 1.f};
  store_acc<T, DT>(dk + bh * g.S * g.D, adk, keys, mk, g.S, D, tc);
  store_acc<T, DT>(dv + bh * g.S * g.D, adv, keys, mv, g.S, D, tc);
}

template <typename T>
__global__ void attn_delta_kernel(const T* __restrict__ dout, int64_t db, int64_t dh, int64_t dt,
                                  const T* __restrict__ out, float* __restrict__ delta, int64_t Hq,
                                  int64_t T_, int64_t D, int64_t rows) {
  const int64_t row = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t t = row % T_, bh = row / T_, b = bh / Hq, h = bh % Hq;
  const T* d_ = dout + b * db + h * dh + t * dt;
  const T* o = out + row * D;
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) s += to_f(d_[d]) * to_f(o[d]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

template <typename T, int NS>
__global__ void __launch_bounds__(WARPS * 32)
attn_dq_kernel(MgAttnGeo g, const T* __restrict__ dout, int64_t db, int64_t dh, int64_t dt,
               const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const float* __restrict__ lse, const float* __restrict__ delta,
               T* __restrict__ dq, float qk_scale, float scale) {
  extern __shared__ float smem[];
  const int D = (int)g.D, LD = D + 1;
  float* qs = smem;            // BM x D, scaled like the forward
  float* dos = qs + BM * D;    // BM x D
  float* ks = dos + BM * D;    // 32 x LD
  float* vs = ks + 32 * LD;    // 32 x LD
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const SeqBlock sb = seq_block(g.B * g.Hq);
  const int64_t bh = sb.bh, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const int64_t i0 = sb.blk * BM;
  const T* qb = q + b * g.qb + h * g.qh;
  const T* dob = dout + b * db + h * dh;
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const bool in = i0 + r < g.T;
    qs[idx] = in ? to_f(qb[(i0 + r) * g.qt + d]) * qk_scale : 0.f;
    dos[idx] = in ? to_f(dob[(i0 + r) * dt + d]) : 0.f;
  }
  float lse2[RPW], dl[RPW], acc[RPW][NS];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    lse2[rr] = i < g.T ? lse[bh * g.T + i] * LOG2EF : INFINITY;
    dl[rr] = i < g.T ? delta[bh * g.T + i] : 0.f;
#pragma unroll
    for (int n = 0; n < NS; ++n) acc[rr][n] = 0.f;
  }
  const int64_t end = g.causal ? min(g.S, i0 + BM + g.S - g.T) : g.S;
  for (int64_t j0 = 0; j0 < end; j0 += 32) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < 32 * D; idx += blockDim.x) {
      const int jj = idx / D, d = idx % D;
      const int64_t j = j0 + jj;
      ks[jj * LD + d] = j < g.S ? to_f(kb[j * g.ks + d]) : 0.f;
      vs[jj * LD + d] = j < g.S ? to_f(vb[j * g.vs + d]) : 0.f;
    }
    __syncthreads();
    const int64_t j = j0 + lane;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr;
      const int64_t i = i0 + r;
      if (i >= g.T) continue;  // warp-uniform
      const float* qr = qs + r * D;
      const float* dr = dos + r * D;
      const float* kr = ks + lane * LD;
      const float* vr = vs + lane * LD;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        s += qr[d] * kr[d];
        dp += dr[d] * vr[d];
      }
      const bool vis = visible(i, j, g);
      const float p = vis ? exp2f(s - lse2[rr]) : 0.f;
      const float ds = vis ? p * (dp - dl[rr]) : 0.f;  // 0 where masked, as above
      for (int jj = 0; jj < 32; ++jj) {
        const float dsj = __shfl_sync(FULL, ds, jj);
        const float* krow = ks + jj * LD;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          const int d = lane + 32 * n;
          if (d < D) acc[rr][n] += dsj * krow[d];
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int64_t i = i0 + warp * RPW + rr;
    if (i >= g.T) continue;
    T* row = dq + (bh * g.T + i) * g.D;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const int d = lane + 32 * n;
      if (d < D) row[d] = from_f<T>(acc[rr][n] * scale);
    }
  }
}

template <typename T, int NS>
__global__ void __launch_bounds__(WARPS * 32)
attn_dkdv_kernel(MgAttnGeo g, const T* __restrict__ dout, int64_t db, int64_t dh, int64_t dt,
                 const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const float* __restrict__ lse, const float* __restrict__ delta,
                 T* __restrict__ dk, T* __restrict__ dv, float qk_scale) {
  extern __shared__ float smem[];
  const int D = (int)g.D, LD = D + 1;
  float* ks = smem;            // 32 x D (a warp reads one key row at a time: broadcast)
  float* vs = ks + 32 * D;     // 32 x D
  float* qs = vs + 32 * D;     // 32 x LD (lane-per-query reads)
  float* dos = qs + 32 * LD;   // 32 x LD
  float* lse2s = dos + 32 * LD;  // 32
  float* dls = lse2s + 32;       // 32
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const SeqBlock sb = seq_block(g.B * g.Hkv);
  const int64_t bh = sb.bh, b = bh / g.Hkv, hk = bh % g.Hkv, rep = g.Hq / g.Hkv;
  const int64_t j0 = sb.blk * 32;
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  for (int idx = threadIdx.x; idx < 32 * D; idx += blockDim.x) {
    const int jj = idx / D, d = idx % D;
    const int64_t j = j0 + jj;
    ks[idx] = j < g.S ? to_f(kb[j * g.ks + d]) : 0.f;
    vs[idx] = j < g.S ? to_f(vb[j * g.vs + d]) : 0.f;
  }
  float adk[KPW][NS], adv[KPW][NS];
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk)
#pragma unroll
    for (int n = 0; n < NS; ++n) adk[kk][n] = adv[kk][n] = 0.f;
  // The first query that sees key j0 is j0 - (S - T).
  const int64_t lo = g.causal ? max((int64_t)0, j0 - (g.S - g.T)) / 32 * 32 : 0;
  for (int64_t gi = 0; gi < rep; ++gi) {
    const int64_t h = hk * rep + gi, qh = b * g.Hq + h;
    const T* qb = q + b * g.qb + h * g.qh;
    const T* dob = dout + b * db + h * dh;
    for (int64_t i0 = lo; i0 < g.T; i0 += 32) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < 32 * D; idx += blockDim.x) {
        const int r = idx / D, d = idx % D;
        const bool in = i0 + r < g.T;
        qs[r * LD + d] = in ? to_f(qb[(i0 + r) * g.qt + d]) * qk_scale : 0.f;
        dos[r * LD + d] = in ? to_f(dob[(i0 + r) * dt + d]) : 0.f;
      }
      if (threadIdx.x < 32) {
        const int64_t i = i0 + threadIdx.x;
        // Padded query rows: lse = +inf, so P = 0.
        lse2s[threadIdx.x] = i < g.T ? lse[qh * g.T + i] * LOG2EF : INFINITY;
        dls[threadIdx.x] = i < g.T ? delta[qh * g.T + i] : 0.f;
      }
      __syncthreads();
      const int64_t i = i0 + lane;
      const float* qr = qs + lane * LD;
      const float* dr = dos + lane * LD;
#pragma unroll
      for (int kk = 0; kk < KPW; ++kk) {
        const int jl = warp * KPW + kk;
        const int64_t j = j0 + jl;
        if (j >= g.S) break;  // warp-uniform
        const float* kr = ks + jl * D;
        const float* vr = vs + jl * D;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          s += qr[d] * kr[d];
          dp += dr[d] * vr[d];
        }
        const bool vis = visible(i, j, g);
        const float p = vis ? exp2f(s - lse2s[lane]) : 0.f;
        const float ds = vis ? p * (dp - dls[lane]) : 0.f;  // 0 where masked, as above
        for (int ii = 0; ii < 32; ++ii) {
          const float pi = __shfl_sync(FULL, p, ii);
          const float dsi = __shfl_sync(FULL, ds, ii);
          const float* qrow = qs + ii * LD;
          const float* drow = dos + ii * LD;
#pragma unroll
          for (int n = 0; n < NS; ++n) {
            const int d = lane + 32 * n;
            if (d < D) {
              adv[kk][n] += pi * drow[d];
              adk[kk][n] += dsi * qrow[d];
            }
          }
        }
      }
    }
  }
  // q was scaled by scale * log2(e): dK = scale * dSᵀ q = ln(2) * dSᵀ (scaled q).
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int64_t j = j0 + warp * KPW + kk;
    if (j >= g.S) break;
    T* dkr = dk + (bh * g.S + j) * g.D;
    T* dvr = dv + (bh * g.S + j) * g.D;
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const int d = lane + 32 * n;
      if (d < D) {
        dkr[d] = from_f<T>(adk[kk][n] * LN2F);
        dvr[d] = from_f<T>(adv[kk][n]);
      }
    }
  }
}

// One warp per (query head, split): keys [split * split_len, min(+split_len, seqlen)).
template <typename T, int NS>
__global__ void decode_split_kernel(MgAttnGeo g, const T* __restrict__ q,
                                    const T* __restrict__ k, const T* __restrict__ v,
                                    const int32_t* __restrict__ seqlens,
                                    float* __restrict__ o_part, float* __restrict__ lse_part,
                                    int64_t nsplit, int64_t split_len, float qk_scale) {
  extern __shared__ float qs[];  // D
  const int lane = threadIdx.x;
  const int D = (int)g.D;
  const int64_t split = blockIdx.y, bh = blockIdx.x, b = bh / g.Hq, h = bh % g.Hq;
  const int64_t hk = h / (g.Hq / g.Hkv);
  const T* qb = q + b * g.qb + h * g.qh;
  for (int d = lane; d < D; d += 32) qs[d] = to_f(qb[d]) * qk_scale;
  __syncwarp();
  const int64_t L = min((int64_t)seqlens[b], g.S);
  const int64_t lo = split * split_len, hi = min(lo + split_len, L);
  const T* kb = k + b * g.kb + hk * g.kh;
  const T* vb = v + b * g.vb + hk * g.vh;
  float m = -INFINITY, l = 0.f, o[NS];
#pragma unroll
  for (int n = 0; n < NS; ++n) o[n] = 0.f;
  for (int64_t j0 = lo; j0 < hi; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool ok = j < hi;
    float s = -INFINITY;
    if (ok) {
      const T* kr = kb + j * g.ks;
      s = 0.f;
      for (int d = 0; d < D; ++d) s += qs[d] * to_f(kr[d]);
    }
    // Finite (lane 0's key is valid) or +inf: a NaN score (a NaN in q or k) counts as +inf,
    // as in attn_fwd_kernel, so the NaN reaches l and the output instead of being dropped.
    const float m_new = fmaxf(m, warp_max(s != s ? INFINITY : s));
    const float p = ok ? exp2f(s - m_new) : 0.f;
    const float alpha = exp2f(m - m_new);
    l = l * alpha + warp_sum(p);
    m = m_new;
    const int nk = (int)min((int64_t)32, hi - j0);
#pragma unroll
    for (int n = 0; n < NS; ++n) o[n] *= alpha;
    for (int jj = 0; jj < nk; ++jj) {
      const float pj = __shfl_sync(FULL, p, jj);
      const T* vr = vb + (j0 + jj) * g.vs;
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const int d = lane + 32 * n;
        if (d < D) o[n] += pj * to_f(vr[d]);
      }
    }
  }
  const int64_t part = bh * nsplit + split;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    const int d = lane + 32 * n;
    if (d < D) o_part[part * D + d] = o[n] * inv;
  }
  // An empty split (past this sequence's length) gets weight exp2(-inf) = 0 in the combine;
  // a NaN one keeps its NaN (m + log2(NaN)) for the combine to pass on.
  if (lane == 0) lse_part[part] = (l > 0.f || l != l) ? m + log2f(l) : -INFINITY;
}

// Flash-decoding's split kernel where rows are whole 16-byte packs (16-byte aligned): a block
// of DEC_WARPS warps per (batch, kv head, split, chunk of up to REP of the group's query heads),
// so K and V are read once for all of those heads, in coalesced 16-byte packs: LPK lanes a key
// (D / pack rounded up to a power of two), 32 / LPK keys a warp at a time. Each key slot keeps
// its own online softmax over the keys it visits; the slots meet in shared memory at the end.
// (decode_split_kernel, a warp per query head with a lane per key, read K with a 2*D-byte
// stride between lanes: 7% of an H100's bandwidth at 64k keys.)
constexpr int DEC_WARPS = 4;

template <typename T, int REP>
__global__ void __launch_bounds__(DEC_WARPS * 32)
decode_split_vec_kernel(MgAttnGeo g, const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const int32_t* __restrict__ seqlens,
                        float* __restrict__ o_part, float* __restrict__ lse_part, int64_t nsplit,
                        int64_t split_len, float qk_scale, int lpk) {
  constexpr int V = Pack<T>::kN;
  extern __shared__ float dsm[];  // per (slot, head): m, l, then the unnormalized output (D)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = (int)g.D, kpw = 32 / lpk, nslots = DEC_WARPS * kpw;
  const int slot = warp * kpw + lane / lpk, d0 = (lane % lpk) * V;
  const bool dok = d0 < D;
  const int64_t split = blockIdx.y, b = blockIdx.x / g.Hkv, hk = blockIdx.x % g.Hkv;
  const int64_t rep = g.Hq / g.Hkv, h0 = hk * rep + (int64_t)blockIdx.z * REP;
  const int nh = (int)min((int64_t)REP, hk * rep + rep - h0);
  float qv[REP][V], m[REP], l[REP], o[REP][V];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      o[r][i] = 0.f;
      qv[r][i] = (r < nh && dok) ? to_f(q[b * g.qb + (h0 + r) * g.qh + d0 + i]) * qk_scale : 0.f;
    }
  }
  const int64_t L = max((int64_t)0, min((int64_t)seqlens[b], g.S));
  const int64_t lo = split * split_len, hi = min(lo + split_len, L);
  const T* kb = k + b * g.kb + hk * g.kh + d0;
  const T* vb = v + b * g.vb + hk * g.vh + d0;
  // One key ahead: the next key's loads are in flight while this one is reduced.
  float kn[V], vn[V];
  auto fetch = [&](int64_t j) {
    if (j < hi && dok) {
      load_pack(kb + j * g.ks, kn);
      load_pack(vb + j * g.vs, vn);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) kn[i] = vn[i] = 0.f;
    }
  };
  fetch(lo + slot);
  for (int64_t j0 = lo; j0 < hi; j0 += nslots) {  // the same trip count for every lane
    const int64_t j = j0 + slot;
    float kv[V], vv[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      kv[i] = kn[i];
      vv[i] = vn[i];
    }
    fetch(j + nslots);
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) s += qv[r][i] * kv[i];
      for (int off = lpk >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
      if (j < hi) {  // the same for a slot's lanes
        const float m_new = fmaxf(m[r], s != s ? INFINITY : s);  // NaN: see decode_split_kernel
        const float alpha = exp2f(m[r] - m_new), p = exp2f(s - m_new);
        l[r] = l[r] * alpha + p;
        m[r] = m_new;
#pragma unroll
        for (int i = 0; i < V; ++i) o[r][i] = o[r][i] * alpha + p * vv[i];
      }
    }
  }
  const int pitch = D + 2;
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    float* st = dsm + (slot * REP + r) * pitch;
    if (lane % lpk == 0) {
      st[0] = m[r];
      st[1] = l[r];
    }
    if (dok) {
#pragma unroll
      for (int i = 0; i < V; ++i) st[2 + d0 + i] = o[r][i];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    float M = -INFINITY;
    for (int sl = 0; sl < nslots; ++sl) M = fmaxf(M, dsm[(sl * REP + r) * pitch]);
    float den = 0.f, acc = 0.f;
    if (M != -INFINITY) {
      for (int sl = 0; sl < nslots; ++sl) {
        const float* st = dsm + (sl * REP + r) * pitch;
        const float w = exp2f(st[0] - M);  // a slot that saw no key: exp2(-inf) = 0
        den += st[1] * w;
        acc += st[2 + d] * w;
      }
    }
    const int64_t part = (b * g.Hq + h0 + r) * nsplit + split;
    const bool seen = den > 0.f || den != den;  // a NaN split is passed on, not dropped
    o_part[part * D + d] = seen ? acc / den : 0.f;
    // An empty split (past this sequence's length) gets weight exp2(-inf) = 0 in the combine.
    if (d == 0) lse_part[part] = seen ? M + log2f(den) : -INFINITY;
  }
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ o_part,
                                      const float* __restrict__ lse_part, T* __restrict__ out,
                                      int64_t nsplit, int64_t D) {
  const int64_t bh = blockIdx.x;
  const float* lp = lse_part + bh * nsplit;
  float mx = -INFINITY;
  bool nan = false;
  for (int64_t s = 0; s < nsplit; ++s) {  // finite if seqlen >= 1
    mx = fmaxf(mx, lp[s]);                // (fmaxf drops a NaN split: it is kept apart)
    nan |= lp[s] != lp[s];
  }
  if (nan) mx = NAN;
  if (mx == -INFINITY) mx = 0.f;  // no key at all (a length of 0 in a captured graph): zeros
  float den = 0.f;
  for (int64_t s = 0; s < nsplit; ++s) den += exp2f(lp[s] - mx);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < nsplit; ++s) acc += exp2f(lp[s] - mx) * o_part[(bh * nsplit + s) * D + d];
    out[bh * D + d] = from_f<T>(den > 0.f || den != den ? acc / den : 0.f);
  }
}

// Dynamic shared memory above 48 KiB needs an opt-in per kernel.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <typename T, int NS>
void fwd_ns(const MgAttnGeo& g, const void* q, const void* k, const void* v, void* out,
            float* lse, float scale, cudaStream_t s) {
  const size_t smem = sizeof(float) * (BM * g.D + 32 * (g.D + 1) + 32 * g.D);
  auto kern = attn_fwd_kernel<T, NS>;
  if (allow_smem(kern, smem) != cudaSuccess) return;
  const dim3 grid = seq_grid(g.B * g.Hq, (g.T + BM - 1) / BM);
  kern<<<grid, WARPS * 32, smem, s>>>(g, (const T*)q, (const T*)k, (const T*)v, (T*)out, lse,
                                      scale * LOG2EF);
}

template <typename T, int DP>
void fwd_mma_dp(const MgAttnGeo& g, const void* q, const void* k, const void* v, void* out,
                float* lse, float scale, bool vec, cudaStream_t s) {
  const size_t smem = sizeof(T) * 4 * MMA_BN * (DP + 8);  // K and V, double-buffered
  auto kern = attn_fwd_mma_kernel<T, DP>;
  if (allow_smem(kern, smem) != cudaSuccess) return;
  const dim3 grid = seq_grid(g.B * g.Hq, (g.T + MMA_BM - 1) / MMA_BM);
  kern<<<grid, MMA_WARPS * 32, smem, s>>>(g, (const T*)q, (const T*)k, (const T*)v, (T*)out,
                                          lse, scale * LOG2EF, vec ? 1 : 0);
}

template <typename T, int DP>
void bwd_mma_dp(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
                const void* q, const void* k, const void* v, const float* lse,
                const float* delta, void* dq, void* dk, void* dv, float scale, bool vec,
                cudaStream_t s) {
  constexpr int BQ = DP <= 64 ? 64 : 32;  // dK/dV's query tile: its registers at D 128
  const size_t smem_q = sizeof(T) * (2 * MMA_BM + 4 * MMA_BN) * (DP + 8);
  auto kq = attn_dq_mma_kernel<T, DP>;
  if (allow_smem(kq, smem_q) != cudaSuccess) return;
  const dim3 gq = seq_grid(g.B * g.Hq, (g.T + MMA_BM - 1) / MMA_BM);
  kq<<<gq, MMA_WARPS * 32, smem_q, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q,
                                        (const T*)k, (const T*)v, lse, delta, (T*)dq,
                                        scale * LOG2EF, scale, vec ? 1 : 0);
  const size_t smem_k = sizeof(T) * (2 * MMA_BN + 4 * BQ) * (DP + 8) + sizeof(float) * 4 * BQ;
  auto kk = attn_dkdv_mma_kernel<T, DP, BQ>;
  if (allow_smem(kk, smem_k) != cudaSuccess) return;
  const dim3 gk = seq_grid(g.B * g.Hkv, (g.S + MMA_BN - 1) / MMA_BN);
  kk<<<gk, MMA_WARPS * 32, smem_k, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q,
                                        (const T*)k, (const T*)v, lse, delta, (T*)dk, (T*)dv,
                                        scale * LOG2EF, scale, vec ? 1 : 0);
}

// Whether the tensor-core kernels take this call: 16-bit, D <= 128, sm_80 on; and whether
// every row they stage starts on a 16-byte boundary (then they load 16 bytes at a time).
template <typename T>
bool mma_applies(const MgAttnGeo& g, std::initializer_list<const void*> ptrs,
                 std::initializer_list<int64_t> strides, bool* vec) {
  if (sizeof(T) != 2 || g.D > 128) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major < 8) return false;
  bool ok = g.D % 8 == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  for (int64_t st : {g.qb, g.qh, g.qt, g.kb, g.kh, g.ks, g.vb, g.vh, g.vs}) ok = ok && st % 8 == 0;
  for (int64_t st : strides) ok = ok && st % 8 == 0;
  *vec = ok;
  return true;
}

template <typename T>
bool bwd_mma(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
             const void* q, const void* k, const void* v, const float* lse, const float* delta,
             void* dq, void* dk, void* dv, float scale, cudaStream_t s) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    bool vec = false;
    if (!mma_applies<T>(g, {q, k, v, dout}, {db, dh, dt}, &vec)) return false;
    if (g.D <= 32)
      bwd_mma_dp<T, 32>(g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale, vec, s);
    else if (g.D <= 64)
      bwd_mma_dp<T, 64>(g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale, vec, s);
    else if (g.D <= 96)
      bwd_mma_dp<T, 96>(g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale, vec, s);
    else
      bwd_mma_dp<T, 128>(g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale, vec, s);
    return true;
  }
}

// The tensor-core forward where it applies (mma_applies). False leaves the call to the fp32
// CUDA-core kernel.
template <typename T>
bool fwd_mma(const MgAttnGeo& g, const void* q, const void* k, const void* v, void* out,
             float* lse, float scale, cudaStream_t s) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    bool vec = false;
    if (!mma_applies<T>(g, {q, k, v}, {}, &vec)) return false;
    if (g.D <= 32) fwd_mma_dp<T, 32>(g, q, k, v, out, lse, scale, vec, s);
    else if (g.D <= 64) fwd_mma_dp<T, 64>(g, q, k, v, out, lse, scale, vec, s);
    else if (g.D <= 96) fwd_mma_dp<T, 96>(g, q, k, v, out, lse, scale, vec, s);
    else fwd_mma_dp<T, 128>(g, q, k, v, out, lse, scale, vec, s);
    return true;
  }
}

template <typename T, int NS>
void bwd_ns(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
            const void* q, const void* k, const void* v, const float* lse, const float* delta,
            void* dq, void* dk, void* dv, float scale, cudaStream_t s) {
  const size_t smem_q = sizeof(float) * (2 * BM * g.D + 2 * 32 * (g.D + 1));
  auto kq = attn_dq_kernel<T, NS>;
  if (allow_smem(kq, smem_q) != cudaSuccess) return;
  const dim3 gq = seq_grid(g.B * g.Hq, (g.T + BM - 1) / BM);
  kq<<<gq, WARPS * 32, smem_q, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q, (const T*)k,
                                    (const T*)v, lse, delta, (T*)dq, scale * LOG2EF, scale);
  const size_t smem_k = sizeof(float) * (2 * 32 * g.D + 2 * 32 * (g.D + 1) + 64);
  auto kk = attn_dkdv_kernel<T, NS>;
  if (allow_smem(kk, smem_k) != cudaSuccess) return;
  const dim3 gk = seq_grid(g.B * g.Hkv, (g.S + 31) / 32);
  kk<<<gk, WARPS * 32, smem_k, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q, (const T*)k,
                                    (const T*)v, lse, delta, (T*)dk, (T*)dv, scale * LOG2EF);
}

template <typename T, int REP>
void decode_vec_rep(const MgAttnGeo& g, const void* q, const void* k, const void* v,
                    const int32_t* seqlens, float* o_part, float* lse_part, int64_t nsplit,
                    int64_t split_len, float scale, int lpk, cudaStream_t s) {
  const int64_t rep = g.Hq / g.Hkv;
  const size_t smem = sizeof(float) * (DEC_WARPS * (32 / lpk)) * REP * (g.D + 2);
  auto kern = decode_split_vec_kernel<T, REP>;
  if (allow_smem(kern, smem) != cudaSuccess) return;
  dim3 grid((unsigned)(g.B * g.Hkv), (unsigned)nsplit, (unsigned)((rep + REP - 1) / REP));
  kern<<<grid, DEC_WARPS * 32, smem, s>>>(g, (const T*)q, (const T*)k, (const T*)v, seqlens,
                                          o_part, lse_part, nsplit, split_len, scale * LOG2EF,
                                          lpk);
}

// decode_split_vec_kernel where K's and V's rows are whole, 16-byte aligned packs.
template <typename T>
bool decode_vec(const MgAttnGeo& g, const void* q, const void* k, const void* v,
                const int32_t* seqlens, float* o_part, float* lse_part, int64_t nsplit,
                int64_t split_len, float scale, cudaStream_t s) {
  constexpr int V = Pack<T>::kN;
  if (g.D % V != 0 || !aligned16(k) || !aligned16(v)) return false;
  for (int64_t st : {g.kb, g.kh, g.ks, g.vb, g.vh, g.vs})
    if (st % V != 0) return false;
  int lpk = 1;
  while (lpk * V < g.D) lpk <<= 1;
  if (lpk > 32) return false;
  const int64_t rep = g.Hq / g.Hkv;
  if (rep <= 1) decode_vec_rep<T, 1>(g, q, k, v, seqlens, o_part, lse_part, nsplit, split_len, scale, lpk, s);
  else if (rep <= 2) decode_vec_rep<T, 2>(g, q, k, v, seqlens, o_part, lse_part, nsplit, split_len, scale, lpk, s);
  else if (rep <= 4) decode_vec_rep<T, 4>(g, q, k, v, seqlens, o_part, lse_part, nsplit, split_len, scale, lpk, s);
  else decode_vec_rep<T, 8>(g, q, k, v, seqlens, o_part, lse_part, nsplit, split_len, scale, lpk, s);
  return true;
}

template <typename T, int NS>
void decode_ns(const MgAttnGeo& g, const void* q, const void* k, const void* v,
               const int32_t* seqlens, float* o_part, float* lse_part, void* out, int64_t nsplit,
               int64_t split_len, float scale, cudaStream_t s) {
  if (!decode_vec<T>(g, q, k, v, seqlens, o_part, lse_part, nsplit, split_len, scale, s)) {
    dim3 grid((unsigned)(g.B * g.Hq), (unsigned)nsplit);
    decode_split_kernel<T, NS><<<grid, 32, sizeof(float) * g.D, s>>>(
        g, (const T*)q, (const T*)k, (const T*)v, seqlens, o_part, lse_part, nsplit, split_len,
        scale * LOG2EF);
  }
  decode_combine_kernel<T><<<(unsigned)(g.B * g.Hq), 32, 0, s>>>(o_part, lse_part, (T*)out,
                                                                nsplit, g.D);
}

// Head-dim slices per lane: D <= 64, 128, 256 (lanes past D are masked; three widths keep
// the instantiations, and nvcc's time, down).
#define ATTN_DISPATCH_NS(D, F, T, ...)                 \
  do {                                                 \
    if ((D) <= 64) F<T, 2>(__VA_ARGS__);               \
    else if ((D) <= 128) F<T, 4>(__VA_ARGS__);         \
    else F<T, 8>(__VA_ARGS__);                         \
  } while (0)

template <typename T>
void launch_fwd(const MgAttnGeo& g, const void* q, const void* k, const void* v, void* out,
                float* lse, float scale, cudaStream_t s) {
  if (fwd_mma<T>(g, q, k, v, out, lse, scale, s)) return;
  ATTN_DISPATCH_NS(g.D, fwd_ns, T, g, q, k, v, out, lse, scale, s);
}

template <typename T>
void launch_bwd(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
                const void* q, const void* k, const void* v, const void* out, const float* lse,
                float* delta, void* dq, void* dk, void* dv, float scale, cudaStream_t s) {
  const int64_t rows = g.B * g.Hq * g.T;
  attn_delta_kernel<T><<<(unsigned)((rows + WARPS - 1) / WARPS), WARPS * 32, 0, s>>>(
      (const T*)dout, db, dh, dt, (const T*)out, delta, g.Hq, g.T, g.D, rows);
  if (bwd_mma<T>(g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale, s)) return;
  ATTN_DISPATCH_NS(g.D, bwd_ns, T, g, dout, db, dh, dt, q, k, v, lse, delta, dq, dk, dv, scale,
                   s);
}

template <typename T>
void launch_decode(const MgAttnGeo& g, const void* q, const void* k, const void* v,
                   const int32_t* seqlens, float* o_part, float* lse_part, void* out,
                   int64_t nsplit, int64_t split_len, float scale, cudaStream_t s) {
  ATTN_DISPATCH_NS(g.D, decode_ns, T, g, q, k, v, seqlens, o_part, lse_part, out, nsplit,
                   split_len, scale, s);
}

bool bad_geo(const MgAttnGeo& g) {
  return g.D < 1 || g.D > 256 || g.Hkv < 1 || g.Hq % g.Hkv != 0;
}

// Whether a forward or backward grid (seq_grid; the smallest sequence blocks: 16 queries, 32
// keys) would pass grid x's kMaxGridX blocks: refused as the GPU would refuse the launch, rather
// than cut short by the cast to unsigned.
bool too_many_blocks(const MgAttnGeo& g) {
  return (g.T + BM - 1) / BM > kMaxGridX / (g.B * g.Hq) ||
         (g.S + 31) / 32 > kMaxGridX / (g.B * g.Hkv);
}

}  // namespace

extern "C" int minigpt_attention_fwd_cuda(MgAttnGeo g, const void* q, const void* k, const void* v,
                                          void* out, float* lse, float scale, int dtype,
                                          cudaStream_t stream) {
  if (bad_geo(g)) return (int)cudaErrorInvalidValue;
  if (g.B == 0 || g.Hq == 0 || g.T == 0) return 0;
  if (too_many_blocks(g)) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, g, q, k, v, out, lse, scale, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_attention_bwd_cuda(MgAttnGeo g, const void* dout, int64_t db, int64_t dh,
                                          int64_t dt, const void* q, const void* k, const void* v,
                                          const void* out, const float* lse, float* delta,
                                          void* dq, void* dk, void* dv, float scale, int dtype,
                                          cudaStream_t stream) {
  if (bad_geo(g)) return (int)cudaErrorInvalidValue;
  if (g.B == 0 || g.Hq == 0 || g.T == 0 || g.S == 0) return 0;
  if (too_many_blocks(g)) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, g, dout, db, dh, dt, q, k, v, out, lse, delta, dq, dk,
                         dv, scale, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_decode_attention_cuda(MgAttnGeo g, const void* q, const void* k,
                                             const void* v, const int32_t* seqlens,
                                             float* o_part, float* lse_part, void* out,
                                             int64_t nsplit, int64_t split_len, float scale,
                                             int dtype, cudaStream_t stream) {
  if (bad_geo(g) || nsplit < 1 || split_len < 1) return (int)cudaErrorInvalidValue;
  if (g.B == 0 || g.Hq == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_decode, g, q, k, v, seqlens, o_part, lse_part, out, nsplit,
                         split_len, scale, stream);
  return (int)cudaGetLastError();
}
