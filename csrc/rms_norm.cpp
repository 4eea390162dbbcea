// RMSNorm (+ fused residual add): C++ CPU kernels, and the entry points that hand CUDA tensors
// to csrc/rms_norm_cuda.cu. Called from minigpt/ops/rms_norm.py, which has already checked shapes
// and dtypes; the TORCH_CHECKs here guard the raw-pointer code itself.
#include "common.h"
#include "cpu_convert.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

#include <algorithm>
#include <cmath>

namespace minigpt {
namespace {

// One row: h = x (+ r), rstd in A, y = h * rstd * w. Rows are read and written through
// cpu_convert.h's in_row / out_row: where T's rows are converted whole (fp16), `buf` holds h
// in A (then y, in place) and `buf2` the residual.
template <typename T, typename A>
void rms_fwd_row(const T* x, const T* r, const A* w, T* y, T* h, A* buf, A* buf2, int64_t N,
                 A eps, A* rstd_out) {
  const row_t<T>* src = r ? residual_row(x, r, h, buf, buf2, N) : in_row(x, buf, N);
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < N; ++j) ss += load(src, j) * load(src, j);
  const A rstd = A(1) / std::sqrt(ss / N + eps);
  row_t<T>* o = out_row(y, buf);
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) store(o, j, load(src, j) * rstd * w[j]);
  flush_row(o, y, N);
  *rstd_out = rstd;
}

template <typename T>
void rms_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& r, const at::Tensor& w,
                 at::Tensor& y, at::Tensor& h, at::Tensor& rstd, double eps) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), N = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = r ? r->data_ptr<T>() : nullptr;
  T* hp = r ? h.data_ptr<T>() : nullptr;
  const A* wp = w.data_ptr<A>();
  T* yp = y.data_ptr<T>();
  A* sp = rstd.data_ptr<A>();
  // Grain: enough rows per task to amortize the scheduling, at least one.
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(kConvertRows<T> ? N : 0), buf2(kConvertRows<T> && rp ? N : 0);
    for (int64_t i = begin; i < end; ++i) {
      rms_fwd_row<T, A>(xp + i * N, rp ? rp + i * N : nullptr, wp, yp + i * N,
                        hp ? hp + i * N : nullptr, buf.data(), buf2.data(), N,
                        static_cast<A>(eps), sp + i);
    }
  });
}

