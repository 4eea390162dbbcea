// Cross-entropy CUDA kernel and its extern "C" launcher; the same math as csrc/cross_entropy.cpp.
// One block per row. Each thread keeps its own running (max, sum of exp) over the columns it
// strides through (online logsumexp), then the block merges them: block max M, every thread
// rescales its sum to M, block sum. A second pass writes the gradient, which may overwrite the
// logits (grad may alias logits): every thread reads and then writes only its own columns, and
// x_t is read before the first __syncthreads, ahead of any write.
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T>
__global__ void ce_fwd_kernel(const T* x, const int64_t* __restrict__ target, T* grad,
                              float* __restrict__ loss, int64_t V, int64_t ignore_index,
                              float eps, float scale) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  x += row * V;
  if (grad) grad += row * V;
  const int64_t t = target[row];
  if (t == ignore_index || t < 0 || t >= V) {
    // The Python side rejects out-of-range targets before launching; never read outside the row.
    if (threadIdx.x == 0) loss[row] = (t == ignore_index) ? 0.f : __int_as_float(0x7fc00000);
    if (grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) grad[j] = from_f<T>(0.f);
    return;
  }
  const float xt = to_f(x[t]);
  float m = -INFINITY, s = 0.f, sx = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = to_f(x[j]);
    sx += v;
    if (v > m) {
      s = s * __expf(m - v) + 1.f;  // __expf(-inf) = 0 on the thread's first finite value
      m = v;
    } else if (v != -INFINITY) {
      s += __expf(v - m);
    }
  }
  const float M = block_max(m, shm);
  const float mine = (m == -INFINITY) ? 0.f : s * __expf(m - M);
  const float S = block_sum(mine, shm);
  const float SX = block_sum(sx, shm);
  // Everything relative to the max M: x - M is exact, where x - lse would lose the low bits of
  // large logits. Without smoothing SX is unused (and -inf logits, i.e. masked classes, would
  // make 0 * SX NaN).
  const float logd = logf(S);
  if (threadIdx.x == 0)
    loss[row] = (1.f - eps) * ((M - xt) + logd) + (eps > 0.f ? eps * ((M - SX / V) + logd) : 0.f);
  if (grad) {
    const float smooth = eps / V;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      float g = __expf((to_f(x[j]) - M) - logd) - smooth;
      if (j == t) g = __expf((xt - M) - logd) - smooth - (1.f - eps);
      grad[j] = from_f<T>(scale * g);
    }
  }
}

template <typename T>
void launch_fwd(const void* x, const int64_t* target, void* grad, float* loss, int64_t M,
                int64_t V, int64_t ignore_index, float eps, float scale, cudaStream_t s) {
  const int threads = row_threads(V);
  ce_fwd_kernel<T><<<M, threads, 0, s>>>((const T*)x, target, (T*)grad, loss, V, ignore_index,
                                         eps, scale);
}

}  // namespace

extern "C" int minigpt_cross_entropy_fwd_cuda(const void* logits, const int64_t* target,
                                              void* grad, float* loss, int64_t M, int64_t V,
                                              int64_t ignore_index, float label_smoothing,
                                              float grad_scale, int dtype, cudaStream_t stream) {
  if (M == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, logits, target, grad, loss, M, V, ignore_index,
                         label_smoothing, grad_scale, stream);
  return (int)cudaGetLastError();
}
