// SwiGLU, silu(gate) * up, CUDA kernels and their extern "C" launchers: grid-stride elementwise
// loops over the flattened tensors, fp32 math; backward recomputes sigmoid(gate). With every
// pointer 16-byte aligned the bulk moves in 16-byte packs and a scalar kernel takes the tail
// (n not a multiple of the pack); otherwise the scalar kernel takes it all.
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

constexpr int kThreads = 256;

// silu(g) = g / (1 + exp(-g)), not g * sigmoid(g): for g near -88 sigmoid(g) is subnormal and
// --use_fast_math flushes it to zero, while g / (1 + exp(-g)) stays normal down to g = -88.7.
// IEEE division (__fdiv_rn): fast-math's approximate division returns 0 for divisors over
// 2^126, which 1 + exp(88) is. g = -inf gives NaN, as F.silu does.
__device__ __forceinline__ float silu_f(float g, float e) { return __fdiv_rn(g, 1.f + e); }

__device__ __forceinline__ float swiglu_f(float g, float u) { return silu_f(g, __expf(-g)) * u; }

// d/dgate and d/dup of silu(g) * u times d. silu'(g) = sig + silu * (1 - sig): the subnormal
// sig drops out where silu carries the value.
__device__ __forceinline__ void swiglu_b(float d, float g, float u, float& dg, float& du) {
  const float e = __expf(-g);
  const float sig = __fdiv_rn(1.f, 1.f + e), s = silu_f(g, e);
  dg = d * u * (sig + s * (1.f - sig));
  du = d * s;
}

// Scalar, any alignment: elements [start, n) in a grid-stride loop (start > 0 for the tail the
// vectorized kernels leave).
template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                  T* __restrict__ y, int64_t start, int64_t n) {
  for (int64_t i = start + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(swiglu_f(to_f(g[i]), to_f(u[i])));
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g,
                                  const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                                  int64_t start, int64_t n) {
  for (int64_t i = start + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float a, b;
    swiglu_b(to_f(dy[i]), to_f(g[i]), to_f(u[i]), a, b);
    dg[i] = from_f<T>(a);
    du[i] = from_f<T>(b);
  }
}

// Vectorized, every pointer 16-byte aligned: pack q covers elements [q * V, q * V + V). One
// 16-byte load or store per pack and tensor instead of 8 two-byte ones for bf16/fp16.
template <typename T>
__global__ void swiglu_fwd_vec_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                      T* __restrict__ y, int64_t packs) {
  constexpr int V = Pack<T>::kN;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < packs;
       q += (int64_t)gridDim.x * blockDim.x) {
    float gv[V], uv[V], o[V];
    load_pack(at16(g, q), gv);
    load_pack(at16(u, q), uv);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = swiglu_f(gv[i], uv[i]);
    store_pack(at16(y, q), o);
  }
}

template <typename T>
__global__ void swiglu_bwd_vec_kernel(const T* __restrict__ dy, const T* __restrict__ g,
                                      const T* __restrict__ u, T* __restrict__ dg,
                                      T* __restrict__ du, int64_t packs) {
  constexpr int V = Pack<T>::kN;
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < packs;
       q += (int64_t)gridDim.x * blockDim.x) {
    float d[V], gv[V], uv[V], a[V], b[V];
    load_pack(at16(dy, q), d);
    load_pack(at16(g, q), gv);
    load_pack(at16(u, q), uv);
#pragma unroll
    for (int i = 0; i < V; ++i) swiglu_b(d[i], gv[i], uv[i], a[i], b[i]);
    store_pack(at16(dg, q), a);
    store_pack(at16(du, q), b);
  }
}

inline int grid_for(int64_t n) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (int)(blocks < 65536 ? blocks : 65536);
}

template <typename T>
void launch_fwd(const void* g, const void* u, void* y, int64_t n, cudaStream_t s) {
  constexpr int V = Pack<T>::kN;
  int64_t start = 0;
  if (aligned16(g) && aligned16(u) && aligned16(y) && n >= V) {
    const int64_t packs = n / V;
    swiglu_fwd_vec_kernel<T><<<grid_for(packs), kThreads, 0, s>>>((const T*)g, (const T*)u,
                                                                   (T*)y, packs);
    start = packs * V;
  }
  if (start < n)
    swiglu_fwd_kernel<T><<<grid_for(n - start), kThreads, 0, s>>>((const T*)g, (const T*)u,
                                                                  (T*)y, start, n);
}

template <typename T>
void launch_bwd(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                cudaStream_t s) {
  constexpr int V = Pack<T>::kN;
  int64_t start = 0;
  if (aligned16(dy) && aligned16(g) && aligned16(u) && aligned16(dg) && aligned16(du) &&
      n >= V) {
    const int64_t packs = n / V;
    swiglu_bwd_vec_kernel<T><<<grid_for(packs), kThreads, 0, s>>>(
        (const T*)dy, (const T*)g, (const T*)u, (T*)dg, (T*)du, packs);
    start = packs * V;
  }
  if (start < n)
    swiglu_bwd_kernel<T><<<grid_for(n - start), kThreads, 0, s>>>(
        (const T*)dy, (const T*)g, (const T*)u, (T*)dg, (T*)du, start, n);
}

}  // namespace

extern "C" int minigpt_swiglu_fwd_cuda(const void* gate, const void* up, void* y, int64_t n,
                                       int dtype, cudaStream_t stream) {
  if (n == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_fwd, gate, up, y, n, stream);
  return (int)cudaGetLastError();
}

extern "C" int minigpt_swiglu_bwd_cuda(const void* dy, const void* gate, const void* up,
                                       void* dgate, void* dup, int64_t n, int dtype,
                                       cudaStream_t stream) {
  if (n == 0) return 0;
  MINIGPT_DISPATCH_DTYPE(dtype, launch_bwd, dy, gate, up, dgate, dup, n, stream);
  return (int)cudaGetLastError();
}
