#pragma once
// Plain, obviously-correct loops beside the fast kernels: the benchmarks validate against them
// before timing, and tests compare the fast kernels to them.
#include "llamas/kernel_args.h"

namespace llamas {
namespace cpu {
namespace reference {

// One std::fma chain per element over k ascending, from the bias: bit-identical to the fast GEMM
// on CPUs with hardware FMA.
void gemm(const GemmArgs& args);
// Naive causal attention: full score row, max-subtracted softmax, weighted sum of values.
void attention(const AttentionArgs& args);
void layernorm(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C, float eps);
// log(sum exp(x)) of one row: the max, then exp and sum in double; NaN as the kernel's.
double log_sum_exp(const float* x, int64_t n);

// Training kernels (reference_train.cpp), same contracts as the kernel table's entries.
void layernorm_backward(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                        int64_t rows, int64_t C, float eps);
void gelu_backward(const float* x, const float* dy, float* dx, int64_t n);
void cross_entropy(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V, float grad_scale);
// dqkv (B, T, 3C) from qkv and dout (B, T, C), recomputing the forward in double.
void attention_backward(const float* qkv, const float* dout, float* dqkv, int64_t B, int64_t T, int64_t H,
                        int64_t hd);
void adamw(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWArgs& args);

}  // namespace reference
}  // namespace cpu
}  // namespace llamas
