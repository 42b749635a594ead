#pragma once
// Token sampling: penalties, temperature, top-k, min-p, top-p, then a draw from a seeded
// xoshiro256** stream owned by the sequence, so the same seed gives the same tokens whether the
// sequence runs alone or in a batch.
#include <cstdint>
#include <vector>

namespace llamas {

struct SamplingParams {
  float temperature = 0.0f;      // 0: greedy (argmax, lowest id on ties)
  int top_k = 0;                 // 0: off
  float top_p = 1.0f;            // 1: off
  float min_p = 0.0f;            // 0: off; drops tokens with p < min_p * p_max
  float repetition_penalty = 1.0f;   // HF/CTRL style, over prompt and generated tokens
  float presence_penalty = 0.0f;     // OpenAI style, over generated tokens
  float frequency_penalty = 0.0f;

  // Throws llamas::Error naming the first bad field.
  void validate() const;
};

class Sampler {
 public:
  Sampler(const SamplingParams& params, uint64_t seed);
  const SamplingParams& params() const { return params_; }
  // Picks the next token from logits (modified in place). `context` is every token of the
  // sequence so far (prompt first), `n_prompt` how many of them are the prompt.
  int32_t sample(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt);

 private:
  float next_uniform();
  SamplingParams params_;
  uint64_t state_[4];
};

}  // namespace llamas
