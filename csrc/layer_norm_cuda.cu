// LayerNorm (+ fused residual add) CUDA kernels and their extern "C" launchers.
// Two versions of each kernel. The vectorized ones (rows of whole 16-byte packs, aligned, up to
// 32 values a thread) hold the row in registers: the forward reads x (and r) once, takes the
// mean and then the variance around it from registers, and writes y; the backward keeps
// x-hat and w*dy between its two reductions, and its dweight/dbias sums in registers (in
// shared memory for fp32 rows of 4097 to 8192, which fill the registers otherwise). The
// generic ones take any N: one block per row, passes re-reading the row from L1/L2.
// Backward, all: P blocks, each owning a contiguous slice of rows; every thread owns a fixed
// set of columns, so its share of the dweight/dbias partial row needs no atomics; the caller
// sums the P partial rows. A vectorized row of at most 128 packs (fp32 512 wide, fp16/bf16
// 1024) takes a third version: one warp per row, 8 rows of the slice at a time, the warps'
// sums added in shared memory at the end.
// Weight and bias (W) are fp32, or for 16-bit rows also in the rows' own dtype (a bf16
// model's parameters, read as they are instead of cast to fp32 by an extra kernel each call);
// the math is fp32 either way.
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T, typename W>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r,
                              const W* __restrict__ w, const W* __restrict__ b,
                              T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                              float* __restrict__ rstd_out, int64_t N, float eps) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  x += row * N;
  y += row * N;
  const T* src = x;
  if (r) {
    r += row * N;
    h += row * N;
    src = h;
  }
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    float v = to_f(x[j]);
    if (r) {
      T hq = from_f<T>(v + to_f(r[j]));
      h[j] = hq;  // each thread re-reads only its own columns of h below
      v = to_f(hq);
    }
    sum += v;
  }
  const float mean = block_sum(sum, shm) / N;
  float var = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float d = to_f(src[j]) - mean;
    var += d * d;
  }
  const float rstd = rsqrtf(block_sum(var, shm) / N + eps);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    float v = (to_f(src[j]) - mean) * rstd * to_f(w[j]);
    if (b) v += to_f(b[j]);
    y[j] = from_f<T>(v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, typename W>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                              const T* __restrict__ h, const W* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              T* __restrict__ dx, T* __restrict__ dx2, float* __restrict__ dw_part,
                              float* __restrict__ db_part, int64_t M, int64_t N,
                              int64_t rows_per) {
  __shared__ float shm[32];
  const int64_t p = blockIdx.x;
  float* dw = dw_part + p * N;
  float* db = db_part ? db_part + p * N : nullptr;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    dw[j] = 0.f;
    if (db) db[j] = 0.f;
  }
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t i = r0; i < r1; ++i) {
    const T* xr = h + i * N;
    const T* gr = dy + i * N;
    const float mu = mean[i], rs = rstd[i];
    float c1 = 0.f, c2 = 0.f;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float g = to_f(gr[j]);
      const float xhat = (to_f(xr[j]) - mu) * rs;
      // Rounded products (__fmul_rn) here and in dx below: nvcc would fuse w*dy into dx's
      // subtraction as an FMA, so dx would subtract the rounded mean c2 from the exact
      // product. For N = 1 (dx = 0 exactly) that left the product's rounding error times
      // rstd (~316 at eps 1e-5): 2e-5 on an H200, where eager PyTorch gives 0.
      const float wdy = __fmul_rn(to_f(w[j]), g);
      c1 += xhat * wdy;
      c2 += wdy;
      dw[j] += g * xhat;
      if (db) db[j] += g;
    }
    c1 = block_sum(c1, shm) / N;
    c2 = block_sum(c2, shm) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float xhat = (to_f(xr[j]) - mu) * rs;
      float v = (__fmul_rn(to_f(w[j]), to_f(gr[j])) - (xhat * c1 + c2)) * rs;
      if (dh) v += to_f(dh[i * N + j]);
      dx[i * N + j] = from_f<T>(v);
      if (dx2) dx2[i * N + j] = from_f<T>(v);
    }
  }
}

