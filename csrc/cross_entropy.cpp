// Cross-entropy over rows of logits: C++ CPU kernel, and the entry point that hands CUDA tensors
// to csrc/cross_entropy_cuda.cu. Called from minigpt/ops/cross_entropy.py, which has already checked
// shapes, dtypes and, where it may read them on the host, that every target is ignore_index or
// in [0, V); the TORCH_CHECKs here guard the raw-pointer code itself. Where it may not (no host
// syncs), a CPU row with such a target is counted and returned; CUDA rows get a NaN loss.
//
// Per row i with target t (label smoothing e):
//   loss_i = lse - (1 - e) x_t - (e / V) sum_j x_j,          lse = log sum_j exp(x_j)
//   grad_ij = scale * (softmax_ij - e / V - (1 - e) [j == t])
// One pass over the row keeps a running max and a running sum of exp (online logsumexp, block by
// block) so the softmax is never stored; a second pass writes the gradient, which may overwrite
// the logits themselves (grad may alias logits: each element is read before it is written, and
// x_t is read in the first pass). Ignored rows get loss 0 and gradient 0.
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "cpu_convert.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

namespace minigpt {
namespace {

constexpr int64_t kCeBlock = 512;  // columns per online-logsumexp step: fits L1, vectorizes

// Every exp here is of a logit minus the running max (<= 0): cpu_convert.h's exp_nonpos.

template <typename T>
void ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, T* grad, at::Tensor& loss,
                int64_t ignore_index, double label_smoothing, double grad_scale, std::atomic<int64_t>* bad) {
  using A = acc_t<T>;
  const int64_t M = logits.size(0), V = logits.size(1);
  const T* xp = logits.data_ptr<T>();
  const int64_t* tp = target.data_ptr<int64_t>();
  A* lp = loss.data_ptr<A>();
  const A eps = static_cast<A>(label_smoothing);
  const A smooth = eps / static_cast<A>(V);
  const A scale = static_cast<A>(grad_scale);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    A buf[kCeBlock];
    for (int64_t i = begin; i < end; ++i) {
      const T* x = xp + i * V;
      T* g = grad ? grad + i * V : nullptr;
      const int64_t t = tp[i];
      if (t == ignore_index) {
        lp[i] = 0;
        if (g) std::fill(g, g + V, static_cast<T>(0));
        continue;
      }
      if (t < 0 || t >= V) {  // the Python side checks first; never read out of bounds
        bad->fetch_add(1, std::memory_order_relaxed);
        lp[i] = std::numeric_limits<A>::quiet_NaN();
        if (g) std::fill(g, g + V, static_cast<T>(0));
        continue;
      }
      const A xt = static_cast<A>(x[t]);
      // The smoothing term's sum of logits is taken as sum(x - x_t): sum(x) overflowed at
      // logits near the format's max (and M - sum(x) / V cancelled away all precision at any
      // large common offset), where the reference's sum(x - lse) gives log V. A masked target
      // (x_t = -inf) would make x_t - x_t NaN; its loss is +inf either way.
      const A shift = std::isfinite(xt) ? xt : A(0);
      A m = -std::numeric_limits<A>::infinity(), s = 0, sx = 0;
      for (int64_t c0 = 0; c0 < V; c0 += kCeBlock) {
        const int64_t n = std::min<int64_t>(kCeBlock, V - c0);
        A bm = -std::numeric_limits<A>::infinity(), bsx = 0;
#pragma omp simd reduction(max : bm) reduction(+ : bsx)
        for (int64_t j = 0; j < n; ++j) {
          const A v = load(x, c0 + j);
          buf[j] = v;
          bm = std::max(bm, v);
          bsx += v - shift;
        }
        sx += bsx;
        // A block of only -inf adds exp(-inf) = 0. std::max drops NaN, so a block of only NaN
        // (and -inf) has bm = -inf too: bsx is NaN then, and the block must not be skipped,
        // or a row with a NaN logit got a finite loss.
        if (bm == -std::numeric_limits<A>::infinity() && !std::isnan(bsx)) continue;
        if (bm > m) {
          s *= exp_nonpos(m - bm);  // exp(-inf) = 0 on the first block
          m = bm;
        }
        A bs = 0;
#pragma omp simd reduction(+ : bs)
        for (int64_t j = 0; j < n; ++j) bs += exp_nonpos(buf[j] - m);
        s += bs;
      }
      // Everything relative to the max m: x - m is exact, where x - lse would lose the low bits
      // of large logits. Without smoothing sx is unused (and -inf logits, i.e. masked classes,
      // would make 0 * sx NaN).
      const A logd = std::log(s);
      lp[i] = (A(1) - eps) * ((m - xt) + logd) +
              (eps > 0 ? eps * (((m - shift) - sx / static_cast<A>(V)) + logd) : A(0));
      if (g) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j)
          store(g, j, scale * (exp_nonpos((load(x, j) - m) - logd) - smooth));
        // Recomputed from the saved x_t, not read back from g (g may be x, already overwritten).
        g[t] = static_cast<T>(scale * (exp_nonpos((xt - m) - logd) - smooth - (A(1) - eps)));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, int64_t> cross_entropy_fwd(const at::Tensor& logits,
                                                   const at::Tensor& target,
                                                   const std::optional<at::Tensor>& grad,
                                                   int64_t ignore_index, double label_smoothing,
                                                   double grad_scale) {
  check_2d_contig(logits, "logits");
  const int64_t M = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "minigpt: cross_entropy needs a non-empty class dimension");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == M && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.device() == logits.device(),
              "minigpt: cross_entropy target must be a contiguous int64 (rows,) tensor on the "
              "logits' device");
  // grad may be logits itself (in-place gradient, as the fused linear cross-entropy uses it).
  if (grad) check_like(*grad, logits, "grad");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::empty({M}, logits.options().dtype(acc));
  int64_t bad_rows = 0;  // the CUDA kernel gives such rows a NaN loss instead (no sync)
  if (logits.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(logits.device());
    MINIGPT_CUDA_CHECK(minigpt_cross_entropy_fwd_cuda(
                           logits.data_ptr(), target.data_ptr<int64_t>(),
                           grad ? grad->data_ptr() : nullptr, loss.data_ptr<float>(), M, V,
                           ignore_index, static_cast<float>(label_smoothing),
                           static_cast<float>(grad_scale), dtype_code(logits),
                           c10::cuda::getCurrentCUDAStream()),
                       "cross_entropy_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(logits.device().is_cpu(), "minigpt: cross_entropy got a tensor on ",
                logits.device());
    std::atomic<int64_t> bad{0};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                    "cross_entropy_fwd", [&] {
                                      ce_fwd_cpu<scalar_t>(
                                          logits, target,
                                          grad ? grad->data_ptr<scalar_t>() : nullptr, loss,
                                          ignore_index, label_smoothing, grad_scale, &bad);
                                    });
    // Counted, not thrown: the caller raises a ValueError. A C++ exception out of the
    // extension built on the H100 image (its /opt/gcc g++) ended the process with SIGSEGV.
    bad_rows = bad.load();
  }
  return {loss, bad_rows};
}

}  // namespace minigpt
