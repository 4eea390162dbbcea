// Rotary position embeddings (rotate-half layout) CUDA kernel and its extern "C" launcher.
// One block per (batch, position): the block loads that position's cos/sin row once (through
// L1) and rotates every query and key head there. q and k are read through their strides; the
// outputs are contiguous (B, H, T, D). `inverse` rotates by -sin (the backward); see
// csrc/rope.cpp for the formulas.
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

template <typename T>
__device__ __forceinline__ void rotate_heads(const T* __restrict__ x, T* __restrict__ o,
                                             int64_t b, int64_t t, int64_t H, int64_t T_,
                                             int64_t D, int64_t sb, int64_t sh, int64_t st,
                                             const float* __restrict__ c,
                                             const float* __restrict__ s, bool valid,
                                             int inverse) {
  const int64_t d = D / 2;
  for (int64_t idx = threadIdx.x; idx < H * d; idx += blockDim.x) {
    const int64_t h = idx / d, j = idx % d;
    const T* xr = x + b * sb + h * sh + t * st;
    const float x1 = to_f(xr[j]), x2 = to_f(xr[j + d]);
    float c1 = 0.f, c2 = 0.f, s1 = 0.f, s2 = 0.f;
    if (valid) {
      c1 = c[j];
      c2 = c[j + d];
      s1 = s[j];
      s2 = s[j + d];
    }
    float y1, y2;
    if (inverse) {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    } else {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    }
    T* orow = o + ((b * H + h) * T_ + t) * D;
    orow[j] = from_f<T>(y1);
    orow[j + d] = from_f<T>(y2);
  }
}

template <typename T>
__global__ void rope_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ qo,
                            T* __restrict__ ko, const float* __restrict__ cos,
                            const float* __restrict__ sin, const int64_t* __restrict__ pos,
                            int64_t Hq, int64_t Hk, int64_t T_, int64_t D, int64_t qsb,
                            int64_t qsh, int64_t qst, int64_t ksb, int64_t ksh, int64_t kst,
                            int64_t cos_bstride, int64_t pos_bstride, int64_t L, int inverse) {
  const int64_t b = blockIdx.x / T_, t = blockIdx.x % T_;
  int64_t row;
  bool valid = true;
  if (pos) {
    const int64_t p = pos[b * pos_bstride + t];
    // Positions are validated on the host for CPU tensors only (no sync here): an
    // out-of-range one must not read outside the table.
    valid = p >= 0 && p < L;
    row = valid ? p * D : 0;
  } else {
    row = b * cos_bstride + t * D;
  }
  rotate_heads<T>(q, qo, b, t, Hq, T_, D, qsb, qsh, qst, cos + row, sin + row, valid, inverse);
  rotate_heads<T>(k, ko, b, t, Hk, T_, D, ksb, ksh, kst, cos + row, sin + row, valid, inverse);
}

template <typename T>
void launch(const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
            const int64_t* pos, int64_t B, int64_t Hq, int64_t Hk, int64_t T_, int64_t D,
            int64_t qsb, int64_t qsh, int64_t qst, int64_t ksb, int64_t ksh, int64_t kst,
            int64_t cos_bstride, int64_t pos_bstride, int64_t L, int inverse, cudaStream_t s) {
  const int64_t work = (Hq > Hk ? Hq : Hk) * (D / 2);
  const int threads = work >= 256 ? 256 : (work >= 128 ? 128 : (work >= 64 ? 64 : 32));
  rope_kernel<T><<<B * T_, threads, 0, s>>>((const T*)q, (const T*)k, (T*)qo, (T*)ko, cos, sin,
                                            pos, Hq, Hk, T_, D, qsb, qsh, qst, ksb, ksh, kst,
                                            cos_bstride, pos_bstride, L, inverse);
}

}  // namespace

extern "C" int minigpt_rope_cuda(const void* q, const void* k, void* qo, void* ko,
                                 const float* cos, const float* sin, const int64_t* pos,
                                 int64_t B, int64_t Hq, int64_t Hk, int64_t T, int64_t D,
                                 int64_t qsb, int64_t qsh, int64_t qst, int64_t ksb, int64_t ksh,
                                 int64_t kst, int64_t cos_bstride, int64_t pos_bstride, int64_t L,
                                 int inverse, int dtype, cudaStream_t stream) {
  if (B * T == 0) return 0;
  if (B * T > kMaxGridX) return (int)cudaErrorInvalidConfiguration;
  MINIGPT_DISPATCH_DTYPE(dtype, launch, q, k, qo, ko, cos, sin, pos, B, Hq, Hk, T, D, qsb, qsh,
                         qst, ksb, ksh, kst, cos_bstride, pos_bstride, L, inverse, stream);
  return (int)cudaGetLastError();
}
