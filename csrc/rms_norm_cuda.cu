// RMSNorm (+ fused residual add) CUDA kernels and their extern "C" launchers.
// Two versions of each kernel. The vectorized ones (rows of whole 16-byte packs, aligned, up to
// 16 values a thread forward and 32 backward) hold the row in registers: the forward reads x
// (and r) once, stores h as rounded, sums the squares and writes y from registers; the backward
// keeps x-hat and w*dy between the reduction and dx, and its dweight sums in registers until
// the slice is done. The generic ones take any N: one block per row, a second pass re-reading
// the thread's own columns (from L1/L2).
// Backward, all: P blocks, each owning a contiguous slice of rows; every thread owns a fixed
// set of columns, so its share of the dweight partial row needs no atomics; the caller sums the
// P partial rows. A vectorized row of at most 128 packs (fp32 512 wide, fp16/bf16 1024) takes
// a third version: one warp per row, 8 rows of the slice at a time, the warps' dweight sums
// added in shared memory at the end.
// The weight (W) is fp32, or for 16-bit rows also in the rows' own dtype (a bf16 model's
// parameters, read as they are instead of cast to fp32 by an extra kernel each call).
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T, typename W>
__global__ void rms_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r,
                               const W* __restrict__ w, T* __restrict__ y, T* __restrict__ h,
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
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    float v = to_f(x[j]);
    if (r) {
      T hq = from_f<T>(v + to_f(r[j]));
      h[j] = hq;  // each thread re-reads only its own columns of h below
      v = to_f(hq);
    }
    ss += v * v;
  }
  const float rstd = rsqrtf(block_sum(ss, shm) / N + eps);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x)
    y[j] = from_f<T>(to_f(src[j]) * rstd * to_f(w[j]));
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

template <typename T, typename W>
__global__ void rms_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                               const T* __restrict__ h, const W* __restrict__ w,
                               const float* __restrict__ rstd, T* __restrict__ dx,
                               T* __restrict__ dx2,
                               float* __restrict__ dw_part, int64_t M, int64_t N,
                               int64_t rows_per) {
  __shared__ float shm[32];
  const int64_t p = blockIdx.x;
  float* dw = dw_part + p * N;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) dw[j] = 0.f;
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t i = r0; i < r1; ++i) {
    const T* xr = h + i * N;
    const T* gr = dy + i * N;
    const float rs = rstd[i];
    float c1 = 0.f;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float g = to_f(gr[j]);
      const float xhat = to_f(xr[j]) * rs;
      c1 += xhat * (to_f(w[j]) * g);  // w*dy rounded first, as the vectorized kernel keeps it
      dw[j] += g * xhat;
    }
    c1 = block_sum(c1, shm) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float xhat = to_f(xr[j]) * rs;
      float v = (to_f(w[j]) * to_f(gr[j]) - xhat * c1) * rs;
      if (dh) v += to_f(dh[i * N + j]);
      dx[i * N + j] = from_f<T>(v);
      if (dx2) dx2[i * N + j] = from_f<T>(v);
    }
  }
}

// Forward, vectorized: thread t owns packs t, t + blockDim, ... (VPT of them) of the row.
template <typename T, int VPT, typename W>
__global__ void __launch_bounds__(1024)
rms_fwd_vec_kernel(const T* __restrict__ x, const T* __restrict__ r, const W* __restrict__ w,
                   T* __restrict__ y, T* __restrict__ h, float* __restrict__ rstd_out, int64_t N,
                   float eps) {
  constexpr int V = Pack<T>::kN;
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  x += row * N;
  y += row * N;
  if (r) {
    r += row * N;
    h += row * N;
  }
  float v[VPT][V];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;  // pack q: values j..
    if (j >= N) continue;
    load_pack(at16(x, q), v[k]);
    if (r) {
      float rv[V];
      load_pack(at16(r, q), rv);
#pragma unroll
      for (int i = 0; i < V; ++i) v[k][i] = to_f(from_f<T>(v[k][i] + rv[i]));  // h as stored
      store_pack(at16(h, q), v[k]);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) ss += v[k][i] * v[k][i];
  }
  const float rstd = rsqrtf(block_sum(ss, shm) / N + eps);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    float wv[V], o[V];
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = v[k][i] * rstd * wv[i];
    store_pack(at16(y, q), o);
  }
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

