// y = x W^T with W kept in a GGUF block-quantized format (Q8_0 or Q4_1): C++ CPU kernel.
//
// Decoding a small model on a CPU is bound by memory traffic: every new token reads every
// weight once. SmolLM2's GGUF stores its weights in 4.5 (Q4_1) and 8.5 (Q8_0) bits per weight;
// dequantized to float32 they take 32, 4-7x the bytes per token. This kernel reads the packed
// blocks and dequantizes each one in registers to exactly the float32 weights
// gguf.quants.dequantize gives (d * q + m, or d * q), so it multiplies by the weights a float32
// copy would hold; only the summation order differs from a float32 matmul. d * q is exact in
// float32 (d is an fp16 value, 11 significant bits; q an integer of at most 8 bits), so d * q + m
// rounds once whether it is a multiply then an add (numpy) or one fused multiply-add (here, and
// wherever the compiler contracts the two). It pays for a few rows of x (decoding); a long
// prompt is compute-bound and minigpt/quant.py sends it to the float32 matmul.
//
// Blocks of 32 weights along K (ggml's layout; a GGUF row is one output feature):
//   Q8_0: fp16 d, int8 q[32]                  w_j = d * q_j
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]        w_j = d * (qs[j] & 15) + m,
//                                             w_{j+16} = d * (qs[j] >> 4) + m
//
// Where the time goes (AVX-512 path, measured on a 2-core Sapphire Rapids VM; numbers in
// benchmarks/results/quant_matmul_cpu.md): the rows stream from memory once per call, and with
// the hardware prefetchers alone a core read them at 2.5-6 GB/s, the loop mostly waiting on
// cache misses (a plain streaming read gets over 20). Explicit prefetches kPrefetch bytes
// ahead of the rows being read (and a burst over the first kPrefetch bytes of each thread's
// rows) make the loop compute-bound again, so the per-block instruction count matters too:
// a Q4_1 block's 16 possible values d * k + m are one 16-lane vector, and vpermps looks the
// 32 codes up in it; the fp16 scales of a few rows are gathered and converted 16 blocks at a
// time; several output rows share each load of x, and one transposing add tree reduces all
// their sums.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers start many intrinsics from a self-initialized `__Y = __Y` value
// (_mm512_undefined_*), which -W(maybe-)uninitialized reports once they are inlined into the
// tile's lambda: false positives. The state that counts is the one where the header is read,
// hence before the includes; it holds for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "common.h"

#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace minigpt {
namespace {

constexpr int64_t kBlock = 32;
constexpr int kQ4_1 = 3, kQ8_0 = 8;  // ggml_type codes, as in gguf.GGMLQuantizationType
constexpr int64_t kGrain = 32;       // output features per task

template <int QT> constexpr int64_t block_bytes() { return QT == kQ8_0 ? 34 : 20; }

#if defined(__AVX512F__)
// How far ahead of the rows being multiplied to prefetch. 4-12 KiB all measured within a few
// percent of each other on the machine above; 8 KiB was the best of them.
constexpr int64_t kPrefetch = 8192;

#if defined(__GNUC__)
// A tile is a loop worth a call of its own: inlined into the row loop, GCC kept the
// accumulators of the one-row-of-x tile on the stack.
#define MINIGPT_NOINLINE __attribute__((noinline))
#else
#define MINIGPT_NOINLINE
#endif

inline void prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// The scales of `count` consecutive blocks as float32, one per block for Q8_0 (d), two for
// Q4_1 (d, m). A gather picks the leading 4 bytes of 16 blocks: measured ~10% (Q8_0) and
// ~20% (Q4_1) faster than converting each block's scales where they are used.
template <int QT>
void scales(const uint8_t* blk, int64_t count, float* out) {
  constexpr int64_t bs = block_bytes<QT>();
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(bs)));
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t c = std::min<int64_t>(16, count - j);
    const __mmask16 k = static_cast<__mmask16>((1u << c) - 1);
    const __m512i v =
        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, blk + j * bs, 1);
    if (QT == kQ8_0) {  // d is the low half of each dword
      _mm512_mask_storeu_ps(out + j, k, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)));
    } else {  // 16 dwords are 32 halves d0 m0 d1 m1 ...: already in the order wanted
      const __mmask16 klo = static_cast<__mmask16>(c >= 8 ? 0xFFFF : (1u << (2 * c)) - 1);
      const __mmask16 khi = static_cast<__mmask16>(c <= 8 ? 0 : (1u << (2 * (c - 8))) - 1);
      _mm512_mask_storeu_ps(out + 2 * j, klo, _mm512_cvtph_ps(_mm512_castsi512_si256(v)));
      _mm512_mask_storeu_ps(out + 2 * j + 16, khi,
                            _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1)));
    }
  }
}