// Forward, vectorized. Thread t owns packs t, t + blockDim, ... (VPT of them) of a row, and
// holds them as loaded (RowPacks): 8 bf16 values in 4 registers, not 8. Held as floats, a bf16
// row of 8192 took 56 registers a thread at 512 threads: two blocks an SM, so two 16 KB rows in
// flight, which reached 81% of the H100's copy bandwidth where fp32 rows (two 32 KB rows an SM)
// reached 101%. The load is its own step so that the persistent kernel can issue the next
// row's before this row's reductions wait on their barriers.
template <typename T, int VPT, bool RES>
struct RowPacks {
  uint4 x[VPT];
  uint4 r[RES ? VPT : 1];  // the residual's packs (unused without one)
};

template <typename T, int VPT, bool RES>
__device__ __forceinline__ void ln_fwd_load(const T* __restrict__ x, const T* __restrict__ r,
                                            int64_t row, int64_t N, RowPacks<T, VPT, RES>& p) {
  constexpr int V = Pack<T>::kN;
  const int64_t base = row * N;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x;
    if (q * V >= N) continue;
    p.x[k] = load_raw(at16(x + base, q));
    if constexpr (RES) p.r[k] = load_raw(at16(r + base, q));
  }
}

// One row from its loaded packs. w and b may point to global or (the persistent kernel, as
// fp32) shared memory.
template <typename T, int VPT, bool RES, typename W>
__device__ __forceinline__ void ln_fwd_row(const RowPacks<T, VPT, RES>& p, const W* w,
                                           const W* b, T* __restrict__ y,
                                           T* __restrict__ h, float* __restrict__ mean_out,
                                           float* __restrict__ rstd_out, int64_t row, int64_t N,
                                           float eps, float* shm) {
  constexpr int V = Pack<T>::kN;
  const int64_t base = row * N;
  uint4 hv[VPT];  // what is normalized: x, or h = x + r as stored (rounded to T)
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x;
    if (q * V >= N) continue;
    float v[V];
    if constexpr (RES) {
      float rv[V];
      unpack<T>(p.x[k], v);
      unpack<T>(p.r[k], rv);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += rv[i];
      hv[k] = pack<T>(v);
      *reinterpret_cast<uint4*>(at16(h + base, q)) = hv[k];
    } else {
      hv[k] = p.x[k];
    }
    unpack<T>(hv[k], v);
#pragma unroll
    for (int i = 0; i < V; ++i) sum += v[i];
  }
  const float mean = block_sum(sum, shm) / N;
  float var = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x;
    if (q * V >= N) continue;
    float v[V];
    unpack<T>(hv[k], v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float d = v[i] - mean;
      var += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(var, shm) / N + eps);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    float v[V], wv[V], o[V];
    unpack<T>(hv[k], v);
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = (v[i] - mean) * rstd * wv[i];
    if (b) {
      float bv[V];
      load_w<V>(b, q, bv);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] += bv[i];
    }
    store_pack(at16(y + base, q), o);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int VPT, bool RES, typename W>
__global__ void __launch_bounds__(1024)
ln_fwd_vec_kernel(const T* __restrict__ x, const T* __restrict__ r, const W* __restrict__ w,
                  const W* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t N,
                  float eps) {
  __shared__ float shm[32];
  RowPacks<T, VPT, RES> p;
  ln_fwd_load(x, r, blockIdx.x, N, p);
  ln_fwd_row(p, w, b, y, h, mean_out, rstd_out, blockIdx.x, N, eps, shm);
}

