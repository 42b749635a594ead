#pragma once
// Plain argument structs shared by the ops layer and every backend (raw pointers, no device code).
#include <cstdint>

namespace llamas {

// How B is stored: (K, N) row-major, as GPT-2's Conv1D weights, or (N, K) row-major, as nn.Linear
// weights and the tied lm_head (wte). Both give C = A @ B with B viewed as (K, N).
// Panels: the GEMM's own layout, made once at load by ops::pack_panels: ceil(N / kPanelWidth)
// panels of kPanelWidth columns, each [K][kPanelWidth] (columns past N are zero). Every thread's
// share of B is then one contiguous stream (decode) and no GEMM packs B again (prefill).
enum class BLayout : uint8_t { KN, NK, Panels };
constexpr int64_t kPanelWidth = 16;
// bfloat16 panels interleave each row's 16 columns: column c sits at slot 2 (c % 8) + c / 8, so
// one 32-byte row load holds columns 0-7 in the low and 8-15 in the high halves of its 32-bit
// lanes, and widening to float32 is one shift and one mask (AVX2) instead of two 16-to-32-bit
// conversions and two shifts: decode streams bfloat16 weights with half the instructions.
constexpr int64_t bf16_panel_slot(int64_t c) { return 2 * (c % 8) + c / 8; }
// int8 panels (weights quantized at load, as llama.cpp's Q8_0 but per column): a panel is K rows
// of 16 int8 (column c at byte c), then ceil(K / 32) rows of 16 float32 scales. Column c's weight
// at k is q * scale[k / 32][c], with scale = (max |w| over those 32 k) / 127 and q = w / scale
// rounded to nearest (ties to even). 1.125 bytes a weight.
constexpr int64_t kI8Block = 32;
constexpr int64_t i8_panel_bytes(int64_t K) {
  return K * kPanelWidth + (K + kI8Block - 1) / kI8Block * kPanelWidth * 4;
}

struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const float* A = nullptr;  // (M, K), row stride lda; with a_trans, stored (K, M), row stride lda
  int64_t lda = 0;
  bool a_trans = false;      // weight gradients: dW = X^T @ dY reads X (rows, in) as A^T
  const void* B = nullptr;   // float32, bfloat16 (uint16) or int8 (Panels only) elements
  bool b_bf16 = false;
  bool b_i8 = false;         // int8 panels with block scales (see i8_panel_bytes)
  // B (panels) comes from memory, not cache, at each product: a model larger than the last-level
  // cache reads its weights so at every token. One-row products then stream one panel at a time.
  bool b_streamed = false;
  BLayout b_layout = BLayout::KN;
  int64_t ldb = 0;           // row stride of B as stored (unused for Panels)
  const float* bias = nullptr;  // (N) or null; ignored when accumulate is set
  float* C = nullptr;        // (M, N), row stride ldc
  int64_t ldc = 0;
  bool accumulate = false;   // C += A @ B instead of C = A @ B + bias
  bool gelu = false;         // apply GELU (tanh form) to the result
  // A rounded to bfloat16 and summed in k pairs as VDPBF16PS does (cpu/gemm_bf16_dot_impl.h); only
  // with bfloat16 or int8 B in panels and A not transposed.
  bool a_bf16 = false;
  // A quantized to int8 per 32-k block as the weights are, and each block's integer dot scaled by
  // both scales (W8A8, cpu/gemm_i8_dot_impl.h); only with int8 B in panels and A not transposed.
  bool a_i8 = false;
};

// Every path (small-M streaming, packed blocked, any thread count) computes each C element as one
// FMA chain over k in ascending order, starting from the bias (or 0, or C). Results are therefore
// bit-identical across paths, batch sizes and thread counts.

// One AdamW update (see cpu/train_impl.h): bias_correction_i = 1 - beta_i^step; grad_scale is the
// gradient-clipping coefficient (1 when not clipping).
struct AdamWArgs {
  float lr = 0, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0;
  float grad_scale = 1, bias_correction1 = 1, bias_correction2 = 1;
};

// KV cache blocks hold kKvBlockSize consecutive positions of one sequence, for every head:
// keys transposed, [head][head_dim][kKvBlockSize] (a register of keys' scores per head_dim
// step), values as [head][kKvBlockSize][head_dim]; entries float32 or bfloat16 (kv_bf16), or
// int8 (kv_i8): then each of the two regions is followed by float32 scales [head][kKvBlockSize],
// and an entry is q * the scale of its head and position (see kv_block.h).
constexpr int kKvBlockSize = 16;
// Bytes of one layer's keys (or values) in a block: n_head * head_dim * 16 entries (+ int8 scales).
constexpr int64_t kv_region_bytes(int64_t entry_bytes, int64_t n_head, int64_t head_dim) {
  return n_head * head_dim * kKvBlockSize * entry_bytes + (entry_bytes == 1 ? n_head * kKvBlockSize * 4 : 0);
}

struct AttentionArgs {
  int n_head = 0, head_dim = 0;
  int64_t n_query = 0;      // query rows, at positions first_pos .. first_pos + n_query - 1
  int64_t first_pos = 0;
  const float* q = nullptr;  // q[t * q_stride + h * head_dim + d]
  int64_t q_stride = 0;
  float* out = nullptr;      // out[t * out_stride + h * head_dim + d]
  int64_t out_stride = 0;
  const void* const* k_blocks = nullptr;  // block b holds positions [b*16, b*16+16)
  const void* const* v_blocks = nullptr;
  bool kv_bf16 = false;                    // block entries are bfloat16 (else float32)
  bool kv_i8 = false;                      // block entries are int8 with scales (see kv_region_bytes)
  float scale = 1.0f;
  // Decode (n_query == 1) only: the new position's key and value rows (n_head * head_dim floats,
  // head-major). The kernel writes each head's into its block (position first_pos) just before
  // attending that head, in the thread that then reads it. Null: the caller wrote them already.
  const float* new_k = nullptr;
  const float* new_v = nullptr;
};

}  // namespace llamas
