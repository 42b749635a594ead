#pragma once
// Constraints on the next token, for structured output (the sampler's TokenConstraint).
// JSON mode (OpenAI's response_format {"type": "json_object"}): generated text is held to one JSON
// object (RFC 8259, UTF-8) byte by byte. Before each draw every token whose bytes would break the
// grammar gets logit -inf; end-of-text is allowed only once the object is closed, and nothing else
// then. Whitespace between tokens of the grammar is limited to kMaxWhitespace bytes in a row: room
// for a newline and indentation 11 levels of 2 spaces deep, while a model that only pads is made to
// write something else.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/json_schema.h"
#include "runtime/sampler.h"

namespace llamas {

// Each token's bytes as the tokenizer decodes them (byte-level BPE), empty for special tokens.
struct TokenBytes {
  TokenBytes(std::vector<std::string> token_bytes, int32_t eos_token);
  std::vector<std::string> bytes;
  int32_t eos = -1;  // end-of-text, or -1
  // Tokens of printable ASCII other than '"' and '\\': inside a string they are always allowed and
  // leave it a string, so the mask skips feeding them (most of a text vocabulary).
  std::vector<uint8_t> plain;
};

// The recogniser's state: a small value type, copied to try each token.
class JsonState {
 public:
  static constexpr int kMaxDepth = 32;
  static constexpr int kMaxWhitespace = 24;
  // Consumes one byte; false if no JSON object can continue with it (the state is then
  // unspecified: try bytes on a copy).
  bool feed(uint8_t byte);
  bool feed(const std::string& bytes);
  // The top-level object is closed.
  bool complete() const { return mode_ == Mode::kDone; }
  // Inside a string, between characters (not in an escape or a UTF-8 sequence).
  bool in_string() const { return mode_ == Mode::kString; }

 private:
  enum class Mode : uint8_t {
    kStart, kValue, kArrayFirst, kObjectFirst, kObjectKey, kColon, kAfterValue, kString, kEscape, kHex,
    kUtf8, kNumber, kLiteral, kDone
  };
  enum class Num : uint8_t { kMinus, kZero, kInt, kDot, kFrac, kExp, kExpSign, kExpDigits };
  bool whitespace(uint8_t byte);
  bool value(uint8_t byte);
  bool after_value(uint8_t byte);
  bool close(uint8_t byte);
  bool string_byte(uint8_t byte);
  bool number_byte(uint8_t byte);

  Mode mode_ = Mode::kStart;
  Num num_ = Num::kInt;
  bool key_ = false;          // the string being read is an object key
  uint8_t count_ = 0;         // hex digits or UTF-8 continuation bytes still expected
  uint8_t utf8_lo_ = 0x80, utf8_hi_ = 0xBF;  // range of the next UTF-8 continuation byte
  uint8_t literal_ = 0, literal_pos_ = 0;    // which of true/false/null, and how far
  uint8_t ws_run_ = 0;
  uint8_t depth_ = 0;
  char stack_[kMaxDepth] = {};
};

// The constraint a sequence's sampler applies in JSON mode.
class JsonConstraint : public TokenConstraint {
 public:
  explicit JsonConstraint(std::shared_ptr<const TokenBytes> vocab) : vocab_(std::move(vocab)) {}
  void mask(float* logits, int64_t vocab) const override;
  void accept(int32_t token) override;

 private:
  std::shared_ptr<const TokenBytes> vocab_;
  JsonState state_;
};

// vLLM's guided_choice: the output is exactly one of `choices` (their UTF-8 bytes). A token may come
// next if the bytes so far plus its own are the start of some choice; end-of-text once they are one.
class ChoiceConstraint : public TokenConstraint {
 public:
  ChoiceConstraint(std::shared_ptr<const TokenBytes> vocab, std::vector<std::string> choices)
      : vocab_(std::move(vocab)), choices_(std::move(choices)) {}
  void mask(float* logits, int64_t vocab) const override;
  void accept(int32_t token) override;

 private:
  std::shared_ptr<const TokenBytes> vocab_;
  std::vector<std::string> choices_;
  std::string so_far_;
};

// Structured output against a compiled JSON Schema, regex or grammar (json_schema.h): the same
// mask, with that recogniser in place of JSON mode's.
class SchemaConstraint : public TokenConstraint {
 public:
  SchemaConstraint(std::shared_ptr<const TokenBytes> vocab, std::shared_ptr<const JsonSchema> schema)
      : vocab_(std::move(vocab)), state_(std::move(schema)) {}
  void mask(float* logits, int64_t vocab) const override;
  void accept(int32_t token) override;

 private:
  void mask_raw(const SchemaFrame& f, float* logits, int64_t vocab) const;
  void mask_uncached(float* logits, int64_t vocab) const;

  std::shared_ptr<const TokenBytes> vocab_;
  SchemaState state_;
  // Regexes and grammars: the tokens allowed after each set of readings met (for a regex, its
  // frame: the DFA state and any unfinished UTF-8 character), keyed by their hash, checked whole.
  mutable std::unordered_map<uint64_t, std::pair<std::vector<SchemaThread>, std::vector<bool>>> masks_;
};

namespace constraint_detail {

// The mask every constraint shares: end-of-text stays only if eos_ok; any other token needs bytes
// whose first byte is in first_ok and that fits(token, bytes); ids past the table are refused.
template <typename Fits>
inline void mask_tokens(const TokenBytes& table, float* logits, int64_t vocab, bool eos_ok, const bool (&first_ok)[256],
                 Fits fits) {
  const int64_t n = std::min<int64_t>(vocab, int64_t(table.bytes.size()));
  for (int64_t t = 0; t < n; ++t) {
    if (t == table.eos) {
      if (!eos_ok) logits[t] = -INFINITY;
      continue;
    }
    const std::string& b = table.bytes[size_t(t)];
    if (b.empty() || !first_ok[uint8_t(b[0])] || !fits(t, b)) logits[t] = -INFINITY;
  }
  for (int64_t t = n; t < vocab; ++t) logits[t] = -INFINITY;  // ids the tokenizer does not know
}

// The bytes of a drawn token (end-of-text and ids past the table add none).
inline const std::string* drawn_bytes(const TokenBytes& table, int32_t token) {
  if (token < 0 || size_t(token) >= table.bytes.size() || token == table.eos) return nullptr;
  return &table.bytes[size_t(token)];
}

}  // namespace constraint_detail
}  // namespace llamas
