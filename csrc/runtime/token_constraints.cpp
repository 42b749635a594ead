#include "runtime/token_constraints.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace llamas {
namespace {

// A second-byte table is built when fewer first bytes than this may come (16 x 256 trials of one
// byte at most, ~0.1 ms).
constexpr size_t kSecondByteTable = 16;
// Cached token masks of a regex's states per sequence (GPT-2: 256 x ~6 KB).
constexpr size_t kRawMaskCache = 256;

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
      return byte == '"' || byte == '\\' || byte == '/' || byte == 'b' || byte == 'f' || byte == 'n' ||
             byte == 'r' || byte == 't';
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
  // A UTF-8 lead byte: how many continuation bytes follow, and the range of the first of them
  // (no overlong forms, no surrogates, nothing past U+10FFFF), so the text always decodes.
  if (byte >= 0xC2 && byte <= 0xDF) count_ = 1;
  else if (byte >= 0xE0 && byte <= 0xEF) count_ = 2;
  else if (byte >= 0xF0 && byte <= 0xF4) count_ = 3;
  else return false;
  utf8_lo_ = byte == 0xE0 ? 0xA0 : byte == 0xF0 ? 0x90 : 0x80;
  utf8_hi_ = byte == 0xED ? 0x9F : byte == 0xF4 ? 0x8F : 0xBF;
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

namespace {

// The mask both constraints share: end-of-text stays only if eos_ok; any other token needs bytes
// whose first byte is in first_ok and that fits(token, bytes); ids past the table are refused.
template <typename Fits>
void mask_tokens(const TokenBytes& table, float* logits, int64_t vocab, bool eos_ok, const bool (&first_ok)[256],
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
const std::string* drawn_bytes(const TokenBytes& table, int32_t token) {
  if (token < 0 || size_t(token) >= table.bytes.size() || token == table.eos) return nullptr;
  return &table.bytes[size_t(token)];
}

}  // namespace

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

void SchemaConstraint::mask_raw(const SchemaFrame& f, float* logits, int64_t vocab) const {
  // (b holds the DFA state and the open UTF-8 character in bits 0-36 and 40-63; aux, at most 3,
  // how many continuation bytes it still needs.)
  const uint64_t key = f.b | uint64_t(f.aux) << 37;
  auto it = raw_masks_.find(key);
  if (it == raw_masks_.end()) {
    if (raw_masks_.size() >= kRawMaskCache) raw_masks_.clear();  // ~6 KB each over GPT-2's vocabulary
    bool first_ok[256];
    for (int c = 0; c < 256; ++c) first_ok[c] = state_.raw_accepts(f, std::string(1, char(c)));
    std::vector<bool> allowed(vocab_->bytes.size());
    for (size_t t = 0; t < allowed.size(); ++t) {
      const std::string& b = vocab_->bytes[t];
      allowed[t] = int32_t(t) != vocab_->eos && !b.empty() && first_ok[uint8_t(b[0])] && state_.raw_accepts(f, b);
    }
    it = raw_masks_.emplace(key, std::move(allowed)).first;
  }
  const std::vector<bool>& allowed = it->second;
  bool every_byte[256];
  std::fill(every_byte, every_byte + 256, true);
  mask_tokens(*vocab_, logits, vocab, state_.raw_complete(f), every_byte,
              [&](int64_t t, const std::string&) { return bool(allowed[size_t(t)]); });
}

void SchemaConstraint::mask(float* logits, int64_t vocab) const {
  if (const SchemaFrame* f = state_.raw_frame()) return mask_raw(*f, logits, vocab);
  if (!state_.grammar()) return mask_uncached(logits, vocab);
  // A grammar comes back to the same readings over and over (every character of a string or a
  // number leaves the stacks as they were): keep the mask of each set of readings met.
  const std::vector<SchemaThread>& now = state_.readings();
  uint64_t key = 1469598103934665603ull;  // FNV-1a over the readings
  for (const SchemaThread& t : now) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(t.frames);
    for (size_t i = 0; i < t.depth * sizeof(SchemaFrame); ++i) key = (key ^ p[i]) * 1099511628211ull;
    key = (key ^ (t.depth | t.ws_run << 8)) * 1099511628211ull;
  }
  auto it = grammar_masks_.find(key);
  bool hit = it != grammar_masks_.end() && it->second.first.size() == now.size();
  for (size_t i = 0; hit && i < now.size(); ++i) hit = it->second.first[i].same(now[i]);
  if (!hit) {
    if (grammar_masks_.size() >= kRawMaskCache) grammar_masks_.clear();
    std::vector<float> trial(static_cast<size_t>(vocab), 0.0f);
    mask_uncached(trial.data(), vocab);
    std::vector<bool> allowed(static_cast<size_t>(vocab));
    for (int64_t t = 0; t < vocab; ++t) allowed[size_t(t)] = trial[size_t(t)] == 0.0f;
    it = grammar_masks_.insert_or_assign(key, std::make_pair(now, std::move(allowed))).first;
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
