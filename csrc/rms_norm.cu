// RMSNorm (+ fused residual add) CUDA kernels and their extern "C" launchers.
// Forward: one block per row; pass one forms h (and stores it) and the sum of squares, pass two
// re-reads the thread's own columns (from L1/L2) to normalize. Backward: P blocks, each owning a
// contiguous slice of rows; every thread owns a fixed set of columns, so its share of the
// dweight partial row is updated without atomics; the caller sums the P partial rows.
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T>
__global__ void rms_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r,
                               const float* __restrict__ w, T* __restrict__ y, T* __restrict__ h,
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
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) y[j] = from_f<T>(to_f(src[j]) * rstd * w[j]);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

template <typename T>
__global__ void rms_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                               const T* __restrict__ h, const float* __restrict__ w,
                               const float* __restrict__ rstd, T* __restrict__ dx,
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
      c1 += xhat * w[j] * g;
      dw[j] += g * xhat;
    }
    c1 = block_sum(c1, shm) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float xhat = to_f(xr[j]) * rs;
      float v = (w[j] * to_f(gr[j]) - xhat * c1) * rs;
      if (dh) v += to_f(dh[i * N + j]);
      dx[i * N + j] = from_f<T>(v);
    }
  }
}

template <typename T>
void launch_fwd(const void* x, const void* r, const float* w, void* y, void* h, float* rstd,
                int64_t M, int64_t N, float eps, cudaStream_t s) {
  const int threads = row_threads(N);
  rms_fwd_kernel<T><<<M, threads, 0, s>>>((const T*)x, (const T*)r, w, (T*)y, (T*)h, rstd, N,
                                          eps);
}

template <typename T>
void launch_bwd(const void* dy, const void* dh, const void* h, const float* w, const float* rstd,
                void* dx, float* dw_part, int64_t M, int64_t N, int64_t P, cudaStream_t s) {
  const int threads = row_threads(N);
  const int64_t rows_per = (M + P - 1) / P;
  rms_bwd_kernel<T><<<P, threads, 0, s>>>((const T*)dy, (const T*)dh, (const T*)h, w, rstd,
                                          (T*)dx, dw_part, M, N, rows_per);
}

}  // namespace

extern "C" int minigpt_rms_norm_fwd_cuda(const void* x, const void* r, const float* w, void* y,
                                         void* h, float* rstd, int64_t M, int64_t N, float eps,
                                         int dtype, cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, x, r, w, y, h, rstd, M, N, eps, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_rms_norm_bwd_cuda(const void* dy, const void* dh, const void* h,
                                         const float* w, const float* rstd, void* dx,
                                         float* dw_part, int64_t M, int64_t N, int64_t P,
                                         int dtype, cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, dy, dh, h, w, rstd, dx, dw_part, M, N, P, stream);
  return (int)cudaGetLastError();
}
