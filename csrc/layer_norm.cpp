// LayerNorm (+ fused residual add): C++ CPU kernels, and the entry points that hand CUDA
// tensors to csrc/layer_norm_cuda.cu. Called from minigpt/ops/layer_norm.py, which has already
// checked shapes and dtypes; the TORCH_CHECKs here guard the raw-pointer code itself.
#include "common.h"
#include "cpu_convert.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

namespace minigpt {
namespace {

// One row: h = x (+ r), stats in A, y = (h - mean) * rstd * w + b. Two passes over a row
// that sits in L1: the moments, then normalize. The moments are taken about the row's first
// element K in one pass, var = E[(h-K)^2] - E[h-K]^2: shifting by a value of the row keeps
// the cancellation that ruins the textbook one-pass formula small (|mean - K| is about one
// standard deviation, not |mean|). Rows are read and written through cpu_convert.h's
// in_row / out_row: where T's rows are converted whole (fp16), `buf` holds h in A (then y, in
// place) and `buf2` the residual.
template <typename T, typename A>
void ln_fwd_row(const T* x, const T* r, const A* w, const A* b, T* y, T* h, A* buf, A* buf2,
                int64_t N, A eps, A* mean_out, A* rstd_out) {
  const row_t<T>* src = r ? residual_row(x, r, h, buf, buf2, N) : in_row(x, buf, N);
  const A K = load(src, 0);
  A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t j = 0; j < N; ++j) {
    const A d = load(src, j) - K;
    s1 += d;
    s2 += d * d;
  }
  const A m1 = s1 / N;
  const A mean = K + m1;
  const A var = std::max(s2 / N - m1 * m1, A(0));
  const A rstd = A(1) / std::sqrt(var + eps);
  row_t<T>* o = out_row(y, buf);
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) store(o, j, (load(src, j) - mean) * rstd * w[j] + b[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) store(o, j, (load(src, j) - mean) * rstd * w[j]);
  }
  flush_row(o, y, N);
  *mean_out = mean;
  *rstd_out = rstd;
}

template <typename T>
void ln_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& r, const at::Tensor& w,
                const std::optional<at::Tensor>& b, at::Tensor& y, at::Tensor& h, at::Tensor& mean,
                at::Tensor& rstd, double eps) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), N = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = r ? r->data_ptr<T>() : nullptr;
  T* hp = r ? h.data_ptr<T>() : nullptr;
  const A* wp = w.data_ptr<A>();
  const A* bp = b ? b->data_ptr<A>() : nullptr;
  T* yp = y.data_ptr<T>();
  A* mp = mean.data_ptr<A>();
  A* sp = rstd.data_ptr<A>();
  // Grain: enough rows per task to amortize the scheduling, at least one.
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(kConvertRows<T> ? N : 0), buf2(kConvertRows<T> && rp ? N : 0);
    for (int64_t i = begin; i < end; ++i) {
      ln_fwd_row<T, A>(xp + i * N, rp ? rp + i * N : nullptr, wp, bp, yp + i * N,
                       hp ? hp + i * N : nullptr, buf.data(), buf2.data(), N,
                       static_cast<A>(eps), mp + i, sp + i);
    }
  });
}

