// Triton's tl.rand(seed, offset) (Philox4x32-10) on the CPU, bit for bit, so the C++ attention
// kernel drops the same probabilities as the Triton kernels and the reference
// (minigpt/reference/philox.py, which documents the function) for the same seed. Plain integer
// code with no library calls: inside a `#pragma omp simd` loop it vectorizes (32 x 32 -> 64-bit
// multiplies are vpmuludq). No torch headers.
#pragma once

#include <cstdint>

namespace minigpt {

// The first output word of Philox4x32-10 for counter (low 32 bits of offset, high 32 bits, 0,
// 0) and key (low 32 bits of seed, high 32 bits): tl.randint(seed, offset).
inline uint32_t philox_u32(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2;
    const uint64_t pa = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    // Round r's key is the seed's halves plus r times the Weyl constants, mod 2^32.
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// tl.rand: the word as int32, x -> x if x >= 0 else -x - 1 (= ~x, with no overflow at INT_MIN),
// converted to float and scaled by Triton's 4.6566127342e-10f: a float in [0, 1).
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  const int32_t x = static_cast<int32_t>(philox_u32(seed, offset));
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

}  // namespace minigpt
