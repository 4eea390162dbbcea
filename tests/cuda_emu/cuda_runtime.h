// A CPU stand-in for the part of CUDA that csrc/*.cu use, so that machines without a GPU (this
// one, CI) run our CUDA kernels and check their numbers, not just compile them.
//
// tests/cuda_emu/build.py compiles each csrc/*.cu with g++ against this header (it shadows
// <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h>) after rewriting the two CUDA-only pieces of
// syntax: `kernel<<<grid, block, smem, stream>>>(args)` becomes `emu::Launch(grid, block, smem,
// stream)(kernel, args)`, and `extern __shared__ T name[];` becomes a pointer to the launch's
// dynamic shared memory. Everything else is the kernel source as nvcc sees it.
//
// How it runs (cuda_emu.cpp): every CUDA thread of a block is a fiber with its own stack, on one
// OS thread. A fiber runs until it reaches __syncthreads, __syncwarp or a __shfl_*_sync. A
// warp-level call completes once all 32 lanes of the warp wait at the same call (a shuffle's
// value is taken from its source lane at that moment); __syncthreads once every live thread of
// the block waits at the same one. Anything else -- threads of a warp at different calls, a lane
// that returned while its warp shuffles, two halves of a block at different barriers -- hangs or
// is undefined on a GPU, and the emulator fails the launch and says where. Each warp runs as far
// as it can before the next one starts (last warp first in even blocks, first warp first in odd
// ones), so a missing barrier between one warp's shared-memory write and another's read, either
// way round, gives wrong numbers. Blocks run one after another, so `__shared__` variables are
// plain statics; dynamic shared memory starts filled with NaN bytes each block, so reading a
// slot nobody wrote shows up in the results. Launches are synchronous and checked against the
// H100's limits (1024 threads, grid y/z 65535, 48 KiB of dynamic shared memory unless the
// kernel opted in, 227 KiB at most), and a misaligned vector access fails the launch as it would
// fault on a GPU (build.py compiles the kernels with UBSan's alignment check; cuda_emu.cpp
// handles its reports).
//
// Not modelled: races between lanes of one warp (they run one after another between warp-level
// calls: a missing __syncwarp can go unnoticed), the fast-math intrinsics' lower accuracy
// (__expf is expf here), timing.
#pragma once

// csrc/cuda_common.cuh takes the emulator's paths for what it models itself (cp.async).
#define MINIGPT_CUDA_EMU 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: a block's threads share the static

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
};

struct uint3 {
  unsigned x, y, z;
};

// Vector types, aligned as CUDA aligns them (16-byte loads and stores need it).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates; the scheduler sets them before it resumes a fiber.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace emu {

// Runs thunk(ctx) as every thread of grid x block; returns the launch's error (also kept for
// cudaGetLastError).
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
                     void (*thunk)(void*), void* ctx);
cudaError_t set_max_dynamic_smem(const void* kernel, int attr, int value);
cudaError_t take_last_error();
void* dynamic_smem();
void sync_block(int line);
void sync_warp(unsigned mask, int line);
// Lane-to-lane exchange: hands `bits` in, returns the bits of lane `src` (of this warp).
uint64_t exchange(unsigned mask, uint64_t bits, int src, int line);
// cp.async (csrc/cuda_common.cuh's cp_async16 and friends): the copy is read at once but lands
// in shared memory only when the issuing thread waits for its group, the latest moment the
// hardware may complete it, so a thread that reads the destination before that wait (and the
// __syncthreads after it) reads stale data and the tests fail. A block that ends with a copy
// nobody waited for fails its launch.
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

inline int linear_tid() {
  return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
inline int lane_id() { return linear_tid() & 31; }

template <typename T>
T shuffle(unsigned mask, T v, int src, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "the emulator shuffles values of at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src, line);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// `kernel<<<grid, block, smem, stream>>>(args...)`, rewritten by build.py into
// `emu::Launch(grid, block, smem, stream)(kernel, args...)`.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr)
      : grid_(grid), block_(block), smem_(smem) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong argument count");
    // Arguments convert to the parameter types once, at the launch, as CUDA copies them.
    using Params = std::tuple<typename std::decay<P>::type...>;
    Params params(static_cast<typename std::decay<P>::type>(args)...);
    struct Ctx {
      void (*kernel)(P...);
      Params* params;
    } ctx{kernel, &params};
    run_grid(reinterpret_cast<const void*>(kernel), grid_, block_, smem_,
             [](void* c) {
               Ctx* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, *x->params);
             },
             &ctx);
  }

 private:
  dim3 grid_, block_;
  size_t smem_;
};

}  // namespace emu