// Forward, vectorized and persistent, for 16-bit rows: as many blocks as fit on the GPU at
// once, each looping over rows blockIdx.x, + gridDim.x, ...; the fp32 weight and bias go to
// shared memory once per block instead of coming from L2 with every row (a bf16 row of 8192
// moves 32 KB through HBM, x in and y out, and would re-read 64 KB of w and b from L2), and
// each row's packs are loaded while the previous row is reduced and written, so the loads stay
// in flight across the reductions' barriers.
//
// MIN_BLOCKS 3 bounds the block to 512 threads and 40 registers a thread, so that three blocks
// share an SM: a bf16 row of 8192 without a residual took 50 registers at 512 threads, two
// blocks an SM. Triton's forward of the same rows (40 registers, three blocks an SM, one row
// each) reached 99% of the H100's copy bandwidth, this kernel's predecessors 81%. With a
// residual, 40 registers spill (144 bytes): those keep the 1024-thread bound.
template <typename T, int VPT, bool RES, int MIN_BLOCKS, typename W>
__global__ void __launch_bounds__(MIN_BLOCKS == 1 ? 1024 : 512, MIN_BLOCKS)
ln_fwd_persist_kernel(const T* __restrict__ x, const T* __restrict__ r,
                      const W* __restrict__ w, const W* __restrict__ b,
                      T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean_out,
                      float* __restrict__ rstd_out, int64_t M, int64_t N, float eps) {
  extern __shared__ float4 wb4[];  // w (N floats), then b (N floats) if there is one
  __shared__ float shm[32];
  float* const sw = reinterpret_cast<float*>(wb4);
  float* const sb = sw + N;
  int64_t row = blockIdx.x;
  RowPacks<T, VPT, RES> cur;
  if (row < M) ln_fwd_load(x, r, row, N, cur);
  if constexpr (std::is_same<W, float>::value) {
    for (int64_t j = threadIdx.x; j < N / 4; j += blockDim.x) {
      wb4[j] = reinterpret_cast<const float4*>(w)[j];
      if (b) wb4[N / 4 + j] = reinterpret_cast<const float4*>(b)[j];
    }
  } else {  // 16-bit weights, as floats
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      sw[j] = to_f(w[j]);
      if (b) sb[j] = to_f(b[j]);
    }
  }
  __syncthreads();
  for (; row < M; row += gridDim.x) {
    const bool more = row + gridDim.x < M;
    RowPacks<T, VPT, RES> next;
    if (more) ln_fwd_load(x, r, row + gridDim.x, N, next);
    ln_fwd_row(cur, (const float*)sw, b ? (const float*)sb : nullptr, y, h, mean_out,
               rstd_out, row, N, eps, shm);
    if (more) cur = next;
  }
}

// Sum of (a, b) over the block in one pair of barriers; every thread gets both.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // shm may still be read by the previous row's reduction
  if (lane == 0) {
    shm[warp] = a;
    shm[32 + warp] = b;
  }
  __syncthreads();
  a = lane < nwarps ? shm[lane] : 0.f;
  b = lane < nwarps ? shm[32 + lane] : 0.f;
  return make_float2(warp_sum(a), warp_sum(b));
}

// One row of the vectorized backward, shared by the three kernels below. The thread's packs
// are q0, q0 + stride, ... (VPT of them, those inside the row; I: their index type, 32-bit
// where that spares the registers); `sum2` adds (c1, c2) over the threads that share the row
// (a block or a warp). The row stays in registers as loaded bytes, and x-hat and w*dy are
// computed again for dx: kept as floats they took bf16 rows of 8192 to 167 registers a
// thread, one block an SM. Hands the row's dweight/dbias terms of pack k to acc(k, q, dy *
// x-hat, dy).
// kPrefetchDh (kPre): where the register kernel runs one block an SM (fp32 rows of 8 packs a
// thread, 218 registers; the default there), the residual's gradient is
// loaded with the row, so that its latency falls in the row's reductions and not after them;
// there the row's wait for dh came once per row with only 8 warps an SM to cover it (CUDA add
// + LayerNorm fp32 fwd+bwd at 16384 x 8192: 1.75 ms against Triton's 1.55 on an H100).
// Elsewhere the 4 registers a pack would cost a block an SM.
template <typename T, int VPT>
constexpr bool kPrefetchDh = sizeof(T) == 4 && VPT > 4;

