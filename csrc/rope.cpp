// Rotary position embeddings (rotate-half layout), q and k in one pass: C++ CPU kernels and the
// entry point that hands CUDA tensors to csrc/rope_cuda.cu. Called from minigpt/ops/rope.py, which
// has already checked shapes, dtypes and position ranges; the TORCH_CHECKs here guard the
// raw-pointer code itself.
//
// With d = D/2, x = (x1, x2) and the table row split the same way (c1, c2), (s1, s2):
//   forward   y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2
//   inverse   x1 = y1*c1 + y2*s2,   x2 = y2*c2 - y1*s1   (the transpose: the backward)
#include "common.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

namespace minigpt {
namespace {

// Rotate the H heads of x at (b, t): x read through strides, o contiguous (B, H, T, D).
template <typename T, typename A>
inline void rotate_heads(const T* x, T* o, int64_t b, int64_t t, int64_t H, int64_t T_,
                         int64_t D, int64_t sb, int64_t sh, int64_t st, const A* c, const A* s,
                         bool inverse) {
  const int64_t d = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    const T* xr = x + b * sb + h * sh + t * st;
    T* orow = o + ((b * H + h) * T_ + t) * D;
    if (inverse) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const A x1 = static_cast<A>(xr[j]), x2 = static_cast<A>(xr[j + d]);
        orow[j] = static_cast<T>(x1 * c[j] + x2 * s[j + d]);
        orow[j + d] = static_cast<T>(x2 * c[j + d] - x1 * s[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const A x1 = static_cast<A>(xr[j]), x2 = static_cast<A>(xr[j + d]);
        orow[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
        orow[j + d] = static_cast<T>(x2 * c[j + d] + x1 * s[j + d]);
      }
    }
  }
}

template <typename T>
void rope_cpu(const at::Tensor& q, const at::Tensor& k, at::Tensor& qo, at::Tensor& ko,
              const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& pos,
              int64_t cos_bstride, int64_t pos_bstride, bool inverse) {
  using A = acc_t<T>;
  const int64_t B = q.size(0), Hq = q.size(1), T_ = q.size(2), D = q.size(3), Hk = k.size(1);
  const int64_t L = cos.size(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  T* qop = qo.data_ptr<T>();
  T* kop = ko.data_ptr<T>();
  const A* cp = cos.data_ptr<A>();
  const A* sp = sin.data_ptr<A>();
  const int64_t* pp = pos ? pos->data_ptr<int64_t>() : nullptr;
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qst = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kst = k.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / ((Hq + Hk) * D));
  at::parallel_for(0, B * T_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / T_, t = i % T_;
      int64_t row;
      if (pp) {
        const int64_t p = pp[b * pos_bstride + t];
        TORCH_CHECK(p >= 0 && p < L, "minigpt: rope position ", p, " outside the table of ", L);
        row = p * D;
      } else {
        row = b * cos_bstride + t * D;
      }
      rotate_heads<T, A>(qp, qop, b, t, Hq, T_, D, qsb, qsh, qst, cp + row, sp + row, inverse);
      rotate_heads<T, A>(kp, kop, b, t, Hk, T_, D, ksb, ksh, kst, cp + row, sp + row, inverse);
    }
  });
}

}  // namespace

std::vector<at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                             const at::Tensor& sin, const std::optional<at::Tensor>& pos,
                             bool inverse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "minigpt: rope q and k must be 4-D");
  const int64_t B = q.size(0), T_ = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == T_ && k.size(3) == D,
              "minigpt: rope k must match q in batch, seq and head_dim");
  TORCH_CHECK(D > 0 && D % 2 == 0, "minigpt: rope head_dim must be even and non-zero");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "minigpt: rope needs a unit last stride");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "minigpt: rope q and k must share dtype and device");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == acc &&
                  sin.scalar_type() == acc && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.device() == q.device() && sin.device() == q.device(),
              "minigpt: rope cos/sin must be contiguous, alike, in the accumulation dtype");
  TORCH_CHECK(cos.size(-1) == D, "minigpt: rope cos/sin last dim must be head_dim");
  int64_t cos_bstride = 0, pos_bstride = 0;
  if (pos) {
    TORCH_CHECK(pos->scalar_type() == at::kLong && pos->is_contiguous() &&
                    pos->device() == q.device() && cos.dim() == 2,
                "minigpt: rope position ids must be contiguous int64 with (L, D) tables");
    TORCH_CHECK((pos->dim() == 1 && pos->size(0) == T_) ||
                    (pos->dim() == 2 && pos->size(0) == B && pos->size(1) == T_),
                "minigpt: rope position ids must be (T,) or (B, T)");
    pos_bstride = pos->dim() == 2 ? T_ : 0;
  } else {
    TORCH_CHECK((cos.dim() == 2 && cos.size(0) == T_) ||
                    (cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T_),
                "minigpt: rope cos/sin must be (T, D) or (B, T, D)");
    cos_bstride = cos.dim() == 3 ? T_ * D : 0;
  }
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    MINIGPT_CUDA_CHECK(
        minigpt_rope_cuda(q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(),
                          cos.data_ptr<float>(), sin.data_ptr<float>(),
                          pos ? pos->data_ptr<int64_t>() : nullptr, B, q.size(1), k.size(1), T_,
                          D, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                          k.stride(2), cos_bstride, pos_bstride, cos.size(0), inverse ? 1 : 0,
                          dtype_code(q), c10::cuda::getCurrentCUDAStream()),
        "rope");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(q.device().is_cpu(), "minigpt: rope got a tensor on ", q.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope", [&] {
      rope_cpu<scalar_t>(q, k, qo, ko, cos, sin, pos, cos_bstride, pos_bstride, inverse);
    });
  }
  return {qo, ko};
}

}  // namespace minigpt
