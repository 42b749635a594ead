#include "runtime/token_constraints.h"

#include <algorithm>
#include <cmath>

#include "runtime/json_text.h"

namespace llamas {

using namespace constraint_detail;

namespace {

constexpr const char* kLiterals[] = {"true", "false", "null"};

bool is_digit(uint8_t b) { return b >= '0' && b <= '9'; }
bool is_hex(uint8_t b) { return is_digit(b) || (b >= 'a' && b <= 'f') || (b >= 'A' && b <= 'F'); }

}  // namespace

bool JsonState::feed(const std::string& bytes) {
  for (char c : bytes)
    if (!feed(static_cast<uint8_t>(c))) return false;
  return true;
}

bool JsonState::whitespace(uint8_t byte) {
  if (byte != ' ' && byte != '\n' && byte != '\t' && byte != '\r') return false;
  return ++ws_run_ <= kMaxWhitespace;
}

// A value starts (after '[', ',' in an array, ':' or at the top).
bool JsonState::value(uint8_t byte) {
  switch (byte) {
    case '{':
    case '[':
      if (depth_ == kMaxDepth) return false;
      stack_[depth_++] = char(byte);
      mode_ = byte == '{' ? Mode::kObjectFirst : Mode::kArrayFirst;
      return true;
    case '"':
      mode_ = Mode::kString, key_ = false;
      return true;
    case '-':
      mode_ = Mode::kNumber, num_ = Num::kMinus;
      return true;
    case 't':
    case 'f':
    case 'n':
      mode_ = Mode::kLiteral, literal_ = byte == 't' ? 0 : byte == 'f' ? 1 : 2, literal_pos_ = 1;
      return true;
    default:
      if (!is_digit(byte)) return false;
      mode_ = Mode::kNumber, num_ = byte == '0' ? Num::kZero : Num::kInt;
      return true;
  }
}

// '}' or ']' closing the innermost container.
bool JsonState::close(uint8_t byte) {
  if (depth_ == 0 || stack_[depth_ - 1] != (byte == '}' ? '{' : '[')) return false;
  --depth_;
  mode_ = depth_ == 0 ? Mode::kDone : Mode::kAfterValue;
  return true;
}

bool JsonState::after_value(uint8_t byte) {
  if (byte == ',') {
    mode_ = stack_[depth_ - 1] == '{' ? Mode::kObjectKey : Mode::kValue;
    return true;
  }
  return (byte == '}' || byte == ']') && close(byte);
}

bool JsonState::string_byte(uint8_t byte) {
  switch (mode_) {
    case Mode::kEscape:
      if (byte == 'u') {
        mode_ = Mode::kHex, count_ = 4;
        return true;
      }
      mode_ = Mode::kString;
      return json_escape(byte) >= 0;
    case Mode::kHex:
      if (!is_hex(byte)) return false;
      if (--count_ == 0) mode_ = Mode::kString;
      return true;
    case Mode::kUtf8:
      if (byte < utf8_lo_ || byte > utf8_hi_) return false;
      utf8_lo_ = 0x80, utf8_hi_ = 0xBF;
      if (--count_ == 0) mode_ = Mode::kString;
      return true;
    default:
      break;
  }
  if (byte == '"') {
    mode_ = key_ ? Mode::kColon : Mode::kAfterValue;
    return true;
  }
  if (byte == '\\') {
    mode_ = Mode::kEscape;
    return true;
  }
  if (byte < 0x20) return false;  // control characters must be escaped
  if (byte < 0x80) return true;
  if (!utf8_lead(byte, &count_, &utf8_lo_, &utf8_hi_)) return false;
  mode_ = Mode::kUtf8;
  return true;
}

// One more byte of a number, or false when the number cannot take it.
bool JsonState::number_byte(uint8_t byte) {
  const bool digit = is_digit(byte);
  switch (num_) {
    case Num::kMinus:
      if (!digit) return false;
      num_ = byte == '0' ? Num::kZero : Num::kInt;
      return true;
    case Num::kZero:
    case Num::kInt:
      if (digit && num_ == Num::kInt) return true;
      if (byte == '.') return num_ = Num::kDot, true;
      if (byte == 'e' || byte == 'E') return num_ = Num::kExp, true;
      return false;
    case Num::kDot:
      return digit && (num_ = Num::kFrac, true);
    case Num::kFrac:
      if (digit) return true;
      if (byte == 'e' || byte == 'E') return num_ = Num::kExp, true;
      return false;
    case Num::kExp:
      if (byte == '+' || byte == '-') return num_ = Num::kExpSign, true;
      return digit && (num_ = Num::kExpDigits, true);
    case Num::kExpSign:
      return digit && (num_ = Num::kExpDigits, true);
    case Num::kExpDigits:
      return digit;
  }
  return false;
}

bool JsonState::feed(uint8_t byte) {
  switch (mode_) {
    case Mode::kString:
    case Mode::kEscape:
    case Mode::kHex:
    case Mode::kUtf8:
      return string_byte(byte);
    case Mode::kLiteral: {
      const char* word = kLiterals[literal_];
      if (byte != uint8_t(word[literal_pos_])) return false;
      if (word[++literal_pos_] == '\0') mode_ = Mode::kAfterValue, ws_run_ = 0;
      return true;
    }
    case Mode::kNumber:
      if (number_byte(byte)) return true;
      // The number ends here if it is whole; the byte then belongs to what follows it.
      if (num_ != Num::kZero && num_ != Num::kInt && num_ != Num::kFrac && num_ != Num::kExpDigits) return false;
      mode_ = Mode::kAfterValue, ws_run_ = 0;
      return feed(byte);
    case Mode::kDone:
      return false;
    default:
      break;
  }
  if (whitespace(byte)) return true;
  if (ws_run_ > kMaxWhitespace) return false;
  ws_run_ = 0;
  switch (mode_) {
    case Mode::kStart:
      return byte == '{' && value(byte);  // the top level is an object
    case Mode::kValue:
      return value(byte);
    case Mode::kArrayFirst:
      return byte == ']' ? close(byte) : value(byte);
    case Mode::kObjectFirst:
      if (byte == '}') return close(byte);
      [[fallthrough]];
    case Mode::kObjectKey:
      if (byte != '"') return false;
      mode_ = Mode::kString, key_ = true;
      return true;
    case Mode::kColon:
      return byte == ':' && (mode_ = Mode::kValue, true);
    case Mode::kAfterValue:
      return after_value(byte);
    default:
      return false;
  }
}

TokenBytes::TokenBytes(std::vector<std::string> token_bytes, int32_t eos_token)
    : bytes(std::move(token_bytes)), eos(eos_token), plain(bytes.size(), 0) {
  for (size_t t = 0; t < bytes.size(); ++t) {
    bool ok = !bytes[t].empty();
    for (char c : bytes[t]) ok &= c >= 0x20 && c <= 0x7E && c != '"' && c != '\\';
    plain[t] = ok;
  }
}

void JsonConstraint::mask(float* logits, int64_t vocab) const {
  const bool done = state_.complete();
  // GPT-2 124M, 50,257 tokens: feeding every token took 2.2-2.4 ms a step (10% of a decode step).
  // Two shortcuts: inside a string plain ASCII tokens are allowed as they are, and a token whose
  // first byte the state refuses is refused without feeding the rest (256 trials decide which).
  const bool in_string = state_.in_string();
  bool first_ok[256];
  for (int b = 0; b < 256; ++b) {
    JsonState trial = state_;
    first_ok[b] = !done && trial.feed(uint8_t(b));
  }
  mask_tokens(*vocab_, logits, vocab, done, first_ok, [&](int64_t t, const std::string& b) {
    if (in_string && vocab_->plain[size_t(t)]) return true;
    JsonState trial = state_;
    return trial.feed(b);
  });
}

void JsonConstraint::accept(int32_t token) {
  if (const std::string* b = drawn_bytes(*vocab_, token)) state_.feed(*b);
}

void ChoiceConstraint::mask(float* logits, int64_t vocab) const {
  // The choices the bytes so far start, once per step; each token is then matched against their rest.
  const size_t at = so_far_.size();
  std::vector<const std::string*> open;
  bool first_ok[256] = {};  // bytes some choice continues with
  bool complete = false;
  for (const std::string& c : choices_) {
    if (c.size() < at || c.compare(0, at, so_far_) != 0) continue;
    if (c.size() == at) {
      complete = true;
    } else {
      first_ok[uint8_t(c[at])] = true;
      open.push_back(&c);
    }
  }
  mask_tokens(*vocab_, logits, vocab, complete, first_ok, [&](int64_t, const std::string& b) {
    for (const std::string* c : open)
      if (c->size() >= at + b.size() && c->compare(at, b.size(), b) == 0) return true;
    return false;
  });
}

void ChoiceConstraint::accept(int32_t token) {
  if (const std::string* b = drawn_bytes(*vocab_, token)) so_far_ += *b;
}

}  // namespace llamas
