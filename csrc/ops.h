// Entry points of minigpt._C, one block per op file (csrc/<op>.cpp). Each takes CPU or CUDA
// tensors and runs the C++ or CUDA kernel for the tensor's device.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace minigpt {

// layer_norm.cpp -> {y, h, mean, rstd} / {dx, dweight, dbias}
std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                       const std::optional<at::Tensor>& b,
                                       const std::optional<at::Tensor>& r, double eps);
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                       const at::Tensor& h, const at::Tensor& w,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       bool has_bias, bool split);

// softmax.cpp -> y / dx. x is (M, N) rows; with `causal` they are (M / T) blocks of (T, N).
at::Tensor softmax_fwd(const at::Tensor& x, double scale, bool causal, int64_t T);
at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale);

// rms_norm.cpp -> {y, h, rstd} / {dx, dweight}
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                     const std::optional<at::Tensor>& r, double eps);
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                     const at::Tensor& h, const at::Tensor& w,
                                     const at::Tensor& rstd, bool split);

// rope.cpp -> {q_rot, k_rot}; `inverse` rotates by -sin (the backward).
std::vector<at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                             const at::Tensor& sin, const std::optional<at::Tensor>& pos,
                             bool inverse);

// swiglu.cpp -> y / {dgate, dup}, on flattened (n,) tensors.
// quant_matmul.cpp -> y (M, N) = x (M, K) W^T, W packed GGUF Q8_0/Q4_1 blocks (N, K/32*bytes).
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n_out);
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                   const at::Tensor& up);

// cross_entropy.cpp -> (per-row loss (rows,) in the accumulation dtype, the number of CPU rows
// whose target is outside [0, V) and not ignore_index: their loss is NaN, for the caller to
// raise on); with `grad` (may be logits itself) also writes grad_scale * dloss_i/dlogits.
std::tuple<at::Tensor, int64_t> cross_entropy_fwd(const at::Tensor& logits,
                                                   const at::Tensor& target,
                                                   const std::optional<at::Tensor>& grad,
                                                   int64_t ignore_index, double label_smoothing,
                                                   double grad_scale);

// attention.cpp -> {out, lse} / {dq, dk, dv} / out. q (B, Hq, T, D), k, v (B, Hkv, S, D), any
// batch/head/sequence strides with a unit last stride; lse (B, Hq, T) in the accumulation dtype.
// dropout_p > 0 (CPU only): dropout on the probabilities with the mask tl.rand draws from
// `seed` (>= 0) in the Triton kernels; the backward takes the forward's dropout_p and seed.
std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, bool causal, double scale,
                                      double dropout_p = 0.0, int64_t seed = 0);
std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse, bool causal,
                                      double scale, double dropout_p = 0.0, int64_t seed = 0);
at::Tensor decode_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                double scale);

}  // namespace minigpt
