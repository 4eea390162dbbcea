// SwiGLU, silu(gate) * up: C++ CPU kernels, and the entry points that hand CUDA tensors to
// csrc/swiglu_cuda.cu. Elementwise over flattened contiguous tensors, fp32 (fp64 for fp64) math.
// Called from minigpt/ops/swiglu.py, which has already checked shapes and dtypes.
#include "common.h"
#include "cpu_convert.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

#include <cmath>
#include <cstring>

namespace minigpt {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: a task must outweigh its scheduling

template <typename A> inline A exp_simd(A x) { return exp_vec(x); }  // cpu_convert.h

// fp16 with F16C converts kChunk elements at a time in registers (cpu_convert.h's
// load_chunk / store_chunk: element by element, fp16 SwiGLU ran 1.3x behind eager); the rest,
// and other types, element by element. Each formula is written for both.
template <typename T>
void swiglu_fwd_cpu(const T* g, const T* u, T* y, int64_t n) {
  using A = acc_t<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t i0 = b;
#if defined(__F16C__)
    if constexpr (kConvertChunks<T>) {
      for (; i0 + kChunk <= e; i0 += kChunk) {
        A gs[kChunk], us[kChunk], ys[kChunk];
        load_chunk(g + i0, gs);
        load_chunk(u + i0, us);
#pragma omp simd
        for (int k = 0; k < kChunk; ++k) {
          const A sig = A(1) / (A(1) + exp_simd(-gs[k]));
          ys[k] = gs[k] * sig * us[k];
        }
        store_chunk(ys, y + i0);
      }
    }
#endif
#pragma omp simd
    for (int64_t i = i0; i < e; ++i) {
      const A gv = load(g, i);
      const A sig = A(1) / (A(1) + exp_simd(-gv));
      store(y, i, gv * sig * load(u, i));
    }
  });
}

template <typename T>
void swiglu_bwd_cpu(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using A = acc_t<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t i0 = b;
#if defined(__F16C__)
    if constexpr (kConvertChunks<T>) {
      for (; i0 + kChunk <= e; i0 += kChunk) {
        A ds[kChunk], gs[kChunk], us[kChunk], dgs[kChunk], dus[kChunk];
        load_chunk(dy + i0, ds);
        load_chunk(g + i0, gs);
        load_chunk(u + i0, us);
#pragma omp simd
        for (int k = 0; k < kChunk; ++k) {
          const A sig = A(1) / (A(1) + exp_simd(-gs[k]));
          dgs[k] = ds[k] * us[k] * sig * (A(1) + gs[k] * (A(1) - sig));
          dus[k] = ds[k] * (gs[k] * sig);  // silu(g) first, as below
        }
        store_chunk(dgs, dg + i0);
        store_chunk(dus, du + i0);
      }
    }
#endif
#pragma omp simd
    for (int64_t i = i0; i < e; ++i) {
      const A d = load(dy, i), gv = load(g, i), uv = load(u, i);
      const A sig = A(1) / (A(1) + exp_simd(-gv));
      // d silu / d g = sig * (1 + g * (1 - sig))
      store(dg, i, d * uv * sig * (A(1) + gv * (A(1) - sig)));
      // d * silu(g), with silu(g) formed first as the reference's autograd does: d * g first
      // overflows at |g| ~ 1e38 and a gate so negative that sig = 0 gave inf * 0 = NaN.
      store(du, i, d * (gv * sig));
    }
  });
}

void check_flat(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.dim() == 1, "minigpt: swiglu ", name, " must be flattened to 1-D");
  check_like(t, ref, name);
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_flat(gate, gate, "gate");
  check_flat(up, gate, "up");
  auto y = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (gate.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(gate.device());
    MINIGPT_CUDA_CHECK(minigpt_swiglu_fwd_cuda(gate.data_ptr(), up.data_ptr(), y.data_ptr(), n,
                                               dtype_code(gate), c10::cuda::getCurrentCUDAStream()),
                       "swiglu_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(gate.device().is_cpu(), "minigpt: swiglu got a tensor on ", gate.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd", [&] {
      swiglu_fwd_cpu<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                               y.data_ptr<scalar_t>(), n);
    });
  }
  return y;
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                   const at::Tensor& up) {
  check_flat(gate, gate, "gate");
  check_flat(up, gate, "up");
  check_flat(dy, gate, "grad_output");
  auto dg = at::empty_like(gate), du = at::empty_like(up);
  const int64_t n = gate.numel();
  if (gate.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(gate.device());
    MINIGPT_CUDA_CHECK(minigpt_swiglu_bwd_cuda(dy.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                               dg.data_ptr(), du.data_ptr(), n, dtype_code(gate),
                                               c10::cuda::getCurrentCUDAStream()),
                       "swiglu_bwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(gate.device().is_cpu(), "minigpt: swiglu got a tensor on ", gate.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd", [&] {
      swiglu_bwd_cpu<scalar_t>(dy.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                               up.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(),
                               du.data_ptr<scalar_t>(), n);
    });
  }
  return {dg, du};
}

}  // namespace minigpt