template <typename T, int VPT, bool kPre, typename W, typename I, typename Acc, typename Sum2>
__device__ __forceinline__ void ln_bwd_row(const T* __restrict__ h, const T* __restrict__ dy,
                                           const T* __restrict__ dh, T* __restrict__ dx,
                                           T* __restrict__ dx2,
                                           const W* __restrict__ w, float mu, float rs,
                                           int64_t N, I q0, I stride, Acc acc,
                                           Sum2 sum2) {
  constexpr int V = Pack<T>::kN;
  uint4 hr[VPT], gr[VPT], dr[kPre ? VPT : 1];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const I q = q0 + k * stride;
    if (q * V >= N) continue;
    hr[k] = load_raw(at16(h, q));
    gr[k] = load_raw(at16(dy, q));
    if constexpr (kPre) {
      if (dh) dr[k] = load_raw(at16(dh, q));
    }
  }
  float c1 = 0.f, c2 = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const I q = q0 + k * stride;
    if (q * V >= N) continue;
    float hv[V], g[V], wv[V], gx[V];
    unpack<T>(hr[k], hv);
    unpack<T>(gr[k], g);
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xhat = (hv[i] - mu) * rs;
      const float wg = __fmul_rn(wv[i], g[i]);  // not fused into dx's subtraction: see bwd
      c1 += xhat * wg;
      c2 += wg;
      gx[i] = g[i] * xhat;
    }
    acc(k, q, gx, g);  // the dweight, dbias terms
  }
  const float2 c = sum2(c1, c2);
  c1 = c.x / N;
  c2 = c.y / N;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const I q = q0 + k * stride;
    if (q * V >= N) continue;
    float hv[V], g[V], wv[V], o[V];
    unpack<T>(hr[k], hv);
    unpack<T>(gr[k], g);
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xhat = (hv[i] - mu) * rs;
      o[i] = (__fmul_rn(wv[i], g[i]) - (xhat * c1 + c2)) * rs;
    }
    if (dh) {
      float d[V];
      if constexpr (kPre) {
        unpack<T>(dr[k], d);
      } else {
        load_pack(at16(dh, q), d);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] += d[i];
    }
    store_pack(at16(dx, q), o);
    if (dx2) store_pack(at16(dx2, q), o);  // x's own gradient buffer (split_grads)
  }
}

// ln_bwd_row's `acc` for the thread's dweight/dbias sums in registers (pack k of VPT).
template <int VPT, int V>
__device__ __forceinline__ auto reg_sums(float (&dw)[VPT][V], float (&db)[VPT][V]) {
  return [&dw, &db](int k, int64_t, const float* gx, const float* g) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      dw[k][i] += gx[i];
      db[k][i] += g[i];
    }
  };
}

// Backward, vectorized: the thread's columns are the same packs in every row of the slice, a
// block per row at a time. Two blocks an SM now (bf16 rows of 8192: 127 registers); fp32 rows
// of 8 packs a thread keep one block (218 registers), and are still the faster for it: see
// ln_bwd_vec_smem_kernel.
template <typename T, int VPT, typename W>
__global__ void __launch_bounds__(256, (sizeof(T) == 2 || VPT <= 4) ? 2 : 1)
ln_bwd_vec_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                  const W* __restrict__ w, const float* __restrict__ mean,
                  const float* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dx2,
                  float* __restrict__ dw_part,
                  float* __restrict__ db_part, int64_t M, int64_t N, int64_t rows_per) {
  constexpr int V = Pack<T>::kN;
  __shared__ float shm[64];
  const int64_t p = blockIdx.x;
  float dw[VPT][V], db[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = 0.f;
  const auto sum2 = [&](float a, float b) { return block_sum2(a, b, shm); };
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t base = row * N;
    ln_bwd_row<T, VPT, kPrefetchDh<T, VPT>, W>(h + base, dy + base, dh ? dh + base : nullptr,
                                               dx + base, dx2 ? dx2 + base : nullptr, w,
                                               mean[row], rstd[row], N, (int64_t)threadIdx.x,
                                               (int64_t)blockDim.x, reg_sums(dw, db), sum2);
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    store_f32<V>(at16(dw_part + p * N, q * V / 4), dw[k]);
    if (db_part) store_f32<V>(at16(db_part + p * N, q * V / 4), db[k]);
  }
}