// dx = rstd * (w*dy - xhat * mean(xhat * w*dy)) (+ dh); dw partial sums of dy * xhat, one row
// of dw_part per block of rows so no two threads write the same sums.
template <typename T>
void rms_bwd_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
                 const at::Tensor& w, const at::Tensor& rstd, at::Tensor& dx,
                 at::Tensor& dx2, at::Tensor& dw_part) {
  using A = acc_t<T>;
  const int64_t M = h.size(0), N = h.size(1);
  const int64_t P = dw_part.size(0);
  const T* dyp = dy.data_ptr<T>();
  const T* dhp = dh ? dh->data_ptr<T>() : nullptr;
  const T* hp = h.data_ptr<T>();
  const A* sp = rstd.data_ptr<A>();
  T* dxp = dx.data_ptr<T>();
  T* dx2p = dx2.numel() ? dx2.data_ptr<T>() : nullptr;
  A* dwp = dw_part.data_ptr<A>();
  const int64_t rows_per = (M + P - 1) / P;
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    // __restrict: the dw stores do not alias w (see layer_norm.cpp: GCC gathered w otherwise).
    const A* __restrict wp = w.data_ptr<A>();
    // Rows through cpu_convert.h's in_row / out_row; converted fp16 rows go into xhat and wdy
    // and are worked on in place there, and dx is written over xhat.
    std::vector<A> xhat(N), wdy(N), dbuf(kConvertRows<T> && dhp ? N : 0);
    for (int64_t p = pb; p < pe; ++p) {
      A* __restrict dw = dwp + p * N;
      std::fill(dw, dw + N, A(0));
      const int64_t r0 = p * rows_per, r1 = std::min(M, r0 + rows_per);
      for (int64_t i = r0; i < r1; ++i) {
        const row_t<T>* x = in_row(hp + i * N, xhat.data(), N);
        const row_t<T>* g = in_row(dyp + i * N, wdy.data(), N);
        const A rs = sp[i];
        A c1 = 0;
#pragma omp simd reduction(+ : c1)
        for (int64_t j = 0; j < N; ++j) {
          const A gj = load(g, j);
          xhat[j] = load(x, j) * rs;
          wdy[j] = wp[j] * gj;
          c1 += xhat[j] * wdy[j];
          dw[j] += gj * xhat[j];
        }
        c1 /= N;
        T* out = dxp + i * N;
        row_t<T>* o = out_row(out, xhat.data());
        if (dhp) {
          const row_t<T>* d2 = in_row(dhp + i * N, dbuf.data(), N);
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) store(o, j, (wdy[j] - xhat[j] * c1) * rs + load(d2, j));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) store(o, j, (wdy[j] - xhat[j] * c1) * rs);
        }
        flush_row(o, out, N);
        if (dx2p) std::copy(out, out + N, dx2p + i * N);  // while the row is in L1
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& r, double eps) {
  check_2d_contig(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(N > 0, "minigpt: rms_norm needs a non-empty last dimension");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == N && weight_dtype_ok(w, x, acc) && w.is_contiguous() &&
                  w.device() == x.device(),
              "minigpt: rms_norm weight must be a contiguous (N,) tensor in the accumulation "
              "dtype (on CUDA also in a 16-bit x's dtype), got ", w.scalar_type());
  if (r) check_like(*r, x, "residual");
  auto y = at::empty_like(x);
  auto h = r ? at::empty_like(x) : x.new_empty({0});
  auto rstd = at::empty({M}, x.options().dtype(acc));
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    MINIGPT_CUDA_CHECK(minigpt_rms_norm_fwd_cuda(x.data_ptr(), r ? r->data_ptr() : nullptr,
                                                 w.data_ptr(), y.data_ptr(),
                                                 r ? h.data_ptr() : nullptr,
                                                 rstd.data_ptr<float>(), M, N,
                                                 static_cast<float>(eps), dtype_code(x),
                                                 dtype_code(w), c10::cuda::getCurrentCUDAStream()),
                       "rms_norm_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(x.device().is_cpu(), "minigpt: rms_norm got a tensor on ", x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd",
                                    [&] { rms_fwd_cpu<scalar_t>(x, r, w, y, h, rstd, eps); });
  }
  return {y, h, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                     const at::Tensor& h, const at::Tensor& w,
                                     const at::Tensor& rstd, bool split) {
  check_2d_contig(h, "h");
  check_like(dy, h, "grad_output");
  if (dh) check_like(*dh, h, "grad_h");
  const int64_t M = h.size(0), N = h.size(1);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.numel() == M && rstd.scalar_type() == acc && rstd.is_contiguous(),
              "minigpt: rms_norm_bwd got statistics that do not match the input");
  TORCH_CHECK(w.numel() == N && weight_dtype_ok(w, h, acc) && w.is_contiguous(),
              "minigpt: rms_norm_bwd weight must be (N,) in the accumulation dtype (on CUDA also "
              "in a 16-bit h's dtype), got ", w.scalar_type());
  auto dx = at::empty_like(h);
  auto dx2 = split ? at::empty_like(h) : h.new_empty({0});  // see layer_norm_bwd
  const int64_t P = row_blocks(M, h.device());
  auto dw_part = at::empty({P, N}, h.options().dtype(acc));
  if (h.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(h.device());
    MINIGPT_CUDA_CHECK(minigpt_rms_norm_bwd_cuda(dy.data_ptr(), dh ? dh->data_ptr() : nullptr,
                                                 h.data_ptr(), w.data_ptr(),
                                                 rstd.data_ptr<float>(), dx.data_ptr(),
                                                 split ? dx2.data_ptr() : nullptr,
                                                 dw_part.data_ptr<float>(), M, N, P,
                                                 dtype_code(h), dtype_code(w),
                                                 c10::cuda::getCurrentCUDAStream()),
                       "rms_norm_bwd");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "rms_norm_bwd",
                                    [&] { rms_bwd_cpu<scalar_t>(dy, dh, h, w, rstd, dx, dx2, dw_part); });
  }
  return {dx, dw_part.sum(0).to(w.scalar_type()), dx2};  // dweight in the weight's dtype
}

}  // namespace minigpt
