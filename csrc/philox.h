// Triton's tl.rand(seed, offset) (Philox4x32-10) on the CPU, bit for bit, so the C++ attention
// kernel drops the same probabilities as the Triton kernels and the reference
// (minigpt/reference/philox.py, which documents the function) for the same seed. Plain integer
// code with no library calls: inside a `#pragma omp simd` loop it vectorizes (32 x 32 -> 64-bit
// multiplies are vpmuludq). No torch headers.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace minigpt {

// The first output word of Philox4x32-10 for counter (low 32 bits of offset, high 32 bits, 0,
// 0) and key (low 32 bits of seed, high 32 bits): tl.randint(seed, offset).
inline uint32_t philox_u32(uint64_t seed, uint64_t offset) {
  // The 32-bit words live in 64-bit variables, masked: GCC 12 then vectorizes the loop on
  // 64-bit lanes with fewer shuffles than on 32-bit words widened per multiply (measured
  // 2.5 against 3.2 ns per draw on AVX-512; either way 64 x 64-bit multiplies, vpmullq).
  constexpr uint64_t M = 0xFFFFFFFFu;
  uint64_t c0 = offset & M, c1 = offset >> 32, c2 = 0, c3 = 0;
  uint64_t k0 = seed & M, k1 = seed >> 32;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = c2 * 0xCD9E8D57u;  // < 2^64: both factors < 2^32
    const uint64_t pa = c0 * 0xD2511F53u;
    const uint64_t n0 = (pb >> 32) ^ c1 ^ k0;
    const uint64_t n2 = (pa >> 32) ^ c3 ^ k1;
    c1 = pb & M;
    c3 = pa & M;
    c0 = n0;
    c2 = n2;
    // Round r's key is the seed's halves plus r times the Weyl constants, mod 2^32.
    k0 = (k0 + 0x9E3779B9u) & M;
    k1 = (k1 + 0xBB67AE85u) & M;
  }
  return static_cast<uint32_t>(c0);
}

// tl.rand: the word as int32, x -> x if x >= 0 else -x - 1 (= ~x, with no overflow at INT_MIN),
// converted to float and scaled by Triton's 4.6566127342e-10f: a float in [0, 1).
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  const int32_t x = static_cast<int32_t>(philox_u32(seed, offset));
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

#if defined(__AVX512F__)
// Philox rounds on 16 counters per vector: the high and low words of the 32 x 32-bit products
// from two vpmuludq (even and odd lanes) and blends. The zero-masked forms with all lanes
// selected are the plain instructions; the unmasked intrinsics pass GCC 12 an
// _mm512_undefined_epi32() that -Wall reports as maybe-uninitialized.
inline __m512i philox_mulhilo(__m512i a, __m512i c, __m512i* lo) {
  const __m512i pe = _mm512_maskz_mul_epu32(0xFF, a, c);
  const __m512i po = _mm512_maskz_mul_epu32(0xFF, _mm512_maskz_srli_epi64(0xFF, a, 32), c);
  *lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_maskz_slli_epi64(0xFF, po, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_maskz_srli_epi64(0xFF, pe, 32), po);
}
#endif

#if defined(__AVX512F__)
// Draws t0 .. t0 + 16 V - 1 of philox_uniforms into out, V independent vectors of 16 counters
// (one vector's ten rounds are a chain of dependent multiplies; several keep the multiplier
// busy).
template <int V>
inline void philox_block(uint64_t seed, uint64_t base, uint64_t step, int64_t t0, float* out) {
  alignas(64) uint32_t lo[16 * V], hi[16 * V];
  for (int t = 0; t < 16 * V; ++t) {
    const uint64_t off = base + static_cast<uint64_t>(t0 + t) * step;
    lo[t] = static_cast<uint32_t>(off);
    hi[t] = static_cast<uint32_t>(off >> 32);
  }
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm512_load_si512(lo + 16 * v);
    c1[v] = _mm512_load_si512(hi + 16 * v);
    c2[v] = c3[v] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      __m512i lb, la;
      const __m512i hb = philox_mulhilo(c2[v], mb, &lb);
      const __m512i ha = philox_mulhilo(c0[v], ma, &la);
      c0[v] = _mm512_ternarylogic_epi32(hb, c1[v], key0, 0x96);  // three-way xor
      c2[v] = _mm512_ternarylogic_epi32(ha, c3[v], key1, 0x96);
      c1[v] = lb;
      c3[v] = la;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < V; ++v) {
    // x < 0 -> ~x: xor with the sign spread over the word.
    const __m512i x = _mm512_xor_si512(c0[v], _mm512_maskz_srai_epi32(0xFFFF, c0[v], 31));
    _mm512_store_ps(out + 16 * v, _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, x),
                                                _mm512_set1_ps(4.6566127342e-10f)));
  }
}
#endif

// u[t] = philox_uniform(seed, base + t * step) for t < n. With AVX-512, 64 draws at a time as
// four vectors (1.7 ns per draw against 2.5 for the compiler's vectorization of philox_uniform
// on the same core), and the last 1-32 in one or two vectors, so a short row (causal tiles on
// the diagonal) does not pay for 64.
inline void philox_uniforms(uint64_t seed, uint64_t base, uint64_t step, int64_t n, float* u) {
#if defined(__AVX512F__)
  alignas(64) float out[64];
  for (int64_t t0 = 0; t0 < n;) {
    const int64_t left = n - t0;
    const int64_t w = left > 32 ? 64 : left > 16 ? 32 : 16;
    if (w == 64)
      philox_block<4>(seed, base, step, t0, out);
    else if (w == 32)
      philox_block<2>(seed, base, step, t0, out);
    else
      philox_block<1>(seed, base, step, t0, out);
    const int64_t m = left < w ? left : w;
    std::memcpy(u + t0, out, static_cast<size_t>(m) * sizeof(float));
    t0 += m;
  }
#else
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) u[t] = philox_uniform(seed, base + static_cast<uint64_t>(t) * step);
#endif
}

}  // namespace minigpt