// Backward, vectorized, with the dweight/dbias sums in shared memory: fp32 rows of 8 packs a
// thread (4097 to 8192 values). In registers those sums are 64 of ln_bwd_vec_kernel's 218 a
// thread there, which leave it one block (8 warps) an SM and so one row in flight: the SM's
// loads stop while that row's sums cross the block's barriers and its dx is written (CUDA add
// + LayerNorm fp32 fwd+bwd at 16384 x 8192 on an H100: 1.75 ms against Triton's 1.55, before
// x's leaf gradient). Here each thread adds its packs' terms to its own slots of shared memory
// (N floats for dweight, N for dbias: 64 KiB at 8192), no other thread touches them and no
// barrier guards them, and at most 128 registers: two blocks an SM, one block's loads in
// flight while the other reduces. No dh prefetch: its 32 registers would not fit.
// Measured on an H100 (2026-11-27, bench_ops.py --cuda-ln-sums, both in the same rounds) it
// lost: add + LayerNorm fp32 fwd+bwd at 16384 x 8192 took 1.56 ms of kernel time against the
// register kernel's 1.50, LayerNorm 0.984 against 0.964. So it runs only when asked for
// (MINIGPT_CUDA_LN_BWD_SUMS=shared), for timing the two side by side.
template <typename T, int VPT, bool BIAS, typename W>
__global__ void __launch_bounds__(256, 2)
ln_bwd_vec_smem_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                       const T* __restrict__ h, const W* __restrict__ w,
                       const float* __restrict__ mean, const float* __restrict__ rstd,
                       T* __restrict__ dx, T* __restrict__ dx2, float* __restrict__ dw_part,
                       float* __restrict__ db_part, int64_t M, int64_t N, int64_t rows_per) {
  constexpr int V = Pack<T>::kN;
  static_assert(V % 4 == 0, "a pack's sums are whole float4s");
  extern __shared__ float sums[];  // dweight's N, then dbias's N (with a bias)
  __shared__ float shm[64];
  float4* dw_s = reinterpret_cast<float4*>(sums);
  float4* db_s = reinterpret_cast<float4*>(sums + N);
  constexpr bool bias = BIAS;
  const int64_t p = blockIdx.x;
  // f(i) for each float4 i of the sums that the thread's own packs cover
  const auto own = [&](auto f) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t q = (int64_t)k * blockDim.x + threadIdx.x;
      if (q * V >= N) continue;
#pragma unroll
      for (int u = 0; u < V / 4; ++u) f(q * (V / 4) + u);
    }
  };
  own([&](int64_t i) {
    dw_s[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (bias) db_s[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  });
  const auto add4 = [](float4* at, const float* v) {
    float4 a = *at;
    a.x += v[0];
    a.y += v[1];
    a.z += v[2];
    a.w += v[3];
    *at = a;
  };
  const auto acc = [&](int, int64_t q, const float* gx, const float* g) {
#pragma unroll
    for (int u = 0; u < V / 4; ++u) {
      add4(dw_s + q * (V / 4) + u, gx + 4 * u);
      if (bias) add4(db_s + q * (V / 4) + u, g + 4 * u);
    }
  };
  const auto sum2 = [&](float a, float b) { return block_sum2(a, b, shm); };
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t base = row * N;
    ln_bwd_row<T, VPT, false, W>(h + base, dy + base, dh ? dh + base : nullptr, dx + base,
                                 dx2 ? dx2 + base : nullptr, w, mean[row], rstd[row], N,
                                 (int)threadIdx.x, (int)blockDim.x, acc, sum2);
  }
  own([&](int64_t i) {
    reinterpret_cast<float4*>(dw_part + p * N)[i] = dw_s[i];
    if (bias) reinterpret_cast<float4*>(db_part + p * N)[i] = db_s[i];
  });
}

