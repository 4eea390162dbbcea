// softmax(scale * x) over the last dim (optionally causal): C++ CPU kernels, and the entry
// points that hand CUDA tensors to csrc/softmax_cuda.cu. Called from minigpt/ops/softmax.py, which
// has already checked dtypes and arguments; the TORCH_CHECKs here guard the raw-pointer code.
#include "common.h"
#include "cpu_convert.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace minigpt {
namespace {

template <typename A> inline A exp_acc(A v) { return exp_nonpos(v); }  // cpu_convert.h

// Columns of row `row` that causal masking keeps: j < i + N - T + 1 with i = row % T.
inline int64_t row_len(int64_t row, int64_t N, int64_t T, bool causal) {
  if (!causal) return N;
  const int64_t i = row % T;
  return std::min<int64_t>(std::max<int64_t>(i + N - T + 1, 0), N);
}

template <typename T>
void softmax_fwd_cpu(const at::Tensor& x, at::Tensor& y, double scale_d, bool causal,
                     int64_t Tq) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), N = x.size(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A scale = static_cast<A>(scale_d);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    // Private copies: the row loops store floats, so the compiler cannot keep a by-reference
    // capture in a register, and re-reading it from the calling thread's stack frame (a cache
    // line that thread keeps writing) made two threads slower than one.
    // exp(scale * x - max) as exp((sg * x - max(sg * x)) * |scale|), sg the sign of scale:
    // sg * x is exact, so the row's largest value gives exp(0) = 1 exactly. In the plain form
    // the compiler fuses `x * scale - max` into an FMA, which skips the rounding of the product
    // the max was taken from: at |scale * x| ~ 1e10 the largest value's exponent came out
    // ~+-1e3 and the row was all zeros.
    const A sg_l = scale < 0 ? A(-1) : A(1), as_l = scale < 0 ? -scale : scale;
    const int64_t N_l = N, Tq_l = Tq;
    const bool causal_l = causal;
    // exp(z - max) waits in A for the normalizing pass: float/double rows keep it in y itself
    // (rescaled in place, as ATen does); narrower rows in a per-thread buffer, so they are
    // rounded only once. The buffer is placed 2 KB away from the row modulo 4 KB: rows of
    // 1024 floats are 4 KB apart, and a buffer at the same 4 KB offset as x makes every load
    // of x look like it depends on the previous stores to the buffer (4K aliasing), which cost
    // 1.5x in a thread whose malloc happened to land there.
    constexpr bool kWide = std::is_same_v<T, A>;
    std::vector<A> buf(kWide ? 0 : N_l + 4096 / sizeof(A));
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * N_l;
      T* yr = yp + r * N_l;
      A* e;
      if constexpr (kWide) {
        e = yr;
      } else {
        const auto xa = reinterpret_cast<uintptr_t>(xr), ba = reinterpret_cast<uintptr_t>(buf.data());
        const uintptr_t shift = ((xa + 2048 - ba) & 4095) & ~uintptr_t(63);
        e = buf.data() + shift / sizeof(A);
      }
      const int64_t L = row_len(r, N_l, Tq_l, causal_l);
      // z: the row to read: x itself, or for fp16 (cpu_convert.h's kConvertRows) x converted
      // into e, worked on in place there; with F16C chunk by chunk, the max taken on the way.
      const row_t<T>* z;
      A m = -std::numeric_limits<A>::infinity();
      int64_t j1 = 0;  // columns before j1 are in m already
#if defined(__F16C__)
      if constexpr (kConvertChunks<T>) {
        A mk[kChunk];
        std::fill(mk, mk + kChunk, m);
        for (; j1 + kChunk <= L; j1 += kChunk) {
          load_chunk(xr + j1, e + j1);
#pragma omp simd
          for (int k = 0; k < kChunk; ++k) mk[k] = std::max(mk[k], e[j1 + k] * sg_l);
        }
        for (int k = 0; k < kChunk; ++k) m = std::max(m, mk[k]);
        load_row(xr + j1, e + j1, L - j1);
        z = e;
      } else
#endif
      {
        z = in_row(xr, e, L);
      }
#pragma omp simd reduction(max : m)
      for (int64_t j = j1; j < L; ++j) m = std::max(m, load(z, j) * sg_l);
      if (m == -std::numeric_limits<A>::infinity()) m = 0;  // all -inf: exp gives 0, not NaN
      // scale 0: exp(x * 0), as the reference; (x - max) * 0 is NaN where x - max overflows
      // (|x| past 1.7e38 in an fp32 or bf16 row).
      if (as_l == A(0)) m = 0;
      A sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < L; ++j) {
        e[j] = exp_acc<A>((load(z, j) * sg_l - m) * as_l);
        sum += e[j];
      }
      // A row that keeps nothing (sum 0) is all zeros; a NaN or +inf in the row makes the
      // sum NaN, and so the whole row, as in torch (a `sum > 0` test zeroed all but it).
      const A inv = sum == A(0) ? A(0) : A(1) / sum;
      store_row_scaled(e, inv, yr, L);
      for (int64_t j = L; j < N_l; ++j) yr[j] = static_cast<T>(0);
    }
  });
}

