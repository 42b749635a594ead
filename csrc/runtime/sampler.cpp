#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "llamas/error.h"
#include "llamas/ops.h"

namespace llamas {

void SamplingParams::validate() const {
  const char* op = "sampling";
  LLAMAS_CHECK(std::isfinite(temperature) && temperature >= 0.0f && temperature <= 100.0f, op,
               "temperature must be a finite number in [0, 100], got ", temperature);
  LLAMAS_CHECK(top_k >= 0, op, "top_k must be >= 0, got ", top_k);
  LLAMAS_CHECK(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f, op, "top_p must be in (0, 1], got ", top_p);
  LLAMAS_CHECK(std::isfinite(min_p) && min_p >= 0.0f && min_p <= 1.0f, op, "min_p must be in [0, 1], got ", min_p);
  LLAMAS_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f && repetition_penalty <= 100.0f, op,
               "repetition_penalty must be in (0, 100], got ", repetition_penalty);
  LLAMAS_CHECK(std::isfinite(presence_penalty) && std::fabs(presence_penalty) <= 2.0f, op,
               "presence_penalty must be in [-2, 2], got ", presence_penalty);
  LLAMAS_CHECK(std::isfinite(frequency_penalty) && std::fabs(frequency_penalty) <= 2.0f, op,
               "frequency_penalty must be in [-2, 2], got ", frequency_penalty);
  LLAMAS_CHECK(logprobs >= -1 && logprobs <= 20, op, "logprobs must be in [0, 20], got ", logprobs);
  LLAMAS_CHECK(min_tokens >= 0, op, "min_tokens must be >= 0, got ", min_tokens);
  for (int32_t token : min_tokens_banned)
    LLAMAS_CHECK(token >= 0, op, "a token held back until min_tokens must be an id >= 0, got ", token);
  for (auto& [token, bias] : logit_bias)
    LLAMAS_CHECK(token >= 0 && std::isfinite(bias) && std::fabs(bias) <= 100.0f, op, "logit_bias entry ", token,
                 ": ", bias, " must be a token id >= 0 with a bias in [-100, 100]");
}

static uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

Sampler::Sampler(const SamplingParams& params, uint64_t seed) : params_(params) {
  params_.validate();
  for (auto& s : state_) s = splitmix64(seed);
}

float Sampler::next_uniform() {
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  uint64_t result = rotl(state_[1] * 5, 7) * 9;
  uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return float(result >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1)
}

namespace {
constexpr const char* kNotFinite =
    "the model's logits are not finite (NaN or infinity), so no token can be chosen; its weights (or the "
    "activations they produce) hold NaN or infinity";

// Sum (in double) and largest of p[0..n): four running sums, so the adds are not one 4-cycle
// latency chain per candidate (4096 candidates: ~1.5 us instead of ~5). Its own function: inlined
// into choose(), GCC kept a running sum in a stack slot, a store-to-load round trip per candidate.
__attribute__((noinline)) double sum_and_max(const float* p, int64_t n, double* max_out) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  float t0 = 0.0f, t1 = 0.0f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
    t0 = std::max(t0, std::max(p[i], p[i + 1]));
    t1 = std::max(t1, std::max(p[i + 2], p[i + 3]));
  }
  for (; i < n; ++i) s0 += p[i], t0 = std::max(t0, p[i]);
  *max_out = std::max(t0, t1);
  return (s0 + s1) + (s2 + s3);
}

// Token order by logit, highest first, ties to the lower id (top-k and the logprobs' top-n).
struct ByLogit {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); }
};

