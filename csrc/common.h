// Shared by the C++ op files: light headers only (ATen/Parallel, c10 numeric types), so each
// op file compiles in about a second; only module.cpp pays for <torch/extension.h>.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace minigpt {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Kernels in .cu files take a dtype code instead of a template parameter (they cannot see
// torch's types); these must match csrc/cuda_common.cuh.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "minigpt: CUDA kernels take float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

// The norm kernels take weights in the accumulation dtype; the CUDA ones also in the dtype of
// 16-bit rows (a bf16 model's parameters, read without a cast kernel per call).
inline bool weight_dtype_ok(const at::Tensor& w, const at::Tensor& x, at::ScalarType acc) {
  if (w.scalar_type() == acc) return true;
  const auto t = x.scalar_type();
  return x.is_cuda() && w.scalar_type() == t && (t == at::kHalf || t == at::kBFloat16);
}

inline void check_2d_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "minigpt: ", name, " must be 2-D (rows, N), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "minigpt: ", name, " must be contiguous");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "minigpt: ", name, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "minigpt: ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "minigpt: ", name, " is on ", t.device(),
              ", expected ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "minigpt: ", name, " must be contiguous");
}


}  // namespace minigpt

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#define MINIGPT_CUDA_CHECK(expr, what)                                                   \
  do {                                                                                   \
    int _err = (expr);                                                                   \
    TORCH_CHECK(_err == 0, "minigpt: CUDA kernel ", what, " failed: ",                  \
                cudaGetErrorString(static_cast<cudaError_t>(_err)));                     \
  } while (0)
#endif

namespace minigpt {
// Rows are split into contiguous blocks so per-block partial sums (e.g. dweight) have a fixed
// home: one block per CPU thread, or four per SM on a GPU (after the CUDA includes above), and
// more where a block would pass kMaxBlockRows rows: a block adds its rows one after another in
// fp32, and with a block per thread the CPU's dbias of 2^20 rows (on 2 threads) was 0.4% off
// (sum of dy = 0.1 everywhere; torch: 1e-6). The (blocks, N) partial sums of dweight and dbias
// take about 1/512 of the rows' fp32 size.
constexpr int64_t kMaxBlockRows = 1024;
inline int64_t row_blocks(int64_t rows, const at::Device& device) {
  int64_t cap = at::get_num_threads();
  if (device.is_cuda()) {
#ifdef WITH_CUDA
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index());
    cap = 4 * static_cast<int64_t>(sms);
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  }
  const int64_t need = (rows + kMaxBlockRows - 1) / kMaxBlockRows;
  return std::max<int64_t>(1, std::max(need, std::min<int64_t>(rows, cap)));
}
}  // namespace minigpt