template <typename T>
void softmax_bwd_cpu(const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, double scale_d) {
  using A = acc_t<T>;
  const int64_t M = y.size(0), N = y.size(1);
  const T* dyp = dy.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const A scale = static_cast<A>(scale_d);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    const A scale_l = scale;  // a private copy, as in the forward
    const int64_t N_l = N;
    // fp16 rows (with F16C) go chunk by chunk up to Nc, converting as they go (cpu_convert.h's
    // load_chunk / store_chunk); the rest, and every row of other types, element by element.
    const int64_t Nc = kConvertChunks<T> ? N_l / kChunk * kChunk : 0;
    for (int64_t r = begin; r < end; ++r) {
      const T* g = dyp + r * N_l;
      const T* yr = yp + r * N_l;
      T* out = dxp + r * N_l;
      A s = 0;
      if constexpr (kConvertChunks<T>) {
        // Four sums (registers), so that an FMA does not wait for the previous one.
        constexpr int kSums = 4;
        A part[kSums][kChunk] = {};
        int64_t j0 = 0;
        for (; j0 + kSums * kChunk <= Nc; j0 += kSums * kChunk) {
          for (int a = 0; a < kSums; ++a) {
            A gs[kChunk], ys[kChunk];
            load_chunk(g + j0 + a * kChunk, gs);
            load_chunk(yr + j0 + a * kChunk, ys);
#pragma omp simd
            for (int k = 0; k < kChunk; ++k) part[a][k] += gs[k] * ys[k];
          }
        }
        for (; j0 < Nc; j0 += kChunk) {
          A gs[kChunk], ys[kChunk];
          load_chunk(g + j0, gs);
          load_chunk(yr + j0, ys);
#pragma omp simd
          for (int k = 0; k < kChunk; ++k) part[0][k] += gs[k] * ys[k];
        }
#pragma omp simd
        for (int k = 0; k < kChunk; ++k) part[0][k] += part[1][k] + part[2][k] + part[3][k];
        for (int w = kChunk / 2; w > 0; w /= 2)  // a tree, not a 16-long chain
          for (int k = 0; k < w; ++k) part[0][k] += part[0][k + w];
        s = part[0][0];
      }
#pragma omp simd reduction(+ : s)
      for (int64_t j = Nc; j < N_l; ++j) s += load(g, j) * load(yr, j);
      if constexpr (kConvertChunks<T>) {
        for (int64_t j0 = 0; j0 < Nc; j0 += kChunk) {
          A gs[kChunk], ys[kChunk], os[kChunk];
          load_chunk(g + j0, gs);
          load_chunk(yr + j0, ys);
#pragma omp simd
          for (int k = 0; k < kChunk; ++k) os[k] = scale_l * ys[k] * (gs[k] - s);
          store_chunk(os, out + j0);
        }
      }
#pragma omp simd
      for (int64_t j = Nc; j < N_l; ++j) store(out, j, scale_l * load(yr, j) * (load(g, j) - s));
    }
  });
}

}  // namespace

at::Tensor softmax_fwd(const at::Tensor& x, double scale, bool causal, int64_t T) {
  check_2d_contig(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(N > 0, "minigpt: softmax needs a non-empty last dimension");
  TORCH_CHECK(std::isfinite(scale), "minigpt: softmax scale must be finite");
  TORCH_CHECK(!causal || (T > 0 && M % T == 0),
              "minigpt: causal softmax needs rows in whole (T, N) blocks, got ", M, " rows, T=", T);
  auto y = at::empty_like(x);
  if (M == 0) return y;
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    MINIGPT_CUDA_CHECK(minigpt_softmax_fwd_cuda(x.data_ptr(), y.data_ptr(), M, N,
                                                static_cast<float>(scale), causal ? 1 : 0,
                                                causal ? T : 1, dtype_code(x),
                                                c10::cuda::getCurrentCUDAStream()),
                       "softmax_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(x.device().is_cpu(), "minigpt: softmax got a tensor on ", x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd",
                                    [&] { softmax_fwd_cpu<scalar_t>(x, y, scale, causal, T); });
  }
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale) {
  check_2d_contig(y, "y");
  check_like(dy, y, "grad_output");
  const int64_t M = y.size(0), N = y.size(1);
  auto dx = at::empty_like(y);
  if (M == 0 || N == 0) return dx;
  if (y.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(y.device());
    MINIGPT_CUDA_CHECK(minigpt_softmax_bwd_cuda(dy.data_ptr(), y.data_ptr(), dx.data_ptr(), M, N,
                                                static_cast<float>(scale), dtype_code(y),
                                                c10::cuda::getCurrentCUDAStream()),
                       "softmax_bwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(y.device().is_cpu(), "minigpt: softmax got a tensor on ", y.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd",
                                    [&] { softmax_bwd_cpu<scalar_t>(dy, y, dx, scale); });
  }
  return dx;
}

}  // namespace minigpt