// 0, 1, ..., n - 1: token ids to select or order candidates by.
std::vector<int32_t> iota_ids(int64_t n) {
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

// The k best tokens by ByLogit (0 < k <= vocab), in that order. One pass keeps the best so far
// in order and skips any run of 16 logits none of which beats the k-th: past the first few hundred
// tokens nearly every run is skipped on one well-predicted branch. std::nth_element over the ids
// (its partition branches on every comparison, and each step's logits are new) took ~12 us of
// a 4096-token draw inside a 16-sequence step, ~12% of the bundled model's step. Runs that hold
// NaN are not skipped, so *nan reports one anywhere.
std::vector<int32_t> top_k_ids(const float* logits, int64_t vocab, int64_t k, bool* nan) {
  if (k > 256 || k >= vocab) {  // (insertion into the kept list would cost ~k/2 moves per newcomer)
    for (int64_t i = 0; i < vocab; ++i) *nan |= logits[i] != logits[i];
    if (*nan) return {};  // (NaN breaks the ordering nth_element relies on)
    std::vector<int32_t> ids = iota_ids(vocab);
    if (k < vocab) std::nth_element(ids.begin(), ids.begin() + k, ids.end(), ByLogit{logits});
    ids.resize(k);
    std::sort(ids.begin(), ids.end(), ByLogit{logits});
    return ids;
  }
  std::vector<float> best(k);  // kept logits, descending; ids beside them, lower first on ties
  std::vector<int32_t> ids(k);
  int64_t kept = 0;
  float floor = -INFINITY;  // the k-th logit once k are kept; below it nothing enters
  auto consider = [&](int64_t i) {
    const float x = logits[i];
    if (x != x) {
      *nan = true;
      return;
    }
    if (kept == k && !(x > floor)) return;  // a tie with the k-th loses: its id is higher
    int64_t at = kept < k ? kept++ : k - 1;
    for (; at > 0 && best[at - 1] < x; --at) best[at] = best[at - 1], ids[at] = ids[at - 1];
    best[at] = x, ids[at] = int32_t(i);
    if (kept == k) floor = best[k - 1];
  };
  constexpr int64_t kRun = 16;
  int64_t i = 0;
  for (; i < k && i < vocab; ++i) consider(i);
  for (; i + kRun <= vocab; i += kRun) {
    bool any = false;
    for (int64_t j = 0; j < kRun; ++j) any |= !(logits[i + j] <= floor);  // (NaN compares false: taken)
    if (any)
      for (int64_t j = 0; j < kRun; ++j) consider(i + j);
  }
  for (; i < vocab; ++i) consider(i);
  return ids;
}

// Largest of x[0..n) (n > 0), eight running maxima.
float max_of(const float* x, int64_t n) {
  float m[8];
  for (int j = 0; j < 8; ++j) m[j] = x[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float top = m[0];
  for (int j = 1; j < 8; ++j) top = m[j] > top ? m[j] : top;
  return top;
}

// The first position i of weights w(0..n) at which the running total passes u (the inverse CDF),
// or n - 1. Whole blocks of 64 are skipped on their sums first: a draw reads ~n/2 weights, and
// one add per weight in a single chain was ~2/3 of a 4096-token draw's scan.
template <typename Weight>
int64_t inverse_cdf(double u, int64_t n, Weight w) {
  constexpr int64_t kBlock = 64;
  double acc = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    double b0 = 0.0, b1 = 0.0;
    for (int64_t j = i; j < i + kBlock; j += 2) b0 += w(j), b1 += w(j + 1);
    if (u < acc + (b0 + b1)) break;
    acc += b0 + b1;
  }
  for (; i < n; ++i) {
    acc += w(i);
    if (u < acc) return i;
  }
  // u fell past the sum (rounding): the last candidate with any weight, never a zero-weight one
  // (a token held back by min_tokens has weight 0, and GPT-2's end-of-text is the last id).
  for (i = n - 1; i > 0 && !(w(i) > 0.0); --i) {
  }
  return i;
}
}  // namespace

double log_normaliser(const float* logits, int64_t vocab, const char* op) {
  // log_softmax(z)_i = z_i - log sum exp(z) (the vectorised kernel: max subtracted, sums in double).
  const double log_norm = ops::log_sum_exp_row(logits, vocab);
  LLAMAS_CHECK(std::isfinite(log_norm), op, kNotFinite);  // before any sorting: NaN has no order
  return log_norm;
}

std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab, int n, double log_norm) {
  std::vector<std::pair<int32_t, float>> top;
  const int n_top = int(std::min<int64_t>(n, vocab));
  if (n_top <= 0) return top;
  bool nan = false;  // (the caller's normaliser already refused NaN)
  const std::vector<int32_t> ids = top_k_ids(logits, vocab, n_top, &nan);
  for (int i = 0; i < n_top; ++i) top.push_back({ids[i], float(double(logits[ids[i]]) - log_norm)});
  return top;
}

int32_t Sampler::sample(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt) {
  const int32_t chosen = draw(logits, vocab, context, n_prompt);
  if (constraint) constraint->accept(chosen);
  return chosen;
}