// One row of the vectorized backward, shared by the two kernels below (as ln_bwd_row in
// layer_norm_cuda.cu): the thread's packs are q0, q0 + stride, ...; `sum` adds c1 over the
// threads that share the row. The row stays in registers as loaded bytes, x-hat and w*dy
// computed again for dx. Adds the row's dweight terms to dw.
template <typename T, int VPT, typename W, typename Sum>
__device__ __forceinline__ void rms_bwd_row(const T* __restrict__ h, const T* __restrict__ dy,
                                            const T* __restrict__ dh, T* __restrict__ dx,
                                            T* __restrict__ dx2,
                                            const W* __restrict__ w, float rs, int64_t N,
                                            int64_t q0, int64_t stride,
                                            float (&dw)[VPT][Pack<T>::kN], Sum sum) {
  constexpr int V = Pack<T>::kN;
  uint4 hb[VPT], gb[VPT];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = q0 + k * stride;
    if (q * V >= N) continue;
    hb[k] = load_raw(at16(h, q));
    gb[k] = load_raw(at16(dy, q));
  }
  float c1 = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = q0 + k * stride;
    if (q * V >= N) continue;
    float hv[V], g[V], wv[V];
    unpack<T>(hb[k], hv);
    unpack<T>(gb[k], g);
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float xhat = hv[i] * rs;
      c1 += xhat * (wv[i] * g[i]);
      dw[k][i] += g[i] * xhat;
    }
  }
  c1 = sum(c1) / N;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = q0 + k * stride;
    if (q * V >= N) continue;
    float hv[V], g[V], wv[V], o[V];
    unpack<T>(hb[k], hv);
    unpack<T>(gb[k], g);
    load_w<V>(w, q, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = (wv[i] * g[i] - hv[i] * rs * c1) * rs;
    if (dh) {
      float d[V];
      load_pack(at16(dh, q), d);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] += d[i];
    }
    store_pack(at16(dx, q), o);
    if (dx2) store_pack(at16(dx2, q), o);  // x's own gradient buffer (split_grads)
  }
}

// Backward, vectorized: the thread's columns are the same packs in every row of the slice, so
// its dweight sums stay in registers until the slice is done. Two blocks an SM (128 registers
// a thread at most) except for fp32 rows of 8 packs a thread, which need 168: with only the
// 256-thread bound ptxas had chosen 64 registers for 16 values a thread and spilled.
template <typename T, int VPT, typename W>
__global__ void __launch_bounds__(256, (sizeof(T) == 2 || VPT <= 4) ? 2 : 1)
rms_bwd_vec_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                   const W* __restrict__ w, const float* __restrict__ rstd,
                   T* __restrict__ dx, T* __restrict__ dx2, float* __restrict__ dw_part, int64_t M,
                   int64_t N,
                   int64_t rows_per) {
  constexpr int V = Pack<T>::kN;
  __shared__ float shm[32];
  const int64_t p = blockIdx.x;
  float dw[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = 0.f;
  // block_sum's first barrier: the last row's sum has left shm.
  const auto sum = [&](float a) { return block_sum(a, shm); };
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t base = row * N;
    rms_bwd_row<T, VPT, W>(h + base, dy + base, dh ? dh + base : nullptr, dx + base,
                           dx2 ? dx2 + base : nullptr, w,
                        rstd[row], N, threadIdx.x, blockDim.x, dw, sum);
  }
  // Blocks without rows store zeros: the caller sums all P partial rows.
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    store_f32<V>(at16(dw_part + p * N, q * V / 4), dw[k]);
  }
}

