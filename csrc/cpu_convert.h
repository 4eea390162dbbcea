// Element <-> accumulation-type conversions for the C++ CPU row loops, written so that GCC
// vectorizes them inside `#pragma omp simd`. bfloat16 is a float's top 16 bits, so plain bit
// operations convert it; c10::BFloat16's own conversions keep the loops scalar (bf16 rows ran
// 3x slower than fp32 ones). float16 still goes through c10::Half (correct, not vectorized).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

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

}  // namespace minigpt
