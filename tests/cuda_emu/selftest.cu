// Kernels that check the emulator itself (tests/test_cuda_emu.py): shuffles, barriers, launch
// limits, and the misuses it must refuse. Built only into the emulator library.
#include <stdint.h>

#include "cuda_common.cuh"

using namespace minigpt_cuda;

namespace {

// out[t] = value lane `src` of t's warp held, for each shuffle flavour (`kind`).
__global__ void shuffle_kernel(int* out, int kind, int arg) {
  const int t = threadIdx.x, v = 1000 + t;
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg); break;
    case 1: r = __shfl_xor_sync(0xffffffffu, v, arg); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, (unsigned)arg); break;
    case 3: r = __shfl_up_sync(0xffffffffu, v, (unsigned)arg); break;
    case 4: r = __shfl_xor_sync(0xffffffffu, v, arg, 8); break;  // width 8 segments
  }
  out[t] = r;
}

// Block-wide reverse through shared memory: needs the barrier between write and read.
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float buf[1024];
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

// The same without the barrier: a race the emulator's warp order must expose.
__global__ void racy_reverse_kernel(const float* in, float* out) {
  __shared__ float buf[1024];
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

// Dynamic shared memory, with threads that exit before the barrier (allowed on the GPU).
__global__ void dyn_smem_kernel(float* out, int live) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  if (t >= live) return;
  s[t] = (float)(t * t);
  __syncthreads();
  out[t] = s[live - 1 - t];
}

// Reads dynamic shared memory nobody wrote: NaN in the emulator.
__global__ void uninit_smem_kernel(float* out) {
  extern __shared__ float s[];
  out[threadIdx.x] = s[threadIdx.x];
}

// Misuse: the two halves of the block wait at different __syncthreads (undefined in CUDA).
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Misuse: a lane leaves while the rest of its warp shuffles.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void noop_kernel() {}

// A block-wide reverse staged with cp.async (4 floats a thread). mode 0: wait, barrier, read;
// 1: barrier and read without the wait (stale: the initial NaN bytes in the emulator);
// 2: never wait (the launch must fail); 3: a second batch still in flight (not waited for)
// when the first, waited for, is read.
__global__ void cp_async_kernel(const float* in, float* out, int mode) {
  extern __shared__ float4 s4[];
  const int t = threadIdx.x, n = blockDim.x;
  cp_async16(&s4[t], in + 4 * t);
  cp_async_commit();
  if (mode == 0 || mode == 3) cp_async_wait_all();
  if (mode == 3) {
    cp_async16(&s4[n + t], in + 4 * t);
    cp_async_commit();
  }
  __syncthreads();
  const float4 v = s4[n - 1 - t];
  out[4 * t] = v.x;
  out[4 * t + 1] = v.y;
  out[4 * t + 2] = v.z;
  out[4 * t + 3] = v.w;
  if (mode == 1 || mode == 3) cp_async_wait_all();
}

// A 16-byte load from wherever `in` points: a fault on a GPU unless it is 16-byte aligned.
__global__ void pack_load_kernel(const float* in, float* out) {
  float v[4];
  load_pack(in, v);
  out[0] = v[0] + v[1] + v[2] + v[3];
}

template <typename T>
__global__ void convert_kernel(const float* in, T* out, float* back, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = from_f<T>(in[i]);
  back[i] = to_f(out[i]);
}

template <typename T>
void launch_convert(const float* in, void* out, float* back, int64_t n) {
  convert_kernel<T><<<(unsigned)((n + 255) / 256), 256>>>(in, (T*)out, back, n);
}

}  // namespace

extern "C" int emu_test_shuffle(int* out, int threads, int kind, int arg) {
  shuffle_kernel<<<1, threads>>>(out, kind, arg);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_reverse(const float* in, float* out, int blocks, int threads) {
  reverse_kernel<<<blocks, threads>>>(in, out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_racy_reverse(const float* in, float* out, int blocks, int threads) {
  racy_reverse_kernel<<<blocks, threads>>>(in, out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_dyn_smem(float* out, int threads, int live, int64_t smem, int opt_in) {
  if (opt_in) {
    cudaError_t e = cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
    if (e != cudaSuccess) return (int)e;
  }
  dyn_smem_kernel<<<1, threads, (size_t)smem>>>(out, live);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_uninit_smem(float* out, int threads) {
  uninit_smem_kernel<<<1, threads, threads * sizeof(float)>>>(out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_divergent_barrier(float* out) {
  divergent_barrier_kernel<<<1, 32>>>(out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_exited_lane(float* out) {
  exited_lane_kernel<<<1, 32>>>(out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_launch(int gx, int gy, int threads) {
  noop_kernel<<<dim3(gx, gy), threads>>>();
  return (int)cudaGetLastError();
}

extern "C" int emu_test_convert(const float* in, void* out, float* back, int64_t n, int dtype) {
  MINIGPT_DISPATCH_DTYPE(dtype, launch_convert, in, out, back, n);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_pack_load(const float* in, float* out) {
  pack_load_kernel<<<1, 32>>>(in, out);
  return (int)cudaGetLastError();
}

extern "C" int emu_test_cp_async(const float* in, float* out, int threads, int mode) {
  cp_async_kernel<<<1, threads, 2 * threads * sizeof(float4)>>>(in, out, mode);
  return (int)cudaGetLastError();
}