// The sums of n <= 8 vectors -> out[0..n): a transposing add tree, about 3 instructions a
// vector instead of about 9 for each one's own horizontal sum.
template <int n>
inline void hsums8(const __m512* v, float* out) {
  static_assert(n >= 1 && n <= 8, "hsums8 takes 1 to 8 vectors");
  __m512 a[8];
  for (int i = 0; i < 8; ++i) a[i] = i < n ? v[i] : _mm512_setzero_ps();
  __m512 p[4];  // p[j]: 256-bit halves added; lanes 0-7 from a[2j], lanes 8-15 from a[2j+1]
  for (int j = 0; j < 4; ++j)
    p[j] = 2 * j < n ? _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                                     _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE))
                     : _mm512_setzero_ps();
  // 128-bit lane k of q0 holds 4 partial sums of a[k]; of q1, of a[k + 4]
  const __m512 q0 = _mm512_add_ps(_mm512_shuffle_f32x4(p[0], p[1], 0x88),
                                  _mm512_shuffle_f32x4(p[0], p[1], 0xDD));
  const __m512 q1 = n > 4 ? _mm512_add_ps(_mm512_shuffle_f32x4(p[2], p[3], 0x88),
                                          _mm512_shuffle_f32x4(p[2], p[3], 0xDD))
                          : _mm512_setzero_ps();
  // lane k: [a[k]: 2 partials, a[k+4]: 2 partials], then neighbours added
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(q0, q1, 0x44), _mm512_shuffle_ps(q0, q1, 0xEE));
  r = _mm512_add_ps(r, _mm512_shuffle_ps(r, r, 0xB1));
  const __m512 s = _mm512_permutexvar_ps(
      _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), r);
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), s);
}

template <int n>
inline void hsums(const __m512* v, float* out) {
  if constexpr (n > 8) {
    hsums8<8>(v, out);
    hsums8<n - 8>(v + 8, out + 8);
  } else {
    hsums8<n>(v, out);
  }
}

