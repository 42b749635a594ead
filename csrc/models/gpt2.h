#pragma once
// GPT-2, written once against ops: forward over a batch of sequence chunks that covers prefill,
// chunked prefill, batched decode (continuous batching) and full-logit forward in one code path.
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llamas/ops.h"
#include "llamas/tensor.h"
#include "runtime/kv_cache.h"
#include "runtime/sampler.h"

namespace llamas {

struct GPT2Config {
  int64_t vocab_size = 50257;
  int64_t n_positions = 1024;
  int64_t n_embd = 768;
  int64_t n_layer = 12;
  int64_t n_head = 12;
  int64_t n_inner = 0;  // 0: 4 * n_embd
  float layer_norm_epsilon = 1e-5f;
  // Hugging Face GPT2Config's attention scaling: scores times head_dim^-0.5 (unless
  // scale_attn_weights is false), divided by layer + 1 when scale_attn_by_inverse_layer_idx (as in
  // Stanford CRFM's GPT-2 checkpoints).
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
  int64_t ffn() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  float attn_scale(int64_t layer) const;
  void validate() const;
};

struct GPT2Layer {
  Tensor ln1_w, ln1_b, attn_w, attn_b, attn_proj_w, attn_proj_b;
  Tensor ln2_w, ln2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b;
  // Loaded models: the four matrices in the GEMM's panel layout, in the compute dtype. Then the
  // Tensors above are only the checkpoint's own (memory-mapped) arrays, for saving and training.
  ops::PackedMatrix attn_p, attn_proj_p, fc_p, mlp_proj_p;
  std::array<ops::PackedMatrix*, 4> panels() { return {&attn_p, &attn_proj_p, &fc_p, &mlp_proj_p}; }
  std::array<const ops::PackedMatrix*, 4> panels() const { return {&attn_p, &attn_proj_p, &fc_p, &mlp_proj_p}; }
};

struct GPT2Weights {
  Tensor wte, wpe, lnf_w, lnf_b;
  // Loaded models: the tied lm_head (wte, (V, C)) as panels. Streaming (V, C) directly needs
  // in-register transposes and capped the lm_head near 3.7 G elements/s on 2 Zen 3 cores; panels
  // stream like every other matrix, and replace wte as the copy the forward pass reads.
  ops::PackedMatrix lm_head_p;
  std::vector<GPT2Layer> layers;
  DType dtype = DType::F32;  // the compute dtype of the matrices (panels when packed)
  // Set when every float32 parameter is a view into this one buffer, in the trainer's layout
  // (gpt2_train.h: flat_parameter_layout), so a trainer adopts it without copying.
  Tensor flat;
  // Bytes a forward pass reads: the panels when packed, else the matrices as stored, plus norms,
  // biases and wpe (wte is read a row per token).
  size_t bytes() const;
  bool packed() const { return lm_head_p.defined(); }
  // Without the panels (training rewrites the stored matrices in place).
  GPT2Weights unpacked() const;
};

// Loads a Hugging Face GPT-2 safetensors file (names with or without "transformer.", Conv1D (in,
// out) layout, lm_head tied to wte). The stored tensors stay views of the mapping (float32 ones are
// cast only for dtype F32 from a bfloat16 file); the matrices and the lm_head are packed once into
// panels of `dtype`, then the mapping's pages are released, so the process holds one copy.
// `paths`: model.safetensors, or every shard of a sharded checkpoint (each tensor in one of them).
GPT2Weights load_gpt2_weights(const std::vector<std::string>& paths, const GPT2Config& config, DType dtype);

// The log-probability of a token the step was told comes next (a prompt's own next token), and the
// top alternatives at that position, under the model's raw distribution.
struct TokenScore {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;
};

// One sequence being generated: its KV cache, its tokens so far and its sampler.
struct Sequence {
  Sequence(const GPT2Config& config, const SamplingParams& params, uint64_t seed);
  KvCache cache;
  std::vector<int32_t> tokens;  // every token fed so far (prompt first)
  int64_t n_prompt = -1;        // set when the first sampled token is drawn
  Sampler sampler;
  // The scores of the last step that fed this sequence with targets (StepEntry::targets), one per
  // target >= 0, in position order.
  std::vector<TokenScore> scores;
  // What the last step that verified drafts for this sequence (StepEntry::verify_drafts) produced:
  // the drafts it accepted, then the token after them (Sampler::verify).
  std::vector<int32_t> verified;
  // Back to its first n tokens (cache and tokens): drops rejected drafts.
  void truncate(int64_t n);
};

// One entry of a batched step: feed `tokens` to `seq` (appending to its cache) and, if `sample`,
// draw the next token from the logits after the last of them.
// With `targets` (one per token, -1 for none), the step also scores targets[i] at the position after
// tokens[i] into seq->scores, keeping score_top alternatives: a prompt's log-probabilities (OpenAI's
// echo with logprobs). Those chunks compute the lm_head over every row, not only the last.
struct StepEntry {
  Sequence* seq = nullptr;
  std::vector<int32_t> tokens;
  bool sample = true;
  std::vector<int32_t> targets;
  int score_top = 0;
  // Speculative decoding: tokens[1..] are drafts. Every row's logits are computed and the sampler
  // verifies the drafts against them (Sampler::verify) into seq->verified; the step's token for
  // this entry is the last of those. The caller truncates the rejected drafts' positions.
  bool verify_drafts = false;
};

class GPT2Model {
 public:
  GPT2Model(const GPT2Config& config, GPT2Weights weights);
  const GPT2Config& config() const { return config_; }
  const GPT2Weights& weights() const { return weights_; }
  DType dtype() const { return weights_.dtype; }
  // Entry type of the KV caches this model fills (default: the weights' dtype, so a bfloat16 model
  // keeps a bfloat16 cache). A sequence's cache takes it when it starts; one already holding
  // entries of another dtype is refused.
  DType kv_dtype() const { return kv_dtype_; }
  void set_kv_dtype(DType dtype);
  // The dtype a GEMM's activations take (default float32): bfloat16 rounds them and sums k in
  // pairs as VDPBF16PS does (cpu/gemm_bf16_dot_impl.h), twice the multiply-adds per instruction
  // on CPUs with AVX512_BF16. Needs bfloat16 or int8 weights; the attention, norms and KV cache
  // stay as they are.
  DType compute_dtype() const { return compute_dtype_; }
  void set_compute_dtype(DType dtype);
  // Swaps in other weights for the same config (the trainer moves them into one flat buffer).
  // Not safe while another thread runs this model.
  void set_weights(GPT2Weights weights);

  // Logits for every position of a (B, T) batch: returns float32 (B, T, vocab).
  Tensor forward(const int32_t* ids, int64_t batch, int64_t T);
  // Runs one batched step; returns the sampled token per entry (-1 where sample is false).
  std::vector<int32_t> step(std::vector<StepEntry>& entries);

 private:
  struct Chunk {
    KvCache* cache;
    const int32_t* tokens;
    int64_t n;
    bool all_logits;
  };
  // The shared forward: appends each chunk to its cache and writes logits (all rows, or the last
  // row, per chunk, concatenated) into `logits`.
  void run_chunks(const std::vector<Chunk>& chunks, float* logits);
  // Sets PackedMatrix::streamed on every matrix: whether the weights outgrow the last-level cache.
  void mark_streamed();

  GPT2Config config_;
  GPT2Weights weights_;
  DType kv_dtype_;
  DType compute_dtype_ = DType::F32;
};

}  // namespace llamas
