#pragma once
// Training for GPT-2, written against ops: a forward pass that keeps the activations the backward
// needs, the backward pass, and AdamW over one flat float32 parameter buffer.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "llamas/tensor.h"
#include "models/gpt2.h"

namespace llamas {

// Every parameter of a GPT-2 model, named as Hugging Face's GPT2LMHeadModel saves them
// ("transformer.h.0.attn.c_attn.weight"), in a fixed order. lm_head is tied to wte.
std::vector<std::pair<std::string, Tensor*>> named_parameters(GPT2Weights& w);

// Offsets (in floats) of every parameter of named_parameters() order inside one flat buffer, each
// starting on a 64-byte boundary; the last entry is the total size.
std::vector<int64_t> flat_parameter_layout(const GPT2Config& config);

// Fresh float32 weights with GPT-2's initialisation: normal(0, 0.02) matrices and embeddings,
// residual projections (c_proj) scaled by 1/sqrt(2 n_layer), zero biases, unit layernorm gains.
// Deterministic for a seed at any thread count. The weights live in one flat buffer (`flat`).
GPT2Weights init_gpt2_weights(const GPT2Config& config, uint64_t seed);

struct OptimizerConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;  // decoupled, on 2-D weights only (matrices and embeddings)
  float grad_clip = 1.0f;     // global L2 norm; 0 disables clipping
};

struct StepResult {
  double loss = 0;       // mean cross-entropy over every token of the step, before the update
  double grad_norm = 0;  // global L2 norm of the gradient, before clipping
};

class GPT2Trainer {
 public:
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0, numel = 0;  // in floats, within the flat buffers
    bool decay = false;
  };

  // Moves the model's (float32) weights into one flat buffer the optimizer updates in place; the
  // model keeps generating with the updated weights.
  GPT2Trainer(GPT2Model& model, const OptimizerConfig& options);

  // One optimizer step over a (B, T) batch split into micro-batches of `micro_batch` rows:
  // gradients accumulate over them, then clipping and AdamW at learning rate `lr`. Throws, naming
  // the step, without touching the weights when the loss or the gradient is not finite.
  StepResult step(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, int64_t micro_batch, float lr);
  // Targets of kIgnoreTarget (-100) are not learned from: the loss is the mean over the others.
  // Zeroes the gradients, then accumulates those of one batch (no update); returns its mean loss.
  double compute_gradients(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T);

  int64_t steps_done() const { return steps_done_; }
  void set_steps_done(int64_t n) { steps_done_ = n; }
  const OptimizerConfig& options() const { return options_; }
  const std::vector<Param>& params() const { return params_; }
  // The flat buffers ("param", "grad", "exp_avg", "exp_avg_sq"), all laid out as params().
  Tensor& buffer(const std::string& kind);

 private:
  // Forward, loss and backward of one micro-batch; gradients accumulate scaled by grad_scale (so
  // the loss they are the gradient of is grad_scale * sum of losses). Returns the sum of losses.
  // (Evaluation without gradients is GPT2Model's forward + ops::cross_entropy: no activations kept.)
  double run(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale);
  // Checks ids and shapes; returns how many targets are learned from (not kIgnoreTarget), > 0.
  int64_t check_batch(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, const char* op) const;

  GPT2Model& model_;
  OptimizerConfig options_;
  std::vector<Param> params_;
  Tensor flat_, grad_, exp_avg_, exp_avg_sq_;
  GPT2Weights grads_;  // views of grad_, laid out like the weights
  int64_t steps_done_ = 0;
};

}  // namespace llamas