// y[i * ldy + r] = x[i] . W[r] for R consecutive rows of W (starting at w, each nb blocks;
// their scales at sc) and MM rows of x (x[i] at x + i * K). Each accumulator holds 16 lanes
// of partial sums; A = 2 per output (the low and high half of a block apart) wherever that
// still fits 16 registers, for more independent add chains. Prefetches pf_bytes (a multiple
// of 64 * R) from w + kPrefetch on, one line per row during the first blocks.
template <int QT, int MM, int R>
MINIGPT_NOINLINE void tile(const float* x, int64_t K, const uint8_t* w, const float* sc,
                           int64_t nb, float* y, int64_t ldy, int64_t pf_bytes) {
  constexpr int64_t bs = block_bytes<QT>();
  constexpr int ns = QT == kQ8_0 ? 1 : 2;  // scales per block
  constexpr int A = R * MM * 2 <= 16 ? 2 : 1;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[R][MM][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MM; ++i)
      for (int a = 0; a < A; ++a) acc[r][i][a] = _mm512_setzero_ps();
  const uint8_t* pfp = pf_bytes > 0 ? w + kPrefetch : w;
  // block b of each of the R rows: dequantize all R, then every row of x uses them
  auto step = [&](int64_t b, auto with_prefetch) {
    __m512 wv[R][2];
    for (int r = 0; r < R; ++r) {
      if (decltype(with_prefetch)::value) {
        prefetch(pfp);
        pfp += 64;
      }
      const uint8_t* blk = w + (r * nb + b) * bs;
      const float* s = sc + (r * nb + b) * ns;
      if (QT == kQ8_0) {
        const __m512 d = _mm512_set1_ps(s[0]);
        const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
        const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
        wv[r][0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
        wv[r][1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
      } else {
        // The 16 values a 4-bit code can stand for, d * k + m (exact: see the top), looked
        // up by the codes; vpermps reads only the low 4 bits of each index.
        const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(s[0]), iota, _mm512_set1_ps(s[1]));
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
        wv[r][0] = _mm512_permutexvar_ps(q, t);
        wv[r][1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t);
      }
    }
    for (int i = 0; i < MM; ++i) {
      const __m512 x0 = _mm512_loadu_ps(x + i * K + b * kBlock);
      const __m512 x1 = _mm512_loadu_ps(x + i * K + b * kBlock + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][i][0] = _mm512_fmadd_ps(x0, wv[r][0], acc[r][i][0]);
        acc[r][i][A - 1] = _mm512_fmadd_ps(x1, wv[r][1], acc[r][i][A - 1]);
      }
    }
  };
  // the blocks that prefetch (R lines each), then the rest without the instructions
  const int64_t nbp = std::min<int64_t>(nb, pf_bytes / (64 * R));
  int64_t b = 0;
  for (; b < nbp; ++b) step(b, std::true_type());
  for (; b < nb; ++b) step(b, std::false_type());
  __m512 v[R * MM];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MM; ++i)
      v[r * MM + i] = A == 2 ? _mm512_add_ps(acc[r][i][0], acc[r][i][A - 1]) : acc[r][i][0];
  float out[R * MM];
  hsums<R * MM>(v, out);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MM; ++i) y[i * ldy + r] = out[r * MM + i];
}

// Rows of W per tile for M rows of x: four while x has few rows (more independent sums, and
// each load of x used four times); two above, where MM rows of x already give the sums and
// two rows' accumulators fill the registers.
constexpr int rows_per_tile(int64_t M) { return M <= 4 ? 4 : 2; }

template <int QT, int R>
void tile_m(int mm, const float* x, int64_t K, const uint8_t* w, const float* sc, int64_t nb,
            float* y, int64_t ldy, int64_t pf_bytes) {
  switch (mm) {
    case 1: return tile<QT, 1, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
    case 2: return tile<QT, 2, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
    case 3: return tile<QT, 3, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
    case 4: return tile<QT, 4, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
  }
  if constexpr (R <= 2) {  // R = 4 only ever sees up to 4 rows of x
    switch (mm) {
      case 5: return tile<QT, 5, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
      case 6: return tile<QT, 6, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
      case 7: return tile<QT, 7, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
      case 8: return tile<QT, 8, R>(x, K, w, sc, nb, y, ldy, pf_bytes);
    }
  }
}

