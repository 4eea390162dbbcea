// LayerNorm (+ fused residual add) CUDA kernels and their extern "C" launchers.
// Forward: one block per row; the row is read from global memory once per pass (mean, variance,
// normalize), later passes hitting L1/L2. Backward: P blocks, each owning a contiguous slice of
// rows; every thread owns a fixed set of columns, so its share of the dweight/dbias partial row
// is updated without atomics; the caller sums the P partial rows.
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ r,
                              const float* __restrict__ w, const float* __restrict__ b,
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
    float v = (to_f(src[j]) - mean) * rstd * w[j];
    if (b) v += b[j];
    y[j] = from_f<T>(v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                              const T* __restrict__ h, const float* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              T* __restrict__ dx, float* __restrict__ dw_part,
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
      const float wdy = w[j] * g;
      c1 += xhat * wdy;
      c2 += wdy;
      dw[j] += g * xhat;
      if (db) db[j] += g;
    }
    c1 = block_sum(c1, shm) / N;
    c2 = block_sum(c2, shm) / N;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const float xhat = (to_f(xr[j]) - mu) * rs;
      float v = (w[j] * to_f(gr[j]) - (xhat * c1 + c2)) * rs;
      if (dh) v += to_f(dh[i * N + j]);
      dx[i * N + j] = from_f<T>(v);
    }
  }
}

template <typename T>
void launch_fwd(const void* x, const void* r, const float* w, const float* b, void* y, void* h,
                float* mean, float* rstd, int64_t M, int64_t N, float eps, cudaStream_t s) {
  const int threads = row_threads(N);
  ln_fwd_kernel<T><<<M, threads, 0, s>>>((const T*)x, (const T*)r, w, b, (T*)y, (T*)h, mean,
                                         rstd, N, eps);
}

template <typename T>
void launch_bwd(const void* dy, const void* dh, const void* h, const float* w, const float* mean,
                const float* rstd, void* dx, float* dw_part, float* db_part, int64_t M, int64_t N,
                int64_t P, cudaStream_t s) {
  const int threads = row_threads(N);
  const int64_t rows_per = (M + P - 1) / P;
  ln_bwd_kernel<T><<<P, threads, 0, s>>>((const T*)dy, (const T*)dh, (const T*)h, w, mean, rstd,
                                         (T*)dx, dw_part, db_part, M, N, rows_per);
}

}  // namespace

extern "C" int minigpt_layer_norm_fwd_cuda(const void* x, const void* r, const float* w,
                                           const float* b, void* y, void* h, float* mean,
                                           float* rstd, int64_t M, int64_t N, float eps, int dtype,
                                           cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, x, r, w, b, y, h, mean, rstd, M, N, eps, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_layer_norm_bwd_cuda(const void* dy, const void* dh, const void* h,
                                           const float* w, const float* mean, const float* rstd,
                                           void* dx, float* dw_part, float* db_part, int64_t M,
                                           int64_t N, int64_t P, int dtype, cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, dy, dh, h, w, mean, rstd, dx, dw_part, db_part, M, N,
                         P, stream);
  return (int)cudaGetLastError();
}