// ---- runtime API ----------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return emu::take_last_error(); }

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), (int)attr, value);
}

// The emulated device: an H100's per-SM limits, but only kEmuSMs SMs, so that a persistent
// kernel (a grid sized to the GPU, each block looping over rows) loops here on small tests.
constexpr int kEmuSMs = 3;
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kEmuSMs; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;  // an H100
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 232448; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that fit on one SM
// by threads (2048) and shared memory (228 KiB, 1 KiB reserved a block); registers are not
// modelled (the kernels using it bound them with __launch_bounds__).
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F*, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  const int by_threads = 2048 / threads, by_smem = (int)(233472 / (smem + 1024));
  *n = by_threads < by_smem ? by_threads : by_smem;
  if (*n > 32) *n = 32;
  return cudaSuccess;
}

// ---- device intrinsics ----------------------------------------------------------------------
inline void __syncthreads(int line = __builtin_LINE()) { emu::sync_block(line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  emu::sync_warp(mask, line);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, int line = __builtin_LINE()) {
  const int lane = emu::lane_id(), base = lane & ~(width - 1);
  return emu::shuffle(mask, v, base + (src_lane & (width - 1)), line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  int line = __builtin_LINE()) {
  const int lane = emu::lane_id(), base = lane & ~(width - 1);
  int src = lane ^ lane_mask;
  if (src < base || src >= base + width) src = lane;
  return emu::shuffle(mask, v, src, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   int line = __builtin_LINE()) {
  const int lane = emu::lane_id(), base = lane & ~(width - 1);
  int src = lane + (int)delta;
  if (src >= base + width) src = lane;
  return emu::shuffle(mask, v, src, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 int line = __builtin_LINE()) {
  const int lane = emu::lane_id(), base = lane & ~(width - 1);
  int src = lane - (int)delta;
  if (src < base) src = lane;
  return emu::shuffle(mask, v, src, line);
}

// CUDA's integer min/max overloads, which host C++ lacks outside std::.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return (C)a < (C)b ? (C)b : (C)a;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
// A rounded product the compiler may not fuse into a later add (g++ here emits no FMA anyway).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __int_as_float(int v) {
  float f;
  memcpy(&f, &v, 4);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  memcpy(&v, &f, 4);
  return v;
}
inline float __uint_as_float(unsigned v) {
  float f;
  memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned v;
  memcpy(&v, &f, 4);
  return v;
}

// ---- fp16 / bf16 storage types and their round-to-nearest-even conversions --------------------
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.__x & 0x8000) << 16, e = (h.__x >> 10) & 0x1f,
                 m = h.__x & 0x3ff;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    const float f = ldexpf((float)m, -24);
    return sign ? -f : f;
  }
  const uint32_t u = e == 31 ? (sign | 0x7f800000u | (m << 13))    // inf, NaN
                              : (sign | ((e + 112) << 23) | (m << 13));  // exponent bias 15 -> 127
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  uint32_t ax = x & 0x7fffffffu;
  __half h;
  if (ax > 0x7f800000u) {
    h.__x = sign | 0x7e00;  // NaN
  } else if (ax >= 0x477ff000u) {
    h.__x = sign | 0x7c00;  // from 65520 up (the tie past 65504 rounds to even): inf
  } else if (ax < 0x38800000u) {  // below 2^-14: a subnormal half m * 2^-24, or zero
    float a;
    memcpy(&a, &ax, 4);
    h.__x = sign | (uint16_t)lrintf(a * 16777216.f);  // exact scaling, then round to even
  } else {
    ax += 0x0fffu + ((ax >> 13) & 1);  // round to nearest even at the 13 dropped bits
    h.__x = sign | (uint16_t)((ax - 0x38000000u) >> 13);  // exponent bias 127 -> 15
  }
  return h;
}

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.__x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.__x = (uint16_t)((u >> 16) | 0x40);  // keep NaN a NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1);
    h.__x = (uint16_t)(u >> 16);
  }
  return h;
}
