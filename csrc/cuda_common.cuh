// Shared by the .cu files. No torch headers here: the .cu files build with nvcc alone
// (CI compiles each with `nvcc -c -arch=sm_90`), and talk to torch only through the
// extern "C" launchers declared in csrc/cuda_launchers.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>
#include <type_traits>

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

// Grid x's limit. The kernels with a block per row (or per position) refuse more rows than
// this: launched as `<<<M, ...>>>`, M becomes an unsigned int, and 2^32 + 1 rows ran one block
// and returned success.
constexpr int64_t kMaxGridX = 2147483647;

inline int row_threads(int64_t n) {
  int t = 32;
  while (t < n && t < 1024) t <<= 1;
  return t;
}

// ---- 16-byte packs ---------------------------------------------------------------------------
// The vectorized row kernels move a row in 16-byte packs (one ld/st.global.v4 each: 4 floats or
// 8 halves) and keep it in registers, so it crosses global memory once per direction. A row can
// take that path when every pointer is 16-byte aligned and N is a whole number of packs.
template <typename T>
struct Pack {
  static constexpr int kN = 16 / sizeof(T);
};

// A 16-bit value's bits and back. Packs of halves are assembled into 32-bit words by hand: built
// through a union of T[8], nvcc split many 16-byte stores into 4-byte pairs of halves.
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename T> __device__ __forceinline__ float from_bits16(uint32_t b);
template <> __device__ __forceinline__ float from_bits16<__half>(uint32_t b) {
  return __half2float(__ushort_as_half((unsigned short)b));
}
template <> __device__ __forceinline__ float from_bits16<__nv_bfloat16>(uint32_t b) {
  return __uint_as_float(b << 16);
}