// Backward, one warp per row for rows of at most 32 * 4 packs: see ln_bwd_warp_kernel in
// layer_norm_cuda.cu (the same walk and end, without the mean and the bias).
template <typename T, int VPT, typename W>
__global__ void __launch_bounds__(256, 2)
rms_bwd_warp_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                    const W* __restrict__ w, const float* __restrict__ rstd,
                    T* __restrict__ dx, T* __restrict__ dx2, float* __restrict__ dw_part,
                    int64_t M, int64_t N,
                    int64_t rows_per) {
  constexpr int V = Pack<T>::kN;
  extern __shared__ float part[];  // warps x N
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t p = blockIdx.x;
  float dw[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = 0.f;
  const auto sum = [](float a) { return warp_sum(a); };
  const int64_t r0 = p * rows_per, r1 = min(M, r0 + rows_per);
  for (int64_t row = r0 + warp; row < r1; row += nwarps) {
    const int64_t base = row * N;
    rms_bwd_row<T, VPT, W>(h + base, dy + base, dh ? dh + base : nullptr, dx + base,
                           dx2 ? dx2 + base : nullptr, w,
                        rstd[row], N, lane, 32, dw, sum);
  }
  warps_sum_to_row(dw, part, dw_part + p * N, N);
}

template <typename T, int VPT, typename W>
void fwd_vec(int threads, const void* x, const void* r, const W* w, void* y, void* h,
             float* rstd, int64_t M, int64_t N, float eps, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= 16) {  // the only instantiations vec_shape picks
    rms_fwd_vec_kernel<T, VPT, W><<<M, threads, 0, s>>>((const T*)x, (const T*)r, w, (T*)y,
                                                        (T*)h, rstd, N, eps);
  }
}

template <typename T, typename W>
void launch_fwd(const void* x, const void* r, const W* w, void* y, void* h, float* rstd,
                int64_t M, int64_t N, float eps, cudaStream_t s) {
  // 16 row values a thread at most: 1024 threads get 64 registers each (rows up to 16384).
  const RowShape sh = vec_shape<T>(N, 1024, 16, {x, r, w, y, h});
  switch (sh.vpt) {
    case 1: fwd_vec<T, 1, W>(sh.threads, x, r, w, y, h, rstd, M, N, eps, s); break;
    case 2: fwd_vec<T, 2, W>(sh.threads, x, r, w, y, h, rstd, M, N, eps, s); break;
    case 4: fwd_vec<T, 4, W>(sh.threads, x, r, w, y, h, rstd, M, N, eps, s); break;
    default:
      rms_fwd_kernel<T, W><<<M, row_threads(N), 0, s>>>((const T*)x, (const T*)r, w, (T*)y,
                                                        (T*)h, rstd, N, eps);
  }
}

template <typename T, int VPT, typename W>
void bwd_vec(int threads, const void* dy, const void* dh, const void* h, const W* w,
             const float* rstd, void* dx, void* dx2, float* dw_part, int64_t M, int64_t N,
             int64_t P,
             int64_t rows_per, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= 32) {
    rms_bwd_vec_kernel<T, VPT, W><<<P, threads, 0, s>>>((const T*)dy, (const T*)dh,
                                                        (const T*)h, w, rstd, (T*)dx, (T*)dx2,
                                                        dw_part,
                                                        M, N, rows_per);
  }
}

template <typename T, int VPT, typename W>
void bwd_warp(size_t smem, const void* dy, const void* dh, const void* h, const W* w,
              const float* rstd, void* dx, void* dx2, float* dw_part, int64_t M, int64_t N,
              int64_t P,
              int64_t rows_per, cudaStream_t s) {
  rms_bwd_warp_kernel<T, VPT, W><<<P, 256, smem, s>>>((const T*)dy, (const T*)dh, (const T*)h,
                                                      w, rstd, (T*)dx, (T*)dx2, dw_part, M, N,
                                                      rows_per);
}