template <int QT>
void qmm(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t bs = block_bytes<QT>();
  constexpr int ns = QT == kQ8_0 ? 1 : 2;
  const int64_t nb = K / kBlock, rb = nb * bs;
  const int R = rows_per_tile(M);
  // Scales are gathered for G rows at a time: a few gathers' worth, and within half the
  // prefetch distance, since the gathers are the first loads from those rows.
  const int64_t G = std::max<int64_t>(R, std::min<int64_t>(16, kPrefetch / 2 / rb) / R * R);
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    std::vector<float> sc(static_cast<size_t>(G * nb * ns));
    const int64_t end = n1 * rb;  // byte offsets into w
    for (int64_t o = n0 * rb; o < std::min(end, n0 * rb + kPrefetch); o += 64) prefetch(w + o);
    for (int64_t g = n0; g < n1; g += G) {
      const int64_t g1 = std::min(n1, g + G);
      scales<QT>(w + g * rb, (g1 - g) * nb, sc.data());
      for (int64_t n = g; n < g1;) {
        const int rr = n + R <= g1 ? R : 1;
        const float* st = sc.data() + (n - g) * nb * ns;
        // This tile's share of the prefetching: its own size (in whole steps of rr lines),
        // kPrefetch ahead, stopping before the end of this thread's rows.
        const int64_t step_bytes = 64 * rr;
        int64_t pf_bytes = std::max<int64_t>(
            0, std::min((rr * rb + step_bytes - 1) / step_bytes * step_bytes,
                        end - (n * rb + kPrefetch)));
        // M > 8: x goes in chunks of 8 rows; the tile's blocks are in L1 after the first
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int mm = static_cast<int>(std::min<int64_t>(8, M - m0));
          const float* xm = x + m0 * K;
          float* ym = y + m0 * N + n;
          if (rr == 4)
            tile_m<QT, 4>(mm, xm, K, w + n * rb, st, nb, ym, N, pf_bytes);
          else if (rr == 2)
            tile_m<QT, 2>(mm, xm, K, w + n * rb, st, nb, ym, N, pf_bytes);
          else
            tile_m<QT, 1>(mm, xm, K, w + n * rb, st, nb, ym, N, pf_bytes);
          pf_bytes = 0;
        }
        n += rr;
      }
    }
  });
}
#else
// Portable version: dequantize a block into 32 floats, then every row of x uses it.
inline float fp16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

template <int QT>
void qmm(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t bs = block_bytes<QT>();
  const int64_t nb = K / kBlock;
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(static_cast<size_t>(M * kBlock));
    float wb[kBlock];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w + n * nb * bs;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bs;
        const float d = fp16_at(blk);
        if (QT == kQ8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int64_t j = 0; j < kBlock; ++j) wb[j] = d * static_cast<float>(q[j]);
        } else {
          const float m = fp16_at(blk + 2);
          const uint8_t* qs = blk + 4;
          for (int64_t j = 0; j < kBlock / 2; ++j) {
            wb[j] = d * static_cast<float>(qs[j] & 15) + m;
            wb[j + kBlock / 2] = d * static_cast<float>(qs[j] >> 4) + m;
          }
        }
        for (int64_t i = 0; i < M; ++i) {
          const float* xb = x + i * K + b * kBlock;
          float* a = acc.data() + i * kBlock;
#pragma omp simd
          for (int64_t j = 0; j < kBlock; ++j) a[j] += xb[j] * wb[j];
        }
      }
      for (int64_t i = 0; i < M; ++i) {
        float s = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) s += acc[i * kBlock + j];
        y[i * N + n] = s;
      }
    }
  });
}
#endif

}  // namespace

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n_out) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(),
              "minigpt: quant_matmul runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "minigpt: quant_matmul takes float32 x, got ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kByte, "minigpt: quant_matmul takes uint8 packed weights");
  check_2d_contig(x, "x");
  check_2d_contig(w, "packed weight");
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_1,
              "minigpt: quant_matmul supports Q8_0 (8) and Q4_1 (3), got type ", qtype);
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  const int64_t bs = qtype == kQ8_0 ? 34 : 20;
  TORCH_CHECK(K % kBlock == 0, "minigpt: quant_matmul needs K divisible by 32, got ", K);
  TORCH_CHECK(w.size(0) == N && w.size(1) == K / kBlock * bs, "minigpt: packed weight has shape ",
              w.sizes(), ", expected (", N, ", ", K / kBlock * bs, ") for K = ", K);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // A sum over no terms: qmm's tiling divides by the row's byte count, which K = 0 makes zero.
  if (K == 0) return y.zero_();
  if (qtype == kQ8_0)
    qmm<kQ8_0>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
  else
    qmm<kQ4_1>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
  return y;
}

}  // namespace minigpt