int32_t Sampler::draw(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt) {
  if (params_.logprobs < 0) return choose(logits, vocab, context, n_prompt);
  // Log-probabilities of the raw distribution, before choose() biases and penalises the logits.
  const double log_norm = log_normaliser(logits, vocab, "sample");
  last_top_logprobs = top_logprobs(logits, vocab, params_.logprobs, log_norm);
  std::vector<float> raw(logits, logits + vocab);
  int32_t chosen = choose(logits, vocab, context, n_prompt);
  last_logprob = float(double(raw[chosen]) - log_norm);
  return chosen;
}

int32_t Sampler::choose(float* logits, int64_t vocab, const std::vector<int32_t>& context, int64_t n_prompt) {
  const SamplingParams& p = params_;
  for (auto& [token, bias] : p.logit_bias)
    if (token >= 0 && token < vocab) logits[token] += bias;
  // context holds the prompt and every token generated and fed so far.
  if (p.min_tokens > 0 && int64_t(context.size()) - n_prompt < p.min_tokens)
    for (int32_t token : p.min_tokens_banned)
      if (token >= 0 && token < vocab) logits[token] = -INFINITY;
  if (constraint) constraint->mask(logits, vocab);
  if (p.repetition_penalty != 1.0f) {
    std::vector<int32_t> seen(context);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= vocab) continue;
      float& l = logits[t];
      l = l < 0 ? l * p.repetition_penalty : l / p.repetition_penalty;
    }
  }
  if (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int> counts;
    for (size_t i = size_t(n_prompt); i < context.size(); ++i) counts[context[i]]++;
    for (auto& kv : counts)
      if (kv.first >= 0 && kv.first < vocab)
        logits[kv.first] -= p.presence_penalty + p.frequency_penalty * float(kv.second);
  }
  // A temperature so small that 1/T overflows (subnormal T) is greedy too: the softmax of logits/T
  // is then all its mass on the maximum.
  if (p.temperature == 0.0f || p.top_k == 1 || !std::isfinite(1.0f / p.temperature)) {
    int64_t best = 0;
    bool nan = logits[0] != logits[0];
    for (int64_t i = 1; i < vocab; ++i) {
      if (logits[i] > logits[best]) best = i;
      nan |= logits[i] != logits[i];
    }
    LLAMAS_CHECK(!nan, "sample", kNotFinite);
    return int32_t(best);
  }
  // Candidates: every token (ids empty: candidate i is token i), or with top_k the k best by logit
  // in that order (descending, lower id first on ties), so a seed draws the same token on every
  // platform (nth_element's order was the standard library's own).
  std::vector<int32_t> ids;
  int64_t n = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    bool nan = false;
    ids = top_k_ids(logits, vocab, p.top_k, &nan);
    LLAMAS_CHECK(!nan, "sample", kNotFinite);
    n = p.top_k;
  }
  auto token_of = [&](int64_t i) { return ids.empty() ? int32_t(i) : ids[i]; };
  // Candidate weights p_i = softmax(logit_i / T) through the vectorised kernel (16 sequences x
  // 4096 scalar exps were ~10% of a batched step of the bundled model), in place; totals are
  // summed in double. The max comes off before the 1/T scaling, so a tiny temperature (1/T up to
  // ~1e38) gives -inf or 0, never inf - inf.
  std::vector<float> probs(n);
  const float inv_t = 1.0f / p.temperature;
  if (ids.empty()) {
    const float max_logit = max_of(logits, n);
    for (int64_t i = 0; i < n; ++i) probs[i] = (logits[i] - max_logit) * inv_t;
  } else {
    const float max_logit = logits[ids[0]];  // (top_k_ids: best first)
    for (int64_t i = 0; i < n; ++i) probs[i] = (logits[ids[i]] - max_logit) * inv_t;
  }
  ops::softmax_rows(probs.data(), probs.data(), 1, n);
  double p_max = 0.0;
  double total = sum_and_max(probs.data(), n, &p_max);
  // NaN logits, or +inf ones (inf - inf), make every weight NaN: nothing could be drawn.
  LLAMAS_CHECK(std::isfinite(total) && total > 0.0, "sample", kNotFinite);
  // min-p: keep tokens with p >= min_p * p_max.
  if (p.min_p > 0.0f) {
    if (ids.empty()) ids = iota_ids(vocab);
    int64_t kept = 0;
    total = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (probs[i] >= double(p.min_p) * p_max) {
        ids[kept] = ids[i];
        probs[kept] = probs[i];
        total += probs[kept++];
      }
    n = kept;
  }
  if (p.top_p >= 1.0f) {
    const double u = double(next_uniform()) * total;
    return token_of(inverse_cdf(u, n, [&](int64_t i) { return double(probs[i]); }));
  }
  // top-p: the nucleus is the fewest best candidates (probability descending, the lower token
  // first on ties) whose mass reaches top_p of the total. The weights are non-negative floats,
  // whose bit patterns order as their values do, so a histogram of their top bits (exponent and 3
  // mantissa bits: 2,048 buckets, mass in double) finds the bucket the cut falls in, and only that
  // bucket's candidates are sorted. Sorting candidates until the nucleus was covered took ~1.7 ms
  // a draw over GPT-2's 50,257 logits when the distribution is flat (the nucleus is then most of
  // the vocabulary). The draw walks the nucleus in candidate order (token order, or best first
  // after top-k).
  const double target = double(p.top_p) * total;
  constexpr int kBucketShift = 20;
  auto bucket_of = [&](int64_t i) {
    uint32_t bits;
    std::memcpy(&bits, &probs[i], sizeof bits);
    return int(bits >> kBucketShift);
  };
  std::vector<double> bucket_mass(size_t(1) << (31 - kBucketShift), 0.0);
  for (int64_t i = 0; i < n; ++i) bucket_mass[bucket_of(i)] += probs[i];
  int edge_bucket = int(bucket_mass.size()) - 1;
  double mass = 0.0;  // of the buckets above edge_bucket: all in the nucleus
  for (; edge_bucket > 0 && mass + bucket_mass[edge_bucket] < target; --edge_bucket) mass += bucket_mass[edge_bucket];
  std::vector<int32_t> nucleus, edge;
  for (int64_t i = 0; i < n; ++i) {
    const int b = bucket_of(i);
    if (b > edge_bucket) nucleus.push_back(int32_t(i));
    else if (b == edge_bucket && probs[i] > 0.0f) edge.push_back(int32_t(i));
  }
  std::sort(edge.begin(), edge.end(), [&](int32_t a, int32_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && token_of(a) < token_of(b));
  });
  size_t take = 0;
  while (take < edge.size() && mass < target) mass += probs[edge[take++]];
  edge.resize(take);
  std::sort(edge.begin(), edge.end());
  const size_t above = nucleus.size();
  nucleus.insert(nucleus.end(), edge.begin(), edge.end());
  std::inplace_merge(nucleus.begin(), nucleus.begin() + int64_t(above), nucleus.end());
  total = 0.0;
  for (int32_t i : nucleus) total += probs[i];
  const double u = double(next_uniform()) * total;
  return token_of(nucleus[inverse_cdf(u, int64_t(nucleus.size()), [&](int64_t i) { return double(probs[nucleus[i]]); })]);
}