// Backward, one warp per row, for rows of at most 32 * 4 packs (1024 bf16/fp16 values, 512
// fp32): the block's warps take rows r0 + warp, r0 + warp + warps, ... of its slice, so that
// many rows' loads are in flight at once, and a row's two sums are warp shuffles with no
// barrier. The block-per-row kernel above gives a 768-wide bf16 row 64 threads (two warps),
// and with 4 blocks an SM most of its time went to waiting on one row's loads (GPT-2's
// LayerNorm backward, 16384 x 768 bf16: 78 us on an H200 in Triton's equivalent, ~5x the
// bandwidth floor). Two blocks an SM (128 registers a thread). The warps' dweight/dbias sums
// meet in shared memory at the end.
template <typename T, int VPT, typename W>
__global__ void __launch_bounds__(256, 2)
ln_bwd_warp_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                   const W* __restrict__ w, const float* __restrict__ mean,
                   const float* __restrict__ rstd, T* __restrict__ dx, T* __restrict__ dx2,
                   float* __restrict__ dw_part,
                   float* __restrict__ db_part, int64_t M, int64_t N, int64_t rows_per) {
  constexpr int V = Pack<T>::kN;
  extern __shared__ float part[];  // warps x N
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t p = blockIdx.x;
  float dw[VPT][V], db[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = 0.f;
  const auto sum2 = [](float a, float b) { return make_float2(warp_sum(a), warp_sum(b)); };
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t row = r0 + warp; row < r1; row += nwarps) {
    const int64_t base = row * N;
    ln_bwd_row<T, VPT, kPrefetchDh<T, VPT>, W>(h + base, dy + base, dh ? dh + base : nullptr,
                                               dx + base, dx2 ? dx2 + base : nullptr, w,
                                               mean[row], rstd[row], N, (int64_t)lane,
                                               (int64_t)32, reg_sums(dw, db), sum2);
  }
  warps_sum_to_row(dw, part, dw_part + p * N, N);
  if (db_part) warps_sum_to_row(db, part, db_part + p * N, N);
}

template <typename T, int VPT, typename W>
void fwd_vec(int threads, const void* x, const void* r, const W* w, const W* b, void* y,
             void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= 16) {  // the only instantiations vec_shape picks
    if (r)
      ln_fwd_vec_kernel<T, VPT, true, W><<<M, threads, 0, s>>>((const T*)x, (const T*)r, w, b,
                                                               (T*)y, (T*)h, mean, rstd, N, eps);
    else
      ln_fwd_vec_kernel<T, VPT, false, W><<<M, threads, 0, s>>>((const T*)x, nullptr, w, b,
                                                                (T*)y, nullptr, mean, rstd, N,
                                                                eps);
  }
}

// ln_fwd_persist_kernel where it applies and pays: 16-bit rows, w and b fit in shared memory,
// and at least two rows per block (with fewer, one row a block fills the GPU as well, without
// each block's load of w and b). Returns false to leave the row to the other kernels.
template <typename T, int VPT, bool RES, typename W>
bool fwd_persist(int threads, const void* x, const void* r, const W* w, const W* b, void* y,
                 void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps,
                 cudaStream_t s) {
  if constexpr (sizeof(T) == 2 && VPT * Pack<T>::kN <= 16) {
    auto kernel = ln_fwd_persist_kernel<T, VPT, RES, 1, W>;
    if constexpr (!RES) {
      if (threads <= 512) kernel = ln_fwd_persist_kernel<T, VPT, RES, 3, W>;
    }
    const size_t smem = (b ? 2 : 1) * (size_t)N * sizeof(float);
    int dev = 0, sms = 0, optin = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess ||
        smem > (size_t)optin ||
        (smem > 48 * 1024 && cudaFuncSetAttribute(kernel,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  (int)smem) != cudaSuccess) ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) !=
            cudaSuccess ||
        per_sm < 1) {
      (void)cudaGetLastError();  // a refused query must not fail the fallback's launch
      return false;
    }
    const int64_t grid = (int64_t)sms * per_sm;
    if (M < 2 * grid) return false;
    kernel<<<(unsigned)grid, threads, smem, s>>>((const T*)x, (const T*)r, w, b, (T*)y, (T*)h,
                                                  mean, rstd, M, N, eps);
    return true;
  }
  return false;
}

