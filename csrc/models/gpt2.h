#pragma once
// GPT-2, written once against ops: forward over a batch of sequence chunks that covers prefill,
// chunked prefill, batched decode (continuous batching) and full-logit forward in one code path.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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
  int64_t ffn() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  void validate() const;
};

struct GPT2Layer {
  Tensor ln1_w, ln1_b, attn_w, attn_b, attn_proj_w, attn_proj_b;
  Tensor ln2_w, ln2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b;
};

struct GPT2Weights {
  Tensor wte, wpe, lnf_w, lnf_b;
  // bfloat16 only: wte transposed to (C, V) for the lm_head. The (V, C) layout needs in-register
  // transposes that cap it near 3.7 G elements/s on 2 Zen 3 cores whatever the dtype, so bfloat16
  // gained nothing there; (C, V) streams at the memory bound. Costs V*C*2 bytes (77 MB for 124M).
  Tensor lm_head_kn;
  std::vector<GPT2Layer> layers;
  // Set when every float32 parameter is a view into this one buffer, in the trainer's layout
  // (gpt2_train.h: flat_parameter_layout), so a trainer adopts it without copying.
  Tensor flat;
  size_t bytes() const;
};

// Loads a Hugging Face GPT-2 safetensors file (names with or without "transformer.", Conv1D (in,
// out) layout, lm_head tied to wte). dtype F32 keeps float32 tensors as views of the mapping;
// dtype BF16 converts the matrices to bfloat16 once (norms, biases and wpe stay float32).
GPT2Weights load_gpt2_weights(const std::string& path, const GPT2Config& config, DType dtype);

// One sequence being generated: its KV cache, its tokens so far and its sampler.
struct Sequence {
  Sequence(const GPT2Config& config, const SamplingParams& params, uint64_t seed);
  KvCache cache;
  std::vector<int32_t> tokens;  // every token fed so far (prompt first)
  int64_t n_prompt = -1;        // set when the first sampled token is drawn
  Sampler sampler;
};

// One entry of a batched step: feed `tokens` to `seq` (appending to its cache) and, if `sample`,
// draw the next token from the logits after the last of them.
struct StepEntry {
  Sequence* seq = nullptr;
  std::vector<int32_t> tokens;
  bool sample = true;
};

class GPT2Model {
 public:
  GPT2Model(const GPT2Config& config, GPT2Weights weights);
  const GPT2Config& config() const { return config_; }
  const GPT2Weights& weights() const { return weights_; }
  DType dtype() const { return weights_.wte.dtype(); }
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

  GPT2Config config_;
  GPT2Weights weights_;
};

}  // namespace llamas