std::vector<int32_t> Sampler::verify(float* rows, int64_t vocab, const std::vector<int32_t>& drafts,
                                     const std::vector<int32_t>& context, int64_t n_prompt) {
  LLAMAS_CHECK(constraint == nullptr && params_.logprobs < 0 && params_.min_tokens == 0, "sample",
               "speculative drafts cannot be verified for a sequence with structured output, logprobs or "
               "min_tokens");
  LLAMAS_CHECK(context.size() >= drafts.size(), "sample", "the context must end with the drafts");
  // Each position draws its token exactly as decoding one token at a time would (choose(): the
  // same candidates, the same single uniform from the stream), and the drafts stand until the
  // first one that draw does not pick. A draft is then kept with its probability under the
  // request's distribution, and a rejected position's token comes from the rest of it: speculative
  // sampling (Leviathan et al.) with a point-mass draft, coupled to plain sampling's draw. Every
  // generated token takes one uniform, as without drafts, so the output is the same tokens as
  // decoding without speculation, for a seed or greedy alike, however many drafts a step verifies.
  std::vector<int32_t> out;
  std::vector<int32_t> ctx(context.begin(), context.end() - int64_t(drafts.size()));
  for (size_t r = 0; r < drafts.size(); ++r) {
    const int32_t token = choose(rows + int64_t(r) * vocab, vocab, ctx, n_prompt);
    out.push_back(token);
    if (token != drafts[r]) return out;
    ctx.push_back(token);
  }
  out.push_back(sample(rows + int64_t(drafts.size()) * vocab, vocab, context, n_prompt));
  return out;
}

}  // namespace llamas