template <typename T, typename W>
void launch_fwd(const void* x, const void* r, const W* w, const W* b, void* y, void* h,
                float* mean, float* rstd, int64_t M, int64_t N, float eps, cudaStream_t s) {
  // 16 row values a thread at most: 1024 threads get 64 registers each (rows up to 16384).
  const RowShape sh = vec_shape<T>(N, 1024, 16, {x, r, w, b, y, h});
  const auto persist =
      r ? (sh.vpt == 1 ? fwd_persist<T, 1, true, W> : fwd_persist<T, 2, true, W>)
        : (sh.vpt == 1 ? fwd_persist<T, 1, false, W> : fwd_persist<T, 2, false, W>);
  if ((sh.vpt == 1 || sh.vpt == 2) &&
      persist(sh.threads, x, r, w, b, y, h, mean, rstd, M, N, eps, s))
    return;
  switch (sh.vpt) {
    case 1: fwd_vec<T, 1, W>(sh.threads, x, r, w, b, y, h, mean, rstd, M, N, eps, s); break;
    case 2: fwd_vec<T, 2, W>(sh.threads, x, r, w, b, y, h, mean, rstd, M, N, eps, s); break;
    case 4: fwd_vec<T, 4, W>(sh.threads, x, r, w, b, y, h, mean, rstd, M, N, eps, s); break;
    default:
      ln_fwd_kernel<T, W><<<M, row_threads(N), 0, s>>>((const T*)x, (const T*)r, w, b, (T*)y,
                                                       (T*)h, mean, rstd, N, eps);
  }
}

template <typename T, int VPT, typename W>
void bwd_vec(int threads, const void* dy, const void* dh, const void* h, const W* w,
             const float* mean, const float* rstd, void* dx, void* dx2, float* dw_part,
             float* db_part, int64_t M, int64_t N, int64_t P, int64_t rows_per, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= 32) {
    ln_bwd_vec_kernel<T, VPT, W><<<P, threads, 0, s>>>((const T*)dy, (const T*)dh, (const T*)h,
                                                       w, mean, rstd, (T*)dx, (T*)dx2, dw_part,
                                                       db_part, M, N, rows_per);
  }
}

// ln_bwd_vec_smem_kernel where it applies (fp32 rows of 8 packs a thread: kPrefetchDh's rows,
// where the register kernel runs one block an SM) and MINIGPT_CUDA_LN_BWD_SUMS=shared asks for
// it; false leaves the row to the register kernel (the default: the faster on an H100), also
// where the shared memory cannot be had.
template <typename T, int VPT, typename W>
bool bwd_vec_smem(int threads, const void* dy, const void* dh, const void* h, const W* w,
                  const float* mean, const float* rstd, void* dx, void* dx2, float* dw_part,
                  float* db_part, int64_t M, int64_t N, int64_t P, int64_t rows_per,
                  cudaStream_t s) {
  if constexpr (kPrefetchDh<T, VPT> && VPT * Pack<T>::kN <= 32) {
    const char* pick = getenv("MINIGPT_CUDA_LN_BWD_SUMS");
    if (!pick || strcmp(pick, "shared") != 0) return false;
    const auto kernel = db_part ? ln_bwd_vec_smem_kernel<T, VPT, true, W>
                                : ln_bwd_vec_smem_kernel<T, VPT, false, W>;
    const size_t smem = (db_part ? 2 : 1) * (size_t)N * sizeof(float);
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
            cudaSuccess) {
      (void)cudaGetLastError();  // a refused attribute must not fail the fallback's launch
      return false;
    }
    kernel<<<P, threads, smem, s>>>((const T*)dy, (const T*)dh, (const T*)h, w, mean, rstd,
                                    (T*)dx, (T*)dx2, dw_part, db_part, M, N, rows_per);
    return true;
  }
  return false;
}

template <typename T, int VPT, typename W>
void bwd_warp(size_t smem, const void* dy, const void* dh, const void* h, const W* w,
              const float* mean, const float* rstd, void* dx, void* dx2, float* dw_part,
              float* db_part, int64_t M, int64_t N, int64_t P, int64_t rows_per, cudaStream_t s) {
  ln_bwd_warp_kernel<T, VPT, W><<<P, 256, smem, s>>>((const T*)dy, (const T*)dh, (const T*)h,
                                                     w, mean, rstd, (T*)dx, (T*)dx2, dw_part,
                                                     db_part, M, N, rows_per);
}

