// Element <-> accumulation-type conversions and exp for the C++ CPU row loops, written so that
// GCC vectorizes them inside `#pragma omp simd`. bfloat16 is a float's top 16 bits, so plain bit
// operations convert it; c10::BFloat16's own conversions keep the loops scalar (bf16 rows ran
// 3x slower than fp32 ones). float16 likewise, below.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common.h"

namespace minigpt {

template <typename T> inline acc_t<T> load(const T* p, int64_t j) {
  return static_cast<acc_t<T>>(p[j]);
}
template <> inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t j) {
  const uint32_t u = static_cast<uint32_t>(p[j].x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T> inline void store(T* p, int64_t j, acc_t<T> v) { p[j] = static_cast<T>(v); }
template <> inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t j, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even, as c10 does
  r = (v != v) ? 0x7FC0u : r;                             // and keep a NaN a (quiet) NaN
  p[j].x = static_cast<uint16_t>(r);
}

// float16 the same way: c10::Half's conversions kept fp16 loops scalar (softmax on fp16 rows
// ran ~20x slower than eager). Branch-free bit arithmetic that GCC vectorizes, exact for every
// value: the load is exact by construction, the store rounds to nearest even like c10::Half
// (float_to_half_fast3_rtne in F. Giesen's survey of the method).
// The cases are picked with all-ones masks, not `?:`. With `?:` GCC 12 turned the load's
// subnormal case into a branch once it was inlined into softmax's and LayerNorm's row loops
// (not in a small test), and a loop with a branch is not vectorized: those fp16 loops ran
// scalar, 3-7x behind eager. (_Float16 casts are no way out: GCC 12 does not vectorize them.)
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline uint32_t all_ones_if(bool c) { return 0u - static_cast<uint32_t>(c); }
template <> inline float load<c10::Half>(const c10::Half* p, int64_t j) {
  const uint32_t h = p[j].x;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  // normal: rebias the exponent; inf / NaN: rebias to exponent 255
  const uint32_t normal =
      (em << 13) + ((127u - 15u) << 23) + (all_ones_if(em >= 0x7C00u) & ((128u - 16u) << 23));
  // zero and subnormals: em * 2^-24, exact in float
  const uint32_t sub =
      f32_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f);
  const uint32_t is_sub = all_ones_if(em < 0x0400u);
  return f32_from_bits((sub & is_sub) | (normal & ~is_sub) | ((h & 0x8000u) << 16));
}
template <> inline void store<c10::Half>(c10::Half* p, int64_t j, float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;  // |v|
  // too large for a half: inf, or a quiet NaN
  const uint32_t big = 0x7C00u | (all_ones_if(a > 0x7F800000u) & 0x0200u);
  // below the smallest normal half: let a float add round the mantissa into place
  const uint32_t small = f32_bits(f32_from_bits(a) + f32_from_bits(126u << 23)) - (126u << 23);
  // normal: rebias, add half an ulp minus one, plus the lowest kept bit (ties to even)
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t is_big = all_ones_if(a >= 0x47800000u);
  const uint32_t is_small = all_ones_if(a < (113u << 23));
  const uint32_t o = (big & is_big) | (small & is_small) | (normal & ~(is_big | is_small));
  p[j].x = static_cast<uint16_t>(o | (sign >> 16));
}

// fp16 rows are converted whole (kConvertRows<T>): load_row / store_row, through a float
// buffer, where the compiler may use F16C with its instructions (vcvtph2ps / vcvtps2ph: 8 or
// 16 elements an instruction, exact, round to nearest even; GCC 12 does not vectorize the
// _Float16 casts that would give them), else with load()/store()'s bit arithmetic, a dozen
// instructions an element that are then paid once per row instead of once per pass. With
// F16C they also convert kChunk elements at a time (kConvertChunks<T>, load_chunk /
// store_chunk below). Every other type loads and stores element by element inside the row
// loops: bf16 is a shift, and a row buffer only added passes (bf16 LayerNorm backward ran
// 1.2x slower through one). Only NaN payloads can differ between F16C and the bit arithmetic:
// vcvtps2ph keeps a NaN's top mantissa bits, store() gives 0x7E00.
template <typename T> constexpr bool kConvertRows = std::is_same_v<T, c10::Half>;
#if defined(__F16C__)
template <typename T> constexpr bool kConvertChunks = std::is_same_v<T, c10::Half>;
#else
template <typename T> constexpr bool kConvertChunks = false;
#endif