template <typename T, typename W>
void launch_bwd(const void* dy, const void* dh, const void* h, const W* w, const float* rstd,
                void* dx, void* dx2, float* dw_part, int64_t M, int64_t N, int64_t P,
                cudaStream_t s) {
  const int64_t rows_per = (M + P - 1) / P;
  // Narrow rows: a warp each, 8 warps a block (shared memory: 8 x N floats, 32 KiB at most).
  const RowShape ws = vec_shape<T>(N, 32, 4 * Pack<T>::kN, {dy, dh, h, w, dx, dx2, dw_part});
  if (ws.vpt) {
    const size_t smem = 8 * N * sizeof(float);
    const auto warp = ws.vpt == 1 ? bwd_warp<T, 1, W> : ws.vpt == 2 ? bwd_warp<T, 2, W>
                                                                    : bwd_warp<T, 4, W>;
    warp(smem, dy, dh, h, w, rstd, dx, dx2, dw_part, M, N, P, rows_per, s);
    return;
  }
  // At most 256 threads, so that x-hat, w*dy and the dweight sums (3 x 32 values at most) stay
  // in registers; rows up to 8192.
  const RowShape sh = vec_shape<T>(N, 256, 32, {dy, dh, h, w, dx, dx2, dw_part});
  if (sh.vpt) {  // 1, 2, 4 or 8 packs a thread
    const auto vec = sh.vpt == 1   ? bwd_vec<T, 1, W>
                     : sh.vpt == 2 ? bwd_vec<T, 2, W>
                     : sh.vpt == 4 ? bwd_vec<T, 4, W>
                                   : bwd_vec<T, 8, W>;
    vec(sh.threads, dy, dh, h, w, rstd, dx, dx2, dw_part, M, N, P, rows_per, s);
    return;
  }
  rms_bwd_kernel<T, W><<<P, row_threads(N), 0, s>>>((const T*)dy, (const T*)dh, (const T*)h, w,
                                                    rstd, (T*)dx, (T*)dx2, dw_part, M, N,
                                                    rows_per);
}

template <typename T>
int fwd_entry(int wdtype, const void* x, const void* r, const void* w, void* y, void* h,
              float* rstd, int64_t M, int64_t N, float eps, cudaStream_t s) {
  return with_weight_type<T>(wdtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    launch_fwd<T, W>(x, r, (const W*)w, y, h, rstd, M, N, eps, s);
  });
}

template <typename T>
int bwd_entry(int wdtype, const void* dy, const void* dh, const void* h, const void* w,
              const float* rstd, void* dx, void* dx2, float* dw_part, int64_t M, int64_t N,
              int64_t P,
              cudaStream_t s) {
  return with_weight_type<T>(wdtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    launch_bwd<T, W>(dy, dh, h, (const W*)w, rstd, dx, dx2, dw_part, M, N, P, s);
  });
}

}  // namespace

extern "C" int minigpt_rms_norm_fwd_cuda(const void* x, const void* r, const void* w, void* y,
                                         void* h, float* rstd, int64_t M, int64_t N, float eps,
                                         int dtype, int wdtype, cudaStream_t stream) {
  if (M == 0) return 0;
  if (M > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE_RET(dtype, fwd_entry, wdtype, x, r, w, y, h, rstd, M, N, eps, stream);
}

extern "C" int minigpt_rms_norm_bwd_cuda(const void* dy, const void* dh, const void* h,
                                         const void* w, const float* rstd, void* dx, void* dx2,
                                         float* dw_part, int64_t M, int64_t N, int64_t P,
                                         int dtype, int wdtype, cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE_RET(dtype, bwd_entry, wdtype, dy, dh, h, w, rstd, dx, dx2, dw_part, M, N,
                             P,
                             stream);
}
