// Flash attention CUDA kernels (forward, backward, flash-decoding) and their extern "C"
// launchers. Simple and exact rather than tensor-core fast (the Triton kernels are the fast GPU
// path): fp32 math on CUDA cores, tiles staged in shared memory as fp32, never the T x S matrix.
//
// One pattern throughout: for scores a lane owns one key (or one query) of a 32-wide tile and
// computes its dot product over the head dimension alone, reading shared memory; for the
// accumulations a lane owns head dims d = lane + 32 * n (n < NS, so D <= 32 * NS) and the
// per-key (per-query) weights are broadcast with __shfl_sync.
//   forward: block = BM queries (4 warps x RPW rows) walking 32-key tiles, online softmax
//            in base 2 (q pre-multiplied by scale * log2 e), then lse = ln(2) * (m + log2 l).
//   backward (recompute P from lse, atomic-free): delta = rowsum(dO * O); dQ with the forward's
//            layout; dK/dV with a block per 32 keys (each warp owns 8 of them) looping over the
//            GQA group's query heads and their 32-query tiles.
//   decode:  one warp per (query head, split of the keys) writes a partial output and its
//            base-2 logsumexp; a combine kernel merges the splits (flash-decoding).
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
  const int64_t bh = blockIdx.x, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const int64_t i0 = (int64_t)blockIdx.y * BM;
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
      const float m_new = fmaxf(m[rr], warp_max(s));
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
    // A row that saw no key: lse = +inf, so the backward's exp2(s - lse) is 0 there.
    if (lane == 0) lse[bh * g.T + i] = l[rr] > 0.f ? (m[rr] + log2f(l[rr])) * LN2F : INFINITY;
  }
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
  const int64_t bh = blockIdx.x, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const int64_t i0 = (int64_t)blockIdx.y * BM;
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
      const float p = visible(i, j, g) ? exp2f(s - lse2[rr]) : 0.f;
      const float ds = p * (dp - dl[rr]);
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
  const int64_t bh = blockIdx.x, b = bh / g.Hkv, hk = bh % g.Hkv, rep = g.Hq / g.Hkv;
  const int64_t j0 = (int64_t)blockIdx.y * 32;
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
        const float p = visible(i, j, g) ? exp2f(s - lse2s[lane]) : 0.f;
        const float ds = p * (dp - dls[lane]);
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
    const float m_new = fmaxf(m, warp_max(s));  // finite: lane 0's key is valid
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
  // An empty split (past this sequence's length) gets weight exp2(-inf) = 0 in the combine.
  if (lane == 0) lse_part[part] = l > 0.f ? m + log2f(l) : -INFINITY;
}

template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ o_part,
                                      const float* __restrict__ lse_part, T* __restrict__ out,
                                      int64_t nsplit, int64_t D) {
  const int64_t bh = blockIdx.x;
  const float* lp = lse_part + bh * nsplit;
  float mx = -INFINITY;
  for (int64_t s = 0; s < nsplit; ++s) mx = fmaxf(mx, lp[s]);  // finite if seqlen >= 1
  if (mx == -INFINITY) mx = 0.f;  // no key at all (a length of 0 in a captured graph): zeros
  float den = 0.f;
  for (int64_t s = 0; s < nsplit; ++s) den += exp2f(lp[s] - mx);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < nsplit; ++s) acc += exp2f(lp[s] - mx) * o_part[(bh * nsplit + s) * D + d];
    out[bh * D + d] = from_f<T>(den > 0.f ? acc / den : 0.f);
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
  // (batch x head) on x, which allows 2^31 - 1 blocks; y (65535) only counts sequence blocks.
  dim3 grid((unsigned)(g.B * g.Hq), (unsigned)((g.T + BM - 1) / BM));
  kern<<<grid, WARPS * 32, smem, s>>>(g, (const T*)q, (const T*)k, (const T*)v, (T*)out, lse,
                                      scale * LOG2EF);
}

template <typename T, int NS>
void bwd_ns(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
            const void* q, const void* k, const void* v, const float* lse, const float* delta,
            void* dq, void* dk, void* dv, float scale, cudaStream_t s) {
  const size_t smem_q = sizeof(float) * (2 * BM * g.D + 2 * 32 * (g.D + 1));
  auto kq = attn_dq_kernel<T, NS>;
  if (allow_smem(kq, smem_q) != cudaSuccess) return;
  dim3 gq((unsigned)(g.B * g.Hq), (unsigned)((g.T + BM - 1) / BM));
  kq<<<gq, WARPS * 32, smem_q, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q, (const T*)k,
                                    (const T*)v, lse, delta, (T*)dq, scale * LOG2EF, scale);
  const size_t smem_k = sizeof(float) * (2 * 32 * g.D + 2 * 32 * (g.D + 1) + 64);
  auto kk = attn_dkdv_kernel<T, NS>;
  if (allow_smem(kk, smem_k) != cudaSuccess) return;
  dim3 gk((unsigned)(g.B * g.Hkv), (unsigned)((g.S + 31) / 32));
  kk<<<gk, WARPS * 32, smem_k, s>>>(g, (const T*)dout, db, dh, dt, (const T*)q, (const T*)k,
                                    (const T*)v, lse, delta, (T*)dk, (T*)dv, scale * LOG2EF);
}

template <typename T, int NS>
void decode_ns(const MgAttnGeo& g, const void* q, const void* k, const void* v,
               const int32_t* seqlens, float* o_part, float* lse_part, void* out, int64_t nsplit,
               int64_t split_len, float scale, cudaStream_t s) {
  dim3 grid((unsigned)(g.B * g.Hq), (unsigned)nsplit);
  decode_split_kernel<T, NS><<<grid, 32, sizeof(float) * g.D, s>>>(
      g, (const T*)q, (const T*)k, (const T*)v, seqlens, o_part, lse_part, nsplit, split_len,
      scale * LOG2EF);
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
  ATTN_DISPATCH_NS(g.D, fwd_ns, T, g, q, k, v, out, lse, scale, s);
}

template <typename T>
void launch_bwd(const MgAttnGeo& g, const void* dout, int64_t db, int64_t dh, int64_t dt,
                const void* q, const void* k, const void* v, const void* out, const float* lse,
                float* delta, void* dq, void* dk, void* dv, float scale, cudaStream_t s) {
  const int64_t rows = g.B * g.Hq * g.T;
  attn_delta_kernel<T><<<(unsigned)((rows + WARPS - 1) / WARPS), WARPS * 32, 0, s>>>(
      (const T*)dout, db, dh, dt, (const T*)out, delta, g.Hq, g.T, g.D, rows);
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

}  // namespace

extern "C" int minigpt_attention_fwd_cuda(MgAttnGeo g, const void* q, const void* k, const void* v,
                                          void* out, float* lse, float scale, int dtype,
                                          cudaStream_t stream) {
  if (bad_geo(g)) return (int)cudaErrorInvalidValue;
  if (g.B == 0 || g.Hq == 0 || g.T == 0) return 0;
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