template <typename T> inline void load_row(const T* src, acc_t<T>* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = load(src, j);
}
template <typename T> inline void store_row(const acc_t<T>* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store(dst, j, src[j]);
}

// kChunk elements at a time, into or out of a small local array, for loops that convert as
// they go: GCC folds the array's store and load away (the chunk stays in a register), so a
// loop over chunks compiles to load-convert-compute-convert-store, where whole-row buffers
// cost a store and a load per element and pass (that left fp16 softmax's backward 1.35x
// behind ATen's). Only where kConvertChunks<T>: plain-C++ chunk copies of other types do not
// fold away (GCC copied a float chunk as two 32-byte halves, then read it back as one 64-byte
// vector: a store forwarding stall that made fp32 and bf16 2.5-5x slower).
constexpr int kChunk = 16;
#if defined(__F16C__)
constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
inline void load8(const c10::Half* src, float* dst) {
  _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
inline void store8(const float* src, c10::Half* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(_mm256_loadu_ps(src), kRne));
}
inline void load_chunk(const c10::Half* src, float* dst) {
#if defined(__AVX512F__)
  // The maskz forms with every lane set are the plain instructions; the plain intrinsics
  // make GCC 12 warn (-Wmaybe-uninitialized) about their _mm512_undefined_* operand.
  _mm512_storeu_ps(dst, _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(src))));
#else
  for (int k = 0; k < kChunk; k += 8) load8(src + k, dst + k);
#endif
}
inline void store_chunk(const float* src, c10::Half* dst) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_maskz_cvtps_ph(0xFFFF, _mm512_loadu_ps(src), kRne));
#else
  for (int k = 0; k < kChunk; k += 8) store8(src + k, dst + k);
#endif
}

template <> inline void load_row<c10::Half>(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) load_chunk(src + j, dst + j);
  for (; j + 8 <= n; j += 8) load8(src + j, dst + j);
  for (; j < n; ++j) dst[j] = load(src, j);
}
template <> inline void store_row<c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) store_chunk(src + j, dst + j);
  for (; j + 8 <= n; j += 8) store8(src + j, dst + j);
  for (; j < n; ++j) store(dst, j, src[j]);
}
#endif

// The row loops read a row through in_row and write one through out_row + flush_row, with
// load()/store() on what these return: where kConvertRows<T>, a float buffer the row was
// converted into (or that flush_row converts out of), else the row itself.
template <typename T> using row_t = std::conditional_t<kConvertRows<T>, acc_t<T>, T>;
template <typename T> inline const row_t<T>* in_row(const T* row, acc_t<T>* buf, int64_t n) {
  if constexpr (kConvertRows<T>) {
    load_row(row, buf, n);
    return buf;
  } else {
    return row;
  }
}
template <typename T> inline row_t<T>* out_row(T* row, acc_t<T>* buf) {
  if constexpr (kConvertRows<T>) return buf;
  else return row;
}
template <typename T> inline void flush_row(const row_t<T>* buf, T* row, int64_t n) {
  if constexpr (kConvertRows<T>) store_row(buf, row, n);
}

// The fused residual of the norms: h = x + r, stored in T, and the row the norm then reads:
// h as stored (rounded to T, like the unfused model's `x + r`), through buf where rows are
// converted. buf2 is scratch for r.
template <typename T>
inline const row_t<T>* residual_row(const T* x, const T* r, T* h, acc_t<T>* buf,
                                    acc_t<T>* buf2, int64_t n) {
  if constexpr (kConvertRows<T>) {
    load_row(x, buf, n);
    load_row(r, buf2, n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] += buf2[j];
    store_row(buf, h, n);
    load_row(h, buf, n);
    return buf;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(h, j, load(x, j) + load(r, j));
    return h;
  }
}

