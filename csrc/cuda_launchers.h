// extern "C" launchers implemented in csrc/*.cu: raw pointers, sizes, a dtype code
// (csrc/common.h DType) and the stream to run on. Each returns a cudaError_t as int.
#pragma once
#include <stdint.h>

typedef struct CUstream_st* cudaStream_t;

extern "C" {

// layer_norm_cuda.cu: x, r, y, h (M, N) in `dtype`; w, b (N,) in `wdtype`: fp32, or `dtype`
// when that is 16-bit; mean, rstd (M,) fp32.
int minigpt_layer_norm_fwd_cuda(const void* x, const void* r, const void* w, const void* b,
                                void* y, void* h, float* mean, float* rstd, int64_t M, int64_t N,
                                float eps, int dtype, int wdtype, cudaStream_t stream);
// dw_part/db_part (P, N) fp32 partial sums, one row per block of rows (reduced by the caller).
// dx2: null, or a second buffer that gets dx too (x's and the residual's gradients as separate
// tensors: one more store instead of a copy afterwards).
int minigpt_layer_norm_bwd_cuda(const void* dy, const void* dh, const void* h, const void* w,
                                const float* mean, const float* rstd, void* dx, void* dx2,
                                float* dw_part, float* db_part, int64_t M, int64_t N, int64_t P,
                                int dtype, int wdtype, cudaStream_t stream);

// softmax_cuda.cu: x, y, dy, dx (M, N) in `dtype`; causal rows are (M / T) blocks of (T, N).
int minigpt_softmax_fwd_cuda(const void* x, void* y, int64_t M, int64_t N, float scale,
                             int causal, int64_t T, int dtype, cudaStream_t stream);
int minigpt_softmax_bwd_cuda(const void* dy, const void* y, void* dx, int64_t M, int64_t N,
                             float scale, int dtype, cudaStream_t stream);

// rms_norm_cuda.cu: x, r, y, h (M, N) in `dtype`; w (N,) in `wdtype` (fp32, or `dtype` when that
// is 16-bit); rstd (M,) fp32; dw_part (P, N) fp32 partial sums, one row per block of rows
// (reduced by the caller).
int minigpt_rms_norm_fwd_cuda(const void* x, const void* r, const void* w, void* y, void* h,
                              float* rstd, int64_t M, int64_t N, float eps, int dtype,
                              int wdtype, cudaStream_t stream);
// dx2: null, or a second buffer that gets dx too (as in layer_norm).
int minigpt_rms_norm_bwd_cuda(const void* dy, const void* dh, const void* h, const void* w,
                              const float* rstd, void* dx, void* dx2, float* dw_part, int64_t M,
                              int64_t N, int64_t P, int dtype, int wdtype, cudaStream_t stream);

// rope_cuda.cu: q (B, Hq, T, D), k (B, Hk, T, D) in `dtype` read through strides (unit last
// stride); qo, ko contiguous; cos/sin fp32 rows of D at b * cos_bstride + t * D, or, with pos
// (int64, read at b * pos_bstride + t), at pos * D in an (L, D) table.
int minigpt_rope_cuda(const void* q, const void* k, void* qo, void* ko, const float* cos,
                      const float* sin, const int64_t* pos, int64_t B, int64_t Hq, int64_t Hk,
                      int64_t T, int64_t D, int64_t qsb, int64_t qsh, int64_t qst, int64_t ksb,
                      int64_t ksh, int64_t kst, int64_t cos_bstride, int64_t pos_bstride,
                      int64_t L, int inverse, int dtype, cudaStream_t stream);

// swiglu_cuda.cu: gate, up, y, dy, dgate, dup (n,) contiguous in `dtype`.
int minigpt_swiglu_fwd_cuda(const void* gate, const void* up, void* y, int64_t n, int dtype,
                            cudaStream_t stream);
int minigpt_swiglu_bwd_cuda(const void* dy, const void* gate, const void* up, void* dgate,
                            void* dup, int64_t n, int dtype, cudaStream_t stream);

// cross_entropy_cuda.cu: logits, grad (M, V) in `dtype` (grad may alias logits, or be null for no
// gradient); target (M,) int64; loss (M,) fp32 per row; grad = grad_scale * dloss_i/dlogits.
int minigpt_cross_entropy_fwd_cuda(const void* logits, const int64_t* target, void* grad,
                                   float* loss, int64_t M, int64_t V, int64_t ignore_index,
                                   float label_smoothing, float grad_scale, int dtype,
                                   cudaStream_t stream);

// attention_cuda.cu. Shapes and element strides of q (B, Hq, T, D) and k, v (B, Hkv, S, D); the head
// dimension has unit stride. Outputs (out, dq, dk, dv) are contiguous; lse, delta (B, Hq, T) fp32.
typedef struct MgAttnGeo {
  int64_t B, Hq, Hkv, T, S, D;
  int64_t qb, qh, qt, kb, kh, ks, vb, vh, vs;
  int causal;
} MgAttnGeo;
int minigpt_attention_fwd_cuda(MgAttnGeo g, const void* q, const void* k, const void* v, void* out,
                               float* lse, float scale, int dtype, cudaStream_t stream);
// dout has strides (db, dh, dt); delta is scratch (B, Hq, T) fp32.
int minigpt_attention_bwd_cuda(MgAttnGeo g, const void* dout, int64_t db, int64_t dh, int64_t dt,
                               const void* q, const void* k, const void* v, const void* out,
                               const float* lse, float* delta, void* dq, void* dk, void* dv,
                               float scale, int dtype, cudaStream_t stream);
// Flash-decoding: q (B, Hq, 1, D) (T = 1), caches as k, v with S = S_max; seqlens (B,) int32;
// o_part (B, Hq, nsplit, D) and lse_part (B, Hq, nsplit) fp32 scratch; out (B, Hq, 1, D).
int minigpt_decode_attention_cuda(MgAttnGeo g, const void* q, const void* k, const void* v,
                                  const int32_t* seqlens, float* o_part, float* lse_part,
                                  void* out, int64_t nsplit, int64_t split_len, float scale,
                                  int dtype, cudaStream_t stream);

}  // extern "C"
