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

// `packed`: stream the row in 16-byte packs, 8x fewer load instructions for bf16 (a vocabulary
// row is too long to keep in registers, so both passes read it). Row starts need not be aligned
// (a vocabulary of 50257 is odd): a row is a scalar head up to the first 16-byte boundary, whole
// packs, and a scalar tail; grad, when separate from the logits, has the same alignment phase
// (the launcher checks), so one split serves both. Not packed: the whole row is "head".
// SMOOTH (eps > 0): the row's sum of logits, for the smoothing term, is kept as sum(x - x_t):
// sum(x) overflowed at logits near the fp32 max (and lost all precision to cancellation in
// M - sum(x) / V at any large common offset, e.g. a row of 1e30s), where the reference's
// sum(x - lse) gives log V. Without smoothing no sum is taken at all.
template <typename T, bool SMOOTH>
__global__ void ce_fwd_kernel(const T* x, const int64_t* __restrict__ target, T* grad,
                              float* __restrict__ loss, int64_t V, int64_t ignore_index,
                              float eps, float scale, bool packed) {
  constexpr int P = Pack<T>::kN;
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
  const int64_t to_boundary = ((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / sizeof(T);
  const int64_t head = packed ? min(V, to_boundary) : V;
  const int64_t npacks = (V - head) / P, tail0 = head + npacks * P;
  const float xt = to_f(x[t]);
  // x_t = -inf (a masked target) would make x_t - x_t NaN; its loss is +inf either way.
  const float shift = isfinite(xt) ? xt : 0.f;
  float m = -INFINITY, s = 0.f, sx = 0.f;
  auto add = [&](float v) {
    if constexpr (SMOOTH) sx += v - shift;
    if (v > m) {
      s = s * __expf(m - v) + 1.f;  // __expf(-inf) = 0 on the thread's first finite value
      m = v;
    } else if (v != -INFINITY) {
      s += __expf(v - m);
    }
  };
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) add(to_f(x[j]));
  for (int64_t k = threadIdx.x; k < npacks; k += blockDim.x) {
    float v[P];
    load_pack(x + head + k * P, v);
#pragma unroll
    for (int i = 0; i < P; ++i) add(v[i]);
  }
  for (int64_t j = tail0 + threadIdx.x; j < V; j += blockDim.x) add(to_f(x[j]));
  const float M = block_max(m, shm);
  // m = -inf: the thread saw only -inf and NaN, and s is 0, or NaN if it saw a NaN. That NaN
  // must reach the row (block_max's fmaxf drops it from M): taking s as 0 there gave a row with
  // a NaN logit a finite loss and a finite gradient everywhere but the NaN's own column.
  const float mine = (m == -INFINITY) ? s : s * __expf(m - M);
  const float S = block_sum(mine, shm);
  // Everything relative to the max M: x - M is exact, where x - lse would lose the low bits of
  // large logits.
  const float logd = logf(S);
  if constexpr (SMOOTH) {
    const float SX = block_sum(sx, shm);  // sum(x - shift)
    if (threadIdx.x == 0)
      loss[row] = (1.f - eps) * ((M - xt) + logd) + eps * (((M - shift) - SX / V) + logd);
  } else {
    if (threadIdx.x == 0) loss[row] = (M - xt) + logd;
  }
  if (!grad) return;
  const float smooth = eps / V;
  auto g_of = [&](float v, int64_t j) {
    float g = __expf((v - M) - logd) - smooth;
    if (j == t) g = __expf((xt - M) - logd) - smooth - (1.f - eps);
    return scale * g;
  };
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x)
    grad[j] = from_f<T>(g_of(to_f(x[j]), j));
  for (int64_t k = threadIdx.x; k < npacks; k += blockDim.x) {
    const int64_t j0 = head + k * P;
    float v[P];
    load_pack(x + j0, v);  // before the store: grad may be x itself
#pragma unroll
    for (int i = 0; i < P; ++i) v[i] = g_of(v[i], j0 + i);
    store_pack(grad + j0, v);
  }
  for (int64_t j = tail0 + threadIdx.x; j < V; j += blockDim.x)
    grad[j] = from_f<T>(g_of(to_f(x[j]), j));
}

template <typename T>
void launch_fwd(const void* x, const int64_t* target, void* grad, float* loss, int64_t M,
                int64_t V, int64_t ignore_index, float eps, float scale, cudaStream_t s) {
  constexpr int P = Pack<T>::kN;
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), ga = reinterpret_cast<uintptr_t>(grad);
  // Packs pay once a row has a few per thread's worth; rows of a whole number of elements only.
  const bool vec = V >= 4 * P && xa % sizeof(T) == 0 && (!grad || (ga & 15) == (xa & 15));
  if (eps > 0.f)
    ce_fwd_kernel<T, true><<<M, row_threads(vec ? V / P : V), 0, s>>>(
        (const T*)x, target, (T*)grad, loss, V, ignore_index, eps, scale, vec);
  else
    ce_fwd_kernel<T, false><<<M, row_threads(vec ? V / P : V), 0, s>>>(
        (const T*)x, target, (T*)grad, loss, V, ignore_index, eps, scale, vec);
}

}  // namespace

extern "C" int minigpt_cross_entropy_fwd_cuda(const void* logits, const int64_t* target,
                                              void* grad, float* loss, int64_t M, int64_t V,
                                              int64_t ignore_index, float label_smoothing,
                                              float grad_scale, int dtype, cudaStream_t stream) {
  if (M == 0) return 0;
  if (M > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, logits, target, grad, loss, M, V, ignore_index,
                         label_smoothing, grad_scale, stream);
  return (int)cudaGetLastError();
}
