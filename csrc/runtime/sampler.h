#pragma once
// Token sampling: penalties, temperature, top-k, min-p, top-p, then a draw from a seeded
// xoshiro256** stream owned by the sequence, so the same seed gives the same tokens whether the
// sequence runs alone or in a batch.
#include <cstdint>
#include <memory>
#include <utility>
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
  // OpenAI logit_bias: added to the logits before anything else (token id, bias in [-100, 100]).
  std::vector<std::pair<int32_t, float>> logit_bias;
  // vLLM's min_tokens: while fewer than min_tokens tokens have been generated, these tokens (the
  // end-of-text token and stop token ids) cannot be drawn (their logits become -inf, after the bias).
  int min_tokens = 0;
  std::vector<int32_t> min_tokens_banned;
  // -1: off; 0: the chosen token's log-probability; n > 0: also the n most likely (n <= 20).
  // Log-probabilities are of the model's distribution (raw logits, before bias and penalties).
  int logprobs = -1;

  // Throws llamas::Error naming the first bad field.
  void validate() const;
};

// log sum exp(logits[0..vocab)): log_softmax(z)_i = z_i - this. Throws when a logit is NaN or
// infinite (the message names the sampler's op, `op`).
double log_normaliser(const float* logits, int64_t vocab, const char* op);
// The n most likely tokens of logits as (token id, log-probability), highest first, ties to the
// lower id.
std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab, int n, double log_norm);

// A rule on which tokens may come next (structured output, e.g. JSON mode): it sets the logits
// of the tokens it forbids to -inf before each draw and is told each drawn token.
class TokenConstraint {
 public:
  virtual ~TokenConstraint() = default;
  virtual void mask(float* logits, int64_t vocab) const = 0;
  virtual void accept(int32_t token) = 0;
};

class Sampler {
 public:
  Sampler(const SamplingParams& params, uint64_t seed);
  const SamplingParams& params() const { return params_; }
  // Filled by sample() when params().logprobs >= 0.
  float last_logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> last_top_logprobs;
  // Applied after the bias and min_tokens, before penalties; log-probabilities stay the raw ones.
  std::unique_ptr<TokenConstraint> constraint;
  // Picks the next token from logits (modified in place). `context` is every token of the
  // sequence so far (prompt first), `n_prompt` how many of them are the prompt.
  int32_t sample(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt);
  // Speculative decoding: rows holds drafts.size() + 1 rows of logits, row r after the context
  // without its last drafts.size() - r tokens (`context` ends with the drafts). Returns the
  // accepted drafts and the token after them: the drafts up to the first that the position's own
  // draw (the argmax, or the one uniform sample() would take there) does not pick, then that
  // draw's token, or the token after the last draft: the same tokens as decoding one at a time.
  // Not for structured output, logprobs or min_tokens (refused). Rows are modified in place.
  std::vector<int32_t> verify(float* rows, int64_t vocab, const std::vector<int32_t>& drafts,
                              const std::vector<int32_t>& context, int64_t n_prompt);

 private:
  float next_uniform();
  int32_t draw(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt);
  int32_t choose(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt);
  SamplingParams params_;
  uint64_t state_[4];
};

}  // namespace llamas