// dst = src * scale, converted: softmax's last pass. fp16 (F16C) in chunks, so the product
// is converted in registers instead of going back through the float row.
template <typename T>
inline void store_row_scaled(const acc_t<T>* src, acc_t<T> scale, T* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__)
  if constexpr (kConvertChunks<T>) {
    for (; j + kChunk <= n; j += kChunk) {
      float c[kChunk];
#pragma omp simd
      for (int k = 0; k < kChunk; ++k) c[k] = src[j + k] * scale;
      store_chunk(c, dst + j);
    }
  }
#endif
#pragma omp simd
  for (int64_t i = j; i < n; ++i) store(dst, i, src[i] * scale);
}

// exp(x) in plain float arithmetic, so GCC vectorizes it inside `#pragma omp simd` (std::exp
// is a libm call that vectorizes only under -ffast-math, and then a whole file loses IEEE
// semantics). Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cody-Waite, so
// n ln2 stays exact), exp(r) by a degree-6 polynomial (relative error ~1e-7), 2^n written into
// the exponent bits. Shared by softmax, cross-entropy and SwiGLU. exp_poly takes x in
// [-87.34, 88.38]; the wrappers below clamp, and give exactly 0 below the range (so
// exp(-inf) = 0, as masked logits need).
inline float exp_poly(float x) {
  // Round to nearest by adding and removing 1.5 * 2^23 (std::nearbyint would block it too).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}
constexpr float kExpLo = -87.33654f, kExpHi = 88.37626f;
// Below the range 0, above it +inf (SwiGLU's sigmoid 1 / (1 + exp(-g)) must reach 0: a
// saturated exp(88.38) left silu(-3e38) at -1.25); exp_nonpos takes x <= 0 (a value minus its
// row's max, as in softmax and cross-entropy): no upper clamp.
#if defined(__AVX512F__)
// AVX-512 vectorizes the `?:` with masked operations, a few % faster than the masks below.
inline float exp_vec(float x) {
  return x < kExpLo ? 0.0f
                    : x > kExpHi ? std::numeric_limits<float>::infinity()
                                 : exp_poly(std::max(x, kExpLo));
}
inline float exp_nonpos(float x) { return x < kExpLo ? 0.0f : exp_poly(std::max(x, kExpLo)); }
#else
// Without AVX-512 the clamp and the zero are bit masks (all_ones_if), not `?:` / std::max:
// given `x < lo ? lo : x`, GCC 12 computed exp_poly(lo) at compile time and branched around
// the polynomial for the other case, and (floating-point ops may trap) only masked vector
// operations vectorize that: in AVX2 builds softmax's exp loop ran scalar, 3.5x behind eager
// for every dtype.
inline float select_bits(uint32_t mask, float a, float b) {  // mask ? a : b, lane by lane
  return f32_from_bits((f32_bits(a) & mask) | (f32_bits(b) & ~mask));
}
inline float exp_vec(float x) {
  const uint32_t below = all_ones_if(x < kExpLo), above = all_ones_if(x > kExpHi);
  const float xc = select_bits(above, kExpHi, select_bits(below, kExpLo, x));
  return select_bits(above, std::numeric_limits<float>::infinity(),
                     select_bits(below, 0.0f, exp_poly(xc)));
}
inline float exp_nonpos(float x) {
  const uint32_t below = all_ones_if(x < kExpLo);
  return select_bits(below, 0.0f, exp_poly(select_bits(below, kExpLo, x)));
}
#endif
inline double exp_vec(double x) { return std::exp(x); }  // float64 is for gradcheck
inline double exp_nonpos(double x) { return std::exp(x); }

}  // namespace minigpt
