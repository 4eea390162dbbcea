// softmax(scale * x) over the last dim (optionally causal): CUDA kernels and their extern "C"
// launchers. Two versions of each kernel. The vectorized ones (rows of whole 16-byte packs,
// aligned, up to 16 values a thread) hold the row in registers, so it crosses global memory
// once each way: the forward takes the max, then exp(z - max) once per element, kept for the
// sum and then scaled and written; the backward keeps dy and y for its one reduction. The
// generic ones take any N, one block per row, the same algorithm as csrc/softmax.cpp: each
// thread keeps a running max and a running sum rescaled when the max grows (one read of the
// row), the block merges them, and a second pass writes exp(z - max) / sum (its reads mostly
// hit L1/L2).
// Causal row r is query i = r % T and keeps columns j < i + N - T + 1; the rest are zeros, and
// a row that keeps nothing is all zeros. Backward: dx = scale * y * (dy - sum(dy * y)).
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N,
                                   float scale, int causal, int64_t Tq) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  x += row * N;
  y += row * N;
  int64_t L = N;
  if (causal) {
    const int64_t i = row % Tq;
    L = i + N - Tq + 1;
    L = L < 0 ? 0 : (L > N ? N : L);
  }
  float m = -INFINITY, d = 0.f;
  bool nan_seen = false;  // a NaN fails both tests below: it would drop out of the sums
  // Rounded products (__fmul_rn) in both passes: nvcc would fuse the second pass's
  // `x * scale - max` into an FMA, which skips the rounding the max was taken from, and at
  // |scale * x| ~ 1e10 the row's largest value got exp(+-1e3) (csrc/softmax.cpp had that bug).
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const float z = __fmul_rn(to_f(x[j]), scale);
    nan_seen |= isnan(z);
    if (z > m) {
      d = d * __expf(m - z) + 1.f;  // m == -inf on the first element: d = 0 * 0 + 1
      m = z;
    } else if (m != -INFINITY) {  // both -inf would be exp(NaN); exp(-inf) adds nothing anyway
      d += __expf(z - m);
    }
  }
  const float mx = block_max(m, shm);
  const float part = nan_seen ? NAN : (m == -INFINITY) ? 0.f : d * __expf(m - mx);
  const float sum = block_sum(part, shm);
  const float inv = sum == 0.f ? 0.f : 1.f / sum;  // as in softmax.cpp: NaN stays NaN
  const float ref = (mx == -INFINITY) ? 0.f : mx;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float v = j < L ? __expf(__fmul_rn(to_f(x[j]), scale) - ref) * inv : 0.f;
    y[j] = from_f<T>(v);
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                   T* __restrict__ dx, int64_t N, float scale) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  dy += row * N;
  y += row * N;
  dx += row * N;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += to_f(dy[j]) * to_f(y[j]);
  s = block_sum(s, shm);
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float yj = to_f(y[j]);
    dx[j] = from_f<T>(scale * yj * (to_f(dy[j]) - s));
  }
}

// Forward, vectorized: thread t owns packs t, t + blockDim, ... (VPT of them) of the row.
template <typename T, int VPT>
__global__ void __launch_bounds__(1024)
softmax_fwd_vec_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N, float scale,
                       int causal, int64_t Tq) {
  constexpr int V = Pack<T>::kN;
  __shared__ float shm[32];
  const int64_t row = blockIdx.x, base = row * N;
  int64_t L = N;
  if (causal) {
    const int64_t i = row % Tq;
    L = i + N - Tq + 1;
    L = L < 0 ? 0 : (L > N ? N : L);
  }
  // z, then exp(z - max). Columns at or past L hold -inf, then 0: L can fall inside a pack.
  float v[VPT][V];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= L) {  // nothing of this pack is kept: not read at all
#pragma unroll
      for (int i = 0; i < V; ++i) v[k][i] = -INFINITY;
      continue;
    }
    load_pack(at16(x + base, q), v[k]);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[k][i] = j + i < L ? __fmul_rn(v[k][i], scale) : -INFINITY;  // not fused: see above
      m = fmaxf(m, v[k][i]);
    }
  }
  const float mx = block_max(m, shm);
  const float ref = (mx == -INFINITY) ? 0.f : mx;  // all -inf: exp(-inf - 0) = 0, not NaN
  float d = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[k][i] = __expf(v[k][i] - ref);
      d += v[k][i];
    }
  const float sum = block_sum(d, shm);
  const float inv = sum == 0.f ? 0.f : 1.f / sum;  // as in softmax.cpp: NaN stays NaN
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
#pragma unroll
    for (int i = 0; i < V; ++i) v[k][i] *= inv;
    store_pack(at16(y + base, q), v[k]);
  }
}

