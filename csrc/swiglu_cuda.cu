// SwiGLU, silu(gate) * up, CUDA kernels and their extern "C" launchers: grid-stride elementwise
// loops over the flattened tensors, fp32 math; backward recomputes sigmoid(gate).
#include "cuda_common.cuh"
#include "cuda_launchers.h"  // the definitions below must match these declarations

using namespace minigpt_cuda;

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                  T* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float gv = to_f(g[i]);
    y[i] = from_f<T>(gv * sigmoidf_(gv) * to_f(u[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g,
                                  const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                                  int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float d = to_f(dy[i]), gv = to_f(g[i]), uv = to_f(u[i]);
    const float sig = sigmoidf_(gv);
    dg[i] = from_f<T>(d * uv * sig * (1.f + gv * (1.f - sig)));
    du[i] = from_f<T>(d * gv * sig);
  }
}

inline int grid_for(int64_t n) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (int)(blocks < 65536 ? blocks : 65536);
}

template <typename T>
void launch_fwd(const void* g, const void* u, void* y, int64_t n, cudaStream_t s) {
  swiglu_fwd_kernel<T><<<grid_for(n), kThreads, 0, s>>>((const T*)g, (const T*)u, (T*)y, n);
}

template <typename T>
void launch_bwd(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                cudaStream_t s) {
  swiglu_bwd_kernel<T><<<grid_for(n), kThreads, 0, s>>>((const T*)dy, (const T*)g, (const T*)u,
                                                        (T*)dg, (T*)du, n);
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
