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

// A weight matrix in the GEMM's panel layout (BLayout::Panels): data is (ceil(N / 16), K, 16).
struct PackedMatrix {
  Tensor data;
  int64_t K = 0, N = 0;
  bool streamed = false;  // read from memory at each product (GemmArgs::b_streamed)
  bool defined() const { return data.defined(); }
  DType dtype() const { return data.dtype(); }
};
// Packs a float32 or bfloat16 matrix stored (K, N) or (N, K) into panels of `dtype` (made once at
// load: a GEMM over panels reads B as it is stored and never packs it again).
// dtype int8 quantizes (see i8_panel_bytes): pack_panels_i8.
PackedMatrix pack_panels(const Tensor& w, BLayout layout, DType dtype);
PackedMatrix pack_panels_i8(const Tensor& w, BLayout layout);
// The float32 (K, N) matrix int8 panels stand for: q * scale, as the GEMM forms each weight.
Tensor dequantize_panels(const PackedMatrix& p);
// compute BF16 (bfloat16 or int8 weights): x is rounded to bfloat16 and summed in k pairs as
// VDPBF16PS does (GemmArgs::a_bf16). compute I8 (int8 weights): x is quantized per 32-k block and
// each block's integer dot scaled (GemmArgs::a_i8).
Tensor linear(const Tensor& x, const PackedMatrix& w, const Tensor* bias, bool gelu, DType compute = DType::F32);
// Whether weights of dtype `weights` (in panels) can run with `compute` activations: float32 with
// any, bfloat16 with bfloat16 or int8 weights, int8 with int8 weights. (linear and the models check it.)
bool compute_fits(DType compute, DType weights);

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
// y[r] = softmax(x[r]) for rows of cols floats (the sampler's probabilities); y may be x.
void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols, Device device = Device::CPU);
// Log-softmax over the last dimension, x - log(sum exp(x)) per row; `reference`: the normaliser by
// the plain loop in double beside the kernel (tests).
Tensor log_softmax(const Tensor& x, bool reference = false);
// log(sum exp(x)) of one row of n > 0 floats (log-probabilities' normaliser); NaN when the row
// holds a NaN or +inf, or only -inf.
double log_sum_exp_row(const float* x, int64_t n, Device device = Device::CPU);
void add_into(const float* a, const float* b, float* y, int64_t n, Device device = Device::CPU);

// Causal attention of query rows over paged KV caches (see AttentionArgs).
void paged_attention(const AttentionArgs* seqs, int n_seqs, Device device = Device::CPU);
// Causal self-attention on contiguous float32 q, k, v of shape (B, H, T, D): the same kernel as the
// model's, over a temporary paged cache. Returns (B, H, T, D).
// kv_dtype bfloat16 rounds k and v into bfloat16 blocks first, as a bfloat16 KV cache holds them;
// reference runs the plain reference kernel instead (for tests).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, DType kv_dtype = DType::F32,
                 bool reference = false);

// out[i] = wte[ids[i]] + wpe[positions[i]]; wte float32 or bfloat16, wpe float32 or bfloat16.
// With wte_panels (wte packed (N, K) as the tied lm_head), the rows are read from the panels
// instead (as they hold them: bfloat16 panels round), so wte's own pages need not stay resident.
void embedding(const int32_t* ids, const int64_t* positions, int64_t n, const Tensor& wte,
               const Tensor& wpe, float* out, const PackedMatrix* wte_panels = nullptr);

// ---- training (ops/ops_train.cpp): raw float32 row-major buffers; "+=" marks accumulation ----
// out[n] += sum_r x[r, n] (bias gradients).
void column_sum(const float* x, int64_t rows, int64_t N, float* out);
// Backward of LN(x) * w + b over rows of C: dx += ..., dw += ..., db += ...
void layernorm_backward(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                        int64_t rows, int64_t C, float eps);
// dx = dy * gelu'(x) (tanh form).
void gelu_backward(const float* x, const float* dy, float* dx, int64_t n);
// A target that is not learned from (PyTorch's and Hugging Face's ignore_index: padding, a prompt
// in supervised fine-tuning): its row's loss is 0 and its gradient 0.
constexpr int32_t kIgnoreTarget = -100;
inline bool valid_target(int32_t t, int64_t V) { return (t >= 0 && t < V) || t == kIgnoreTarget; }
// Each of `rows` targets valid for V classes, else an error naming the first bad one.
void check_targets(const int32_t* targets, int64_t rows, int64_t V);
// Per row: losses[r] = logsumexp(z) - z[target]; if grad_scale != 0, the logits become
// grad_scale * (softmax - onehot) in place. Targets must be in [0, V) or kIgnoreTarget.
void cross_entropy(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V, float grad_scale);
// Causal attention over qkv (B, T, 3C) -> out (B, T, C), lse (B, H, T); T <= 4096. Scores are
// q.k * scale (GPT-2: head_dim^-0.5, see GPT2Config::attn_scale).
void attention_forward(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t H, int64_t hd,
                       float scale);
// dqkv (B, T, 3C) is overwritten with the gradient, recomputing scores from lse.
void attention_backward(const float* qkv, const float* out, const float* lse, const float* dout, float* dqkv,
                        int64_t B, int64_t T, int64_t H, int64_t hd, float scale);
// dwte[ids[i]] += dx[i], dwpe[positions[i]] += dx[i]; columns are split across threads, rows are
// summed in order, so the result is deterministic.
void embedding_backward(const int32_t* ids, const int64_t* positions, int64_t n, const float* dx, float* dwte,
                        float* dwpe, int64_t C);
// Sum of squares in fixed 64 Ki-element chunks, combined in double in order.
double sum_squares(const float* x, int64_t n);
void adamw(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWArgs& args);

}  // namespace ops
}  // namespace llamas
