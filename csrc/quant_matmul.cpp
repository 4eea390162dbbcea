// y = x W^T with W kept in a GGUF block-quantized format (Q8_0 or Q4_1): C++ CPU kernel.
//
// Decoding a small model on a CPU is bound by memory traffic: every new token reads every
// weight once. SmolLM2's GGUF stores its weights in 4.5 (Q4_1) and 8.5 (Q8_0) bits per weight;
// dequantized to float32 they take 32, 4-7x the bytes per token. This kernel reads the packed
// blocks and dequantizes each one in registers - w = d * q + m, the same float32 multiply and
// add as gguf.quants.dequantize - so it multiplies by exactly the weights a float32 copy would
// hold; only the summation order differs from a float32 matmul. It pays for a few rows of x
// (decoding); a long prompt is compute-bound and minigpt/quant.py sends it to the float32 matmul.
//
// Blocks of 32 weights along K (ggml's layout; a GGUF row is one output feature):
//   Q8_0: fp16 d, int8 q[32]                  w_j = d * q_j
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]        w_j = d * (qs[j] & 15) + m,
//                                             w_{j+16} = d * (qs[j] >> 4) + m
#include "common.h"

#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace minigpt {
namespace {

constexpr int64_t kBlock = 32;
constexpr int kQ4_1 = 3, kQ8_0 = 8;  // ggml_type codes, as in gguf.GGMLQuantizationType
constexpr int64_t kGrain = 32;       // output features per task

template <int QT> constexpr int64_t block_bytes() { return QT == kQ8_0 ? 34 : 20; }

inline float fp16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#if defined(__AVX512F__)
// M rows of x at once (M fixed at compile time so the accumulators live in registers): each
// dequantized block is two 16-lane vectors, used by every row.
template <int QT, int M>
void qmm_rows(const float* x, const uint8_t* w, float* y, int64_t N, int64_t K, int64_t ldy) {
  constexpr int64_t bs = block_bytes<QT>();
  const int64_t nb = K / kBlock;
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w + n * nb * bs;
      __m512 acc[M][2];
      for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bs;
        const __m512 d = _mm512_set1_ps(fp16_at(blk));
        __m512 w0, w1;
        if (QT == kQ8_0) {
          const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
          const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
          w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
          w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
        } else {
          const __m512 m = _mm512_set1_ps(fp16_at(blk + 2));
          const __m512i q = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
          const __m512i lo = _mm512_and_si512(q, _mm512_set1_epi32(15));
          const __m512i hi = _mm512_srli_epi32(q, 4);
          // multiply, then add: rounded like numpy's d * q + m (no fused multiply-add)
          w0 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
          w1 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
        }
        for (int i = 0; i < M; ++i) {
          const float* xb = x + i * K + b * kBlock;
          acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc[i][1]);
        }
      }
      for (int i = 0; i < M; ++i)
        y[i * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
    }
  });
}

template <int QT>
void qmm(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8) qmm_rows<QT, 8>(x + i * K, w, y + i * N, N, K, N);
  for (; i + 4 <= M; i += 4) qmm_rows<QT, 4>(x + i * K, w, y + i * N, N, K, N);
  for (; i < M; ++i) qmm_rows<QT, 1>(x + i * K, w, y + i * N, N, K, N);
}
#else
// Portable version: dequantize a block into 32 floats, then every row of x uses it.
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
            const float lo = d * static_cast<float>(qs[j] & 15);
            const float hi = d * static_cast<float>(qs[j] >> 4);
            wb[j] = lo + m;
            wb[j + kBlock / 2] = hi + m;
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
  if (qtype == kQ8_0)
    qmm<kQ8_0>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
  else
    qmm<kQ4_1>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
  return y;
}

}  // namespace minigpt