// A pack's 16 bytes as loaded, and their values as floats: kernels that keep a row across two
// passes hold the bytes (8 bf16 values in 4 registers instead of 8) and unpack them twice.
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* __restrict__ p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4 u, float* v) {
  if constexpr (sizeof(T) == 4) {
    v[0] = __uint_as_float(u.x);
    v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
  } else {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = from_bits16<T>(w[i] & 0xffffu);
      v[2 * i + 1] = from_bits16<T>(w[i] >> 16);
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, float* v) {
  unpack<T>(load_raw(p), v);
}

// A pack's values rounded to T, as the 16 bytes a store writes (unpack's inverse).
template <typename T>
__device__ __forceinline__ uint4 pack(const float* v) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = bits16(from_f<T>(v[2 * i])) | (bits16(from_f<T>(v[2 * i + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float* v) {
  *reinterpret_cast<uint4*>(p) = pack<T>(v);
}

// n fp32 values (n a multiple of 4) as float4s: the weights that go with one pack.
template <int n>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float* v) {
#pragma unroll
  for (int i = 0; i < n; i += 4) {
    const float4 f = *reinterpret_cast<const float4*>(p + i);
    v[i] = f.x;
    v[i + 1] = f.y;
    v[i + 2] = f.z;
    v[i + 3] = f.w;
  }
}

template <int n>
__device__ __forceinline__ void store_f32(float* __restrict__ p, const float* v) {
#pragma unroll
  for (int i = 0; i < n; i += 4)
    *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
}

// p advanced by n 16-byte units. The vectorized kernels index their rows in these units, not as
// `p + j`: from `p + j` nvcc 13.0 kept 16-byte stores for a thread's first two packs only and
// split the later ones into 4-byte stores (y, dx, dweight at 4 or more packs a thread).
template <typename T>
__device__ __forceinline__ T* at16(T* p, int64_t n) {
  return reinterpret_cast<T*>(reinterpret_cast<uint4*>(p) + n);
}
template <typename T>
__device__ __forceinline__ const T* at16(const T* p, int64_t n) {
  return reinterpret_cast<const T*>(reinterpret_cast<const uint4*>(p) + n);
}

// The V weights (of a norm) that go with pack q of a row, as floats: fp32 ones as float4s,
// 16-bit ones (V = 8 then: the rows are 16-bit too) as one pack.
template <int V, typename W>
__device__ __forceinline__ void load_w(const W* __restrict__ w, int64_t q, float* v) {
  if constexpr (std::is_same<W, float>::value) {
    load_f32<V>(at16(w, q * V / 4), v);
  } else {
    static_assert(V == Pack<W>::kN, "16-bit weights go with 16-bit rows");
    load_pack(at16(w, q), v);
  }
}

// The row-per-warp backward kernels' end: each warp holds partial column sums acc for the
// packs it owns (pack k * 32 + lane, k < VPT); they meet in shared memory `part` (warps x N
// floats) and the block writes their sum to out[0, N).
template <int VPT, int V>
__device__ __forceinline__ void warps_sum_to_row(const float (&acc)[VPT][V], float* part,
                                                 float* __restrict__ out, int64_t N) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // part may still be read by a previous call
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t j = ((int64_t)k * 32 + lane) * V;
    if (j >= N) continue;
#pragma unroll
    for (int i = 0; i < V; ++i) part[warp * N + j + i] = acc[k][i];
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += part[w * N + c];
    out[c] = s;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- asynchronous copies, global to shared (cp.async, sm_80 on) ----------------------------
// A kernel that walks tiles issues the next tile's copies, computes on the current one while
// they are in flight, and only then waits: cp_async16 per 16-byte pack (both addresses
// 16-byte aligned), cp_async_commit to close the batch, cp_async_wait_all for every batch this
// thread issued; the __syncthreads after the wait makes all threads' copies visible to all.
// Below sm_80 the copy is a plain load and store. The CPU emulator (tests/cuda_emu) lands a
// copy only at its thread's wait, so a read that comes before the wait fails the tests there.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   (unsigned)__cvta_generic_to_shared(dst)),
               "l"(src)
               : "memory");
#elif defined(MINIGPT_CUDA_EMU)
  ::emu::cp_async(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(MINIGPT_CUDA_EMU)
  ::emu::cp_async_commit();
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#elif defined(MINIGPT_CUDA_EMU)
  ::emu::cp_async_wait(0);
#endif
}

// Threads and packs per thread (vpt, a power of two <= max_vpt) for a vectorized row kernel
// over `packs` packs: about two packs a thread, at most max_threads threads. {0, 0} when the
// row does not fit: the caller takes its generic kernel.
struct RowShape {
  int threads, vpt;
};
inline RowShape row_shape(int64_t packs, int max_threads, int max_vpt) {
  int t = 32;
  while (t < max_threads && 2 * (int64_t)t < packs) t <<= 1;
  int vpt = 1;
  while ((int64_t)vpt * t < packs) vpt <<= 1;
  if (vpt > max_vpt) return {0, 0};
  return {t, vpt};
}

// The vectorized kernels' shape for a row of N values of T, at most max_values a thread, or
// {0, 0} for the generic kernels: N not whole packs, or a (non-null) pointer not 16-byte aligned.
template <typename T>
RowShape vec_shape(int64_t N, int max_threads, int max_values,
                   std::initializer_list<const void*> ptrs) {
  constexpr int V = Pack<T>::kN;
  if (N % V != 0) return {0, 0};
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return {0, 0};
  return row_shape(N / V, max_threads, max_values / V);
}

// A 16-bit T's dtype code (kF32 for float).
template <typename T>
constexpr int code_of() {
  return std::is_same<T, __half>::value ? kF16 : std::is_same<T, __nv_bfloat16>::value ? kBF16
                                                                                       : kF32;
}

// The norms' weight type W for rows of T and the weights' dtype code: fp32, or T itself for
// 16-bit rows. Calls f(TypeTag<W>{}) (f reads W as `typename decltype(tag)::type`) and returns
// the launch's error, or cudaErrorInvalidValue for any other pair.
template <typename W>
struct TypeTag {
  using type = W;
};

template <typename T, typename F>
int with_weight_type(int wdtype, F&& f) {
  if (wdtype == kF32) {
    f(TypeTag<float>{});
  } else if constexpr (sizeof(T) == 2) {
    if (wdtype != code_of<T>()) return (int)cudaErrorInvalidValue;
    f(TypeTag<T>{});
  } else {
    return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
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

// Return F<T>(args...) with T the element type for a dtype code.
#define MINIGPT_DISPATCH_DTYPE_RET(code, F, ...)                               \
  switch (code) {                                                              \
    case minigpt_cuda::kF32: return F<float>(__VA_ARGS__);                     \
    case minigpt_cuda::kF16: return F<__half>(__VA_ARGS__);                    \
    case minigpt_cuda::kBF16: return F<__nv_bfloat16>(__VA_ARGS__);            \
    default: return (int)cudaErrorInvalidValue;                                \
  }
