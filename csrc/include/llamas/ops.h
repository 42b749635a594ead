#pragma once
// Every op has one declaration here and one dispatch point in ops/ops.cpp, chosen by the tensors'
// device. Models call these and nothing below them.
#include <cstdint>

#include "llamas/kernel_args.h"
#include "llamas/tensor.h"

namespace llamas {
namespace ops {

// float32 <-> bfloat16 (round to nearest even); returns the input when the dtype already matches.
Tensor cast(const Tensor& x, DType dtype);

// C = A @ B (+ bias) (then GELU), on raw row-strided buffers (see GemmArgs).
void gemm(const GemmArgs& args, Device device = Device::CPU);
// (M, K) @ (K, N) for float32 tensors.
Tensor matmul(const Tensor& a, const Tensor& b);
// y = x @ W (+ bias) (GELU); x float32 (M, K); W float32 or bfloat16, stored (K, N) or (N, K).
Tensor linear(const Tensor& x, const Tensor& w, BLayout layout, const Tensor* bias, bool gelu);

Tensor layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps);
// x += delta; returns LN(x) (x is updated in place: it is the residual stream).
Tensor residual_layernorm(Tensor& x, const Tensor& delta, const Tensor& w, const Tensor& b, float eps);
void layernorm_rows(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C,
                    float eps, Device device = Device::CPU);
void residual_layernorm_rows(float* x, const float* delta, const float* w, const float* b, float* out,
                             int64_t rows, int64_t C, float eps, Device device = Device::CPU);
Tensor gelu(const Tensor& x);
// Softmax over the last dimension.
Tensor softmax(const Tensor& x);
void add_into(const float* a, const float* b, float* y, int64_t n, Device device = Device::CPU);

// Causal attention of query rows over paged KV caches (see AttentionArgs).
void paged_attention(const AttentionArgs* seqs, int n_seqs, Device device = Device::CPU);
// Causal self-attention on contiguous float32 q, k, v of shape (B, H, T, D): the same kernel as the
// model's, over a temporary paged cache. Returns (B, H, T, D).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v);

// out[i] = wte[ids[i]] + wpe[positions[i]]; wte float32 or bfloat16, wpe float32 or bfloat16.
void embedding(const int32_t* ids, const int64_t* positions, int64_t n, const Tensor& wte,
               const Tensor& wpe, float* out);

}  // namespace ops
}  // namespace llamas
