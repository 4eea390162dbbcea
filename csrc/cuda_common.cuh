// Shared by the .cu files. No torch headers here: the .cu files build with nvcc alone
// (CI compiles each with `nvcc -c -arch=sm_90`), and talk to torch only through the
// extern "C" launchers declared in csrc/cuda_launchers.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace minigpt_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };  // must match csrc/common.h

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block; every thread gets the result. `shm` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous reduction
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = (lane < nwarps) ? shm[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = (lane < nwarps) ? shm[lane] : -INFINITY;
  return warp_max(v);
}

inline int row_threads(int64_t n) {
  int t = 32;
  while (t < n && t < 1024) t <<= 1;
  return t;
}

}  // namespace minigpt_cuda

// Call F<T>(args...) with T the element type for a dtype code.
#define MINIGPT_DISPATCH_DTYPE(code, F, ...)                                   \
  switch (code) {                                                              \
    case minigpt_cuda::kF32: F<float>(__VA_ARGS__); break;                     \
    case minigpt_cuda::kF16: F<__half>(__VA_ARGS__); break;                    \
    case minigpt_cuda::kBF16: F<__nv_bfloat16>(__VA_ARGS__); break;            \
    default: return (int)cudaErrorInvalidValue;                                \
  }
