// extern "C" launchers implemented in csrc/*.cu: raw pointers, sizes, a dtype code
// (csrc/common.h DType) and the stream to run on. Each returns a cudaError_t as int.
#pragma once
#include <stdint.h>

typedef struct CUstream_st* cudaStream_t;

extern "C" {

// layer_norm.cu: x, r, y, h (M, N) in `dtype`; w, b (N,) fp32; mean, rstd (M,) fp32.
int minigpt_layer_norm_fwd_cuda(const void* x, const void* r, const float* w, const float* b,
                                void* y, void* h, float* mean, float* rstd, int64_t M, int64_t N,
                                float eps, int dtype, cudaStream_t stream);
// dw_part/db_part (P, N) fp32 partial sums, one row per block of rows (reduced by the caller).
int minigpt_layer_norm_bwd_cuda(const void* dy, const void* dh, const void* h, const float* w,
                                const float* mean, const float* rstd, void* dx, float* dw_part,
                                float* db_part, int64_t M, int64_t N, int64_t P, int dtype,
                                cudaStream_t stream);

}  // extern "C"