template <typename T>
void ln_bwd_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
                const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd,
                at::Tensor& dx, at::Tensor& dx2, at::Tensor& dw_part, at::Tensor& db_part,
                bool has_bias) {
  using A = acc_t<T>;
  const int64_t M = h.size(0), N = h.size(1);
  const int64_t P = dw_part.size(0);
  const T* dyp = dy.data_ptr<T>();
  const T* dhp = dh ? dh->data_ptr<T>() : nullptr;
  const T* hp = h.data_ptr<T>();
  const A* mp = mean.data_ptr<A>();
  const A* sp = rstd.data_ptr<A>();
  T* dxp = dx.data_ptr<T>();
  T* dx2p = dx2.numel() ? dx2.data_ptr<T>() : nullptr;
  A* dwp = dw_part.data_ptr<A>();
  A* dbp = has_bias ? db_part.data_ptr<A>() : nullptr;
  const int64_t rows_per = (M + P - 1) / P;
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    // The partial sums are written inside the row loops; __restrict tells GCC they do not
    // alias w. Without it GCC read w[j] with gather instructions (it could not otherwise keep
    // w's loads contiguous across the dw stores), and the backward ran ~35% behind ATen's.
    const A* __restrict wp = w.data_ptr<A>();
    // Rows through cpu_convert.h's in_row / out_row; converted fp16 rows write dx over g's.
    constexpr bool kConv = kConvertRows<T>;
    std::vector<A> xbuf(kConv ? N : 0), gbuf(kConv ? N : 0), dbuf(kConv && dhp ? N : 0);
    for (int64_t p = pb; p < pe; ++p) {
      A* __restrict dw = dwp + p * N;
      A* __restrict db = dbp ? dbp + p * N : nullptr;
      std::fill(dw, dw + N, A(0));
      if (db) std::fill(db, db + N, A(0));
      const int64_t r0 = p * rows_per, r1 = std::min(M, r0 + rows_per);
      for (int64_t i = r0; i < r1; ++i) {
        const row_t<T>* x = in_row(hp + i * N, xbuf.data(), N);
        const row_t<T>* g = in_row(dyp + i * N, gbuf.data(), N);
        const A mu = mp[i], rs = sp[i];
        A c1 = 0, c2 = 0;
        // xhat and w * dy are recomputed in the second pass rather than stored: the row is
        // in L1 either way, and this saves two stores per element.
        if (db) {
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t j = 0; j < N; ++j) {
            const A gj = load(g, j);
            const A xh = (load(x, j) - mu) * rs;
            const A wg = wp[j] * gj;
            c1 += xh * wg;
            c2 += wg;
            dw[j] += gj * xh;
            db[j] += gj;
          }
        } else {
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t j = 0; j < N; ++j) {
            const A gj = load(g, j);
            const A xh = (load(x, j) - mu) * rs;
            const A wg = wp[j] * gj;
            c1 += xh * wg;
            c2 += wg;
            dw[j] += gj * xh;
          }
        }
        c1 /= N;
        c2 /= N;
        T* out = dxp + i * N;
        row_t<T>* o = out_row(out, gbuf.data());
        if (dhp) {
          const row_t<T>* d2 = in_row(dhp + i * N, dbuf.data(), N);
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const A xh = (load(x, j) - mu) * rs;
            const A wg = wp[j] * load(g, j);
            store(o, j, (wg - (xh * c1 + c2)) * rs + load(d2, j));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const A xh = (load(x, j) - mu) * rs;
            const A wg = wp[j] * load(g, j);
            store(o, j, (wg - (xh * c1 + c2)) * rs);
          }
        }
        flush_row(o, out, N);
        if (dx2p) std::copy(out, out + N, dx2p + i * N);  // while the row is in L1
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                       const std::optional<at::Tensor>& b,
                                       const std::optional<at::Tensor>& r, double eps) {
  check_2d_contig(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(N > 0, "minigpt: layer_norm needs a non-empty last dimension");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == N && weight_dtype_ok(w, x, acc) && w.is_contiguous() &&
                  w.device() == x.device(),
              "minigpt: layer_norm weight must be a contiguous (N,) tensor in the accumulation "
              "dtype (on CUDA also in a 16-bit x's dtype), got ", w.scalar_type());
  if (b) TORCH_CHECK(b->sizes() == w.sizes() && b->scalar_type() == w.scalar_type() &&
                         b->is_contiguous() && b->device() == x.device(),
                     "minigpt: layer_norm bias must match weight");
  if (r) check_like(*r, x, "residual");
  auto y = at::empty_like(x);
  auto h = r ? at::empty_like(x) : x.new_empty({0});
  auto opts = x.options().dtype(acc);
  auto mean = at::empty({M}, opts), rstd = at::empty({M}, opts);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    MINIGPT_CUDA_CHECK(minigpt_layer_norm_fwd_cuda(
                           x.data_ptr(), r ? r->data_ptr() : nullptr, w.data_ptr(),
                           b ? b->data_ptr() : nullptr, y.data_ptr(),
                           r ? h.data_ptr() : nullptr, mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), M, N, static_cast<float>(eps), dtype_code(x),
                           dtype_code(w), c10::cuda::getCurrentCUDAStream()),
                       "layer_norm_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(x.device().is_cpu(), "minigpt: layer_norm got a tensor on ", x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd",
                                    [&] { ln_fwd_cpu<scalar_t>(x, r, w, b, y, h, mean, rstd, eps); });
  }
  return {y, h, mean, rstd};
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                       const at::Tensor& h, const at::Tensor& w,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       bool has_bias, bool split) {
  check_2d_contig(h, "h");
  check_like(dy, h, "grad_output");
  if (dh) check_like(*dh, h, "grad_h");
  const int64_t M = h.size(0), N = h.size(1);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.numel() == M && rstd.numel() == M && mean.scalar_type() == acc &&
                  rstd.scalar_type() == acc,
              "minigpt: layer_norm_bwd got statistics that do not match the input");
  TORCH_CHECK(w.numel() == N && weight_dtype_ok(w, h, acc) && w.is_contiguous(),
              "minigpt: layer_norm_bwd weight must be (N,) in the accumulation dtype (on CUDA "
              "also in a 16-bit h's dtype), got ", w.scalar_type());
  auto dx = at::empty_like(h);
  // split: dx once more in a buffer of its own, for x beside the residual when both are
  // leaves (their .grad must not share storage); one more store, not a copy afterwards.
  auto dx2 = split ? at::empty_like(h) : h.new_empty({0});
  const int64_t P = row_blocks(M, h.device());
  auto opts = h.options().dtype(acc);
  auto dw_part = at::empty({P, N}, opts);
  auto db_part = has_bias ? at::empty({P, N}, opts) : dw_part;
  if (h.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(h.device());
    MINIGPT_CUDA_CHECK(minigpt_layer_norm_bwd_cuda(
                           dy.data_ptr(), dh ? dh->data_ptr() : nullptr, h.data_ptr(),
                           w.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                           dx.data_ptr(), split ? dx2.data_ptr() : nullptr,
                           dw_part.data_ptr<float>(),
                           has_bias ? db_part.data_ptr<float>() : nullptr, M, N, P,
                           dtype_code(h), dtype_code(w), c10::cuda::getCurrentCUDAStream()),
                       "layer_norm_bwd");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "layer_norm_bwd", [&] {
      ln_bwd_cpu<scalar_t>(dy, dh, h, w, mean, rstd, dx, dx2, dw_part, db_part, has_bias);
    });
  }
  // dweight in the weight's dtype; dbias stays fp32 (as Triton's: the fake of layer_norm_bwd).
  auto dw = dw_part.sum(0).to(w.scalar_type());
  auto db = has_bias ? db_part.sum(0) : dw_part.new_empty({0});
  return {dx, dw, db, dx2};
}

}  // namespace minigpt