// Backward, vectorized: dy and y stay in registers between the reduction and the write of dx.
template <typename T, int VPT>
__global__ void __launch_bounds__(1024)
softmax_bwd_vec_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                       int64_t N, float scale) {
  constexpr int V = Pack<T>::kN;
  __shared__ float shm[32];
  const int64_t base = (int64_t)blockIdx.x * N;
  float g[VPT][V], yv[VPT][V];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    load_pack(at16(dy + base, q), g[k]);
    load_pack(at16(y + base, q), yv[k]);
#pragma unroll
    for (int i = 0; i < V; ++i) s += g[k][i] * yv[k][i];
  }
  s = block_sum(s, shm);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t q = (int64_t)k * blockDim.x + threadIdx.x, j = q * V;
    if (j >= N) continue;
    float o[V];
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = scale * yv[k][i] * (g[k][i] - s);
    store_pack(at16(dx + base, q), o);
  }
}

// 16 row values a thread at most, both directions: 1024 threads get 64 registers each (rows
// up to 16384); the backward holds dy and y, 32 floats, in 54 registers at most on sm_90.
constexpr int kMaxThreads = 1024, kMaxValues = 16;

template <typename T, int VPT>
void fwd_vec(int threads, const void* x, void* y, int64_t M, int64_t N, float scale, int causal,
             int64_t Tq, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= kMaxValues) {  // the only instantiations vec_shape picks
    softmax_fwd_vec_kernel<T, VPT><<<M, threads, 0, s>>>((const T*)x, (T*)y, N, scale, causal,
                                                         Tq);
  }
}

template <typename T, int VPT>
void bwd_vec(int threads, const void* dy, const void* y, void* dx, int64_t M, int64_t N,
             float scale, cudaStream_t s) {
  if constexpr (VPT * Pack<T>::kN <= kMaxValues) {
    softmax_bwd_vec_kernel<T, VPT><<<M, threads, 0, s>>>((const T*)dy, (const T*)y, (T*)dx, N,
                                                         scale);
  }
}

template <typename T>
void launch_fwd(const void* x, void* y, int64_t M, int64_t N, float scale, int causal,
                int64_t Tq, cudaStream_t s) {
  if (Tq < 1) Tq = 1;
  const RowShape sh = vec_shape<T>(N, kMaxThreads, kMaxValues, {x, y});
  switch (sh.vpt) {
    case 1: fwd_vec<T, 1>(sh.threads, x, y, M, N, scale, causal, Tq, s); break;
    case 2: fwd_vec<T, 2>(sh.threads, x, y, M, N, scale, causal, Tq, s); break;
    case 4: fwd_vec<T, 4>(sh.threads, x, y, M, N, scale, causal, Tq, s); break;
    default:
      softmax_fwd_kernel<T><<<M, row_threads(N), 0, s>>>((const T*)x, (T*)y, N, scale, causal,
                                                         Tq);
  }
}

template <typename T>
void launch_bwd(const void* dy, const void* y, void* dx, int64_t M, int64_t N, float scale,
                cudaStream_t s) {
  const RowShape sh = vec_shape<T>(N, kMaxThreads, kMaxValues, {dy, y, dx});
  switch (sh.vpt) {
    case 1: bwd_vec<T, 1>(sh.threads, dy, y, dx, M, N, scale, s); break;
    case 2: bwd_vec<T, 2>(sh.threads, dy, y, dx, M, N, scale, s); break;
    case 4: bwd_vec<T, 4>(sh.threads, dy, y, dx, M, N, scale, s); break;
    default:
      softmax_bwd_kernel<T><<<M, row_threads(N), 0, s>>>((const T*)dy, (const T*)y, (T*)dx, N,
                                                         scale);
  }
}

}  // namespace

extern "C" int minigpt_softmax_fwd_cuda(const void* x, void* y, int64_t M, int64_t N,
                                        float scale, int causal, int64_t T, int dtype,
                                        cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (M > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, x, y, M, N, scale, causal, T, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_softmax_bwd_cuda(const void* dy, const void* y, void* dx, int64_t M,
                                        int64_t N, float scale, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (M > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, dy, y, dx, M, N, scale, stream);
  return (int)cudaGetLastError();
}