template <typename T, typename W>
void launch_bwd(const void* dy, const void* dh, const void* h, const W* w, const float* mean,
                const float* rstd, void* dx, void* dx2, float* dw_part, float* db_part, int64_t M,
                int64_t N, int64_t P, cudaStream_t s) {
  const int64_t rows_per = (M + P - 1) / P;
  // Narrow rows: a warp each, 8 warps a block (shared memory: 8 x N floats, 32 KiB at most).
  const RowShape ws =
      vec_shape<T>(N, 32, 4 * Pack<T>::kN, {dy, dh, h, w, dx, dx2, dw_part, db_part});
  if (ws.vpt) {
    const size_t smem = 8 * N * sizeof(float);
    const auto warp = ws.vpt == 1 ? bwd_warp<T, 1, W> : ws.vpt == 2 ? bwd_warp<T, 2, W>
                                                                    : bwd_warp<T, 4, W>;
    warp(smem, dy, dh, h, w, mean, rstd, dx, dx2, dw_part, db_part, M, N, P, rows_per, s);
    return;
  }
  // At most 256 threads, so that x-hat, w*dy and the two partial sums (4 x 32 values at
  // most) stay in registers; rows up to 8192.
  const RowShape sh = vec_shape<T>(N, 256, 32, {dy, dh, h, w, dx, dx2, dw_part, db_part});
  if (sh.vpt == 8 && bwd_vec_smem<T, 8, W>(sh.threads, dy, dh, h, w, mean, rstd, dx, dx2,
                                            dw_part, db_part, M, N, P, rows_per, s))
    return;
  if (sh.vpt) {  // 1, 2, 4 or 8 packs a thread
    const auto vec = sh.vpt == 1   ? bwd_vec<T, 1, W>
                     : sh.vpt == 2 ? bwd_vec<T, 2, W>
                     : sh.vpt == 4 ? bwd_vec<T, 4, W>
                                   : bwd_vec<T, 8, W>;
    vec(sh.threads, dy, dh, h, w, mean, rstd, dx, dx2, dw_part, db_part, M, N, P, rows_per, s);
    return;
  }
  ln_bwd_kernel<T, W><<<P, row_threads(N), 0, s>>>((const T*)dy, (const T*)dh, (const T*)h, w,
                                                   mean, rstd, (T*)dx, (T*)dx2, dw_part, db_part,
                                                   M, N, rows_per);
}

template <typename T>
int fwd_entry(int wdtype, const void* x, const void* r, const void* w, const void* b, void* y,
              void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps,
              cudaStream_t s) {
  return with_weight_type<T>(wdtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    launch_fwd<T, W>(x, r, (const W*)w, (const W*)b, y, h, mean, rstd, M, N, eps, s);
  });
}

template <typename T>
int bwd_entry(int wdtype, const void* dy, const void* dh, const void* h, const void* w,
              const float* mean, const float* rstd, void* dx, void* dx2, float* dw_part,
              float* db_part,
              int64_t M, int64_t N, int64_t P, cudaStream_t s) {
  return with_weight_type<T>(wdtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    launch_bwd<T, W>(dy, dh, h, (const W*)w, mean, rstd, dx, dx2, dw_part, db_part, M, N, P, s);
  });
}

}  // namespace

extern "C" int minigpt_layer_norm_fwd_cuda(const void* x, const void* r, const void* w,
                                           const void* b, void* y, void* h, float* mean,
                                           float* rstd, int64_t M, int64_t N, float eps, int dtype,
                                           int wdtype, cudaStream_t stream) {
  if (M == 0) return 0;
  if (M > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE_RET(dtype, fwd_entry, wdtype, x, r, w, b, y, h, mean, rstd, M, N, eps,
                             stream);
}

extern "C" int minigpt_layer_norm_bwd_cuda(const void* dy, const void* dh, const void* h,
                                           const void* w, const float* mean, const float* rstd,
                                           void* dx, void* dx2, float* dw_part, float* db_part,
                                           int64_t M,
                                           int64_t N, int64_t P, int dtype, int wdtype,
                                           cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE_RET(dtype, bwd_entry, wdtype, dy, dh, h, w, mean, rstd, dx, dx2, dw_part,
                             db_part, M, N, P, stream);
}
