// softmax(scale * x) over the last dim (optionally causal): CUDA kernels and their extern "C"
// launchers. One block per row, the same algorithm as csrc/softmax.cpp: each thread keeps a
// running max and a running sum rescaled when the max grows (one read of the row), the block
// merges them, and a second pass writes exp(z - max) / sum (its reads mostly hit L1/L2).
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
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const float z = to_f(x[j]) * scale;
    if (z > m) {
      d = d * __expf(m - z) + 1.f;  // m == -inf on the first element: d = 0 * 0 + 1
      m = z;
    } else if (m != -INFINITY) {  // both -inf would be exp(NaN); exp(-inf) adds nothing anyway
      d += __expf(z - m);
    }
  }
  const float mx = block_max(m, shm);
  const float part = (m == -INFINITY) ? 0.f : d * __expf(m - mx);
  const float sum = block_sum(part, shm);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that keeps nothing is all zeros
  const float ref = (mx == -INFINITY) ? 0.f : mx;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float v = j < L ? __expf(to_f(x[j]) * scale - ref) * inv : 0.f;
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

template <typename T>
void launch_fwd(const void* x, void* y, int64_t M, int64_t N, float scale, int causal,
                int64_t Tq, cudaStream_t s) {
  softmax_fwd_kernel<T><<<M, row_threads(N), 0, s>>>((const T*)x, (T*)y, N, scale, causal,
                                                     Tq > 0 ? Tq : 1);
}

template <typename T>
void launch_bwd(const void* dy, const void* y, void* dx, int64_t M, int64_t N, float scale,
                cudaStream_t s) {
  softmax_bwd_kernel<T><<<M, row_threads(N), 0, s>>>((const T*)dy, (const T*)y, (T*)dx, N,
                                                     scale);
}

}  // namespace

extern "C" int minigpt_softmax_fwd_cuda(const void* x, void* y, int64_t M, int64_t N,
                                        float scale, int causal, int64_t T, int dtype,
                                        cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, x, y, M, N, scale, causal, T, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_softmax_bwd_cuda(const void* dy, const void* y, void* dx, int64_t M,
                                        int64_t N, float scale, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, dy, y, dx, M, N, scale, stream);
  return (int)cudaGetLastError();
}
