// Structured output against a compiled schema, regex or grammar (SchemaConstraint in
// token_constraints.h): which tokens the recogniser lets come next, with the shortcuts that make
// a step's mask cheap over a vocabulary of 50,000 tokens.
#include <algorithm>
#include <array>
#include <cmath>

#include "runtime/token_constraints.h"

namespace llamas {

using namespace constraint_detail;

namespace {
// A second-byte table is built when fewer first bytes than this may come (16 x 256 trials of one
// byte at most, ~0.1 ms).
constexpr size_t kSecondByteTable = 16;
// Masks kept per sequence, of a regex's states or a grammar's sets of readings (GPT-2: ~6 KB each).
constexpr size_t kMaskCache = 256;
}  // namespace

void SchemaConstraint::mask_raw(const SchemaFrame& f, float* logits, int64_t vocab) const {
  // A regex root's one frame walks each token's bytes itself: no readings to copy.
  bool first_ok[256];
  for (int c = 0; c < 256; ++c) first_ok[c] = state_.raw_accepts(f, std::string(1, char(c)));
  mask_tokens(*vocab_, logits, vocab, state_.raw_complete(f), first_ok,
              [&](int64_t, const std::string& bytes) { return state_.raw_accepts(f, bytes); });
}

void SchemaConstraint::mask(float* logits, int64_t vocab) const {
  const SchemaFrame* raw = state_.raw_frame();
  if (!raw && !state_.grammar()) return mask_uncached(logits, vocab);
  // A regex (guided_regex) or a grammar comes back to the same readings over and over: a regex
  // to its DFA's few states (a word-character loop is one state), a grammar's stacks every
  // character of a string or a number. Keep the mask of each set of readings met.
  const std::vector<SchemaThread>& now = state_.readings();
  uint64_t key = 1469598103934665603ull;  // FNV-1a over the readings
  for (const SchemaThread& t : now) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(t.frames);
    for (size_t i = 0; i < t.depth * sizeof(SchemaFrame); ++i) key = (key ^ p[i]) * 1099511628211ull;
    key = (key ^ (t.depth | t.ws_run << 8)) * 1099511628211ull;
  }
  auto it = masks_.find(key);
  bool hit = it != masks_.end() && it->second.first.size() == now.size();
  for (size_t i = 0; hit && i < now.size(); ++i) hit = it->second.first[i].same(now[i]);
  if (!hit) {
    if (masks_.size() >= kMaskCache) masks_.clear();
    std::vector<float> trial(static_cast<size_t>(vocab), 0.0f);
    if (raw) mask_raw(*raw, trial.data(), vocab);
    else mask_uncached(trial.data(), vocab);
    std::vector<bool> allowed(static_cast<size_t>(vocab));
    for (int64_t t = 0; t < vocab; ++t) allowed[size_t(t)] = trial[size_t(t)] == 0.0f;
    it = masks_.insert_or_assign(key, std::make_pair(now, std::move(allowed))).first;
  }
  const std::vector<bool>& allowed = it->second.second;
  for (int64_t t = 0; t < vocab; ++t)
    if (!allowed[size_t(t)]) logits[t] = -INFINITY;
}

void SchemaConstraint::mask_uncached(float* logits, int64_t vocab) const {
  // JSON mode's two shortcuts (a first-byte table; plain ASCII tokens that fit in the string being
  // written pass untried), and one more: where few first bytes may come (between values: a space,
  // a newline, a quote), a table of the second bytes each allows. GPT-2's 50,257 tokens include
  // ~25,000 that start with a space; after '{' nearly all of them fail at their second byte, and
  // trying each from the start took ~1.2 ms a step.
  std::vector<SchemaThread> a, b;
  a.reserve(SchemaState::kMaxThreads * 2), b.reserve(SchemaState::kMaxThreads * 2);
  const std::vector<SchemaThread>& now = state_.readings();
  const bool done = state_.complete();
  const int64_t room = state_.plain_string_room();
  bool first_ok[256];
  // Bytes after which the readings are the ones there were (a character of a string or of a
  // number in a grammar): a token of only such bytes is allowed untried. GPT-2 124M inside a
  // string of a JSON grammar: a step's mask 80 ms -> 0.7 ms. (A JSON Schema's strings count their
  // characters, so its readings never repeat; it has its own shortcut for them.)
  const bool grammar = state_.grammar();
  bool loops[256];
  auto same_set = [](const std::vector<SchemaThread>& x, const std::vector<SchemaThread>& y) {
    if (x.size() != y.size()) return false;
    for (const SchemaThread& t : x) {
      bool found = false;
      for (const SchemaThread& u : y) found = found || t.same(u);
      if (!found) return false;
    }
    return true;
  };
  std::vector<std::vector<SchemaThread>> after;  // the readings after each allowed first byte
  uint8_t slot[256];
  for (int c = 0; c < 256; ++c) {
    first_ok[c] = state_.advance(now, uint8_t(c), a);
    loops[c] = grammar && first_ok[c] && same_set(a, now);
    if (first_ok[c] && after.size() < kSecondByteTable) slot[c] = uint8_t(after.size()), after.push_back(a);
    else slot[c] = 0xFF;
  }
  const bool few = after.size() < kSecondByteTable;
  std::vector<std::array<bool, 256>> second(few ? after.size() : 0);
  for (size_t i = 0; i < second.size(); ++i)
    for (int c = 0; c < 256; ++c) second[i][size_t(c)] = state_.advance(after[i], uint8_t(c), a);
  bool any = done;
  for (bool ok : first_ok) any |= ok;
  // Never reached (every accepted prefix can be completed); were it, end-of-text beats a draw
  // from nothing.
  mask_tokens(*vocab_, logits, vocab, done || !any, first_ok, [&](int64_t t, const std::string& bytes) {
    if (vocab_->plain[size_t(t)] && int64_t(bytes.size()) <= room) return true;
    if (grammar) {
      bool looped = true;
      for (char c : bytes) looped = looped && loops[uint8_t(c)];
      if (looped) return true;
    }
    const uint8_t s = slot[uint8_t(bytes[0])];
    if (!few || s == 0xFF) return state_.accepts(now, bytes.data(), bytes.data() + bytes.size(), a, b);
    if (bytes.size() > 1 && !second[s][uint8_t(bytes[1])]) return false;
    return state_.accepts(after[s], bytes.data() + 1, bytes.data() + bytes.size(), a, b);
  });
}

void SchemaConstraint::accept(int32_t token) {
  if (const std::string* b = drawn_bytes(*vocab_, token)) state_.feed(*b);
}

}  // namespace llamas
