// Characters in structured output: JSON string content (escapes, UTF-8, length, pattern) and raw
// text matching a regex. Part of the recogniser in json_schema.cpp.
#include <algorithm>

#include "runtime/json_schema_internal.h"
#include "runtime/json_text.h"

namespace llamas {

int32_t SchemaDfa::step(int32_t state, uint32_t cp) const {
  const Edge* begin = edges.data() + first[size_t(state)];
  const Edge* end = edges.data() + first[size_t(state) + 1];
  const Edge* e = std::upper_bound(begin, end, cp, [](uint32_t c, const Edge& x) { return c < x.lo; });
  if (e == begin || cp > (e - 1)->hi) return -1;
  return (e - 1)->next;
}

namespace schema_detail {
namespace {

using Kind = SchemaNode::Kind;

constexpr uint64_t kRangeMask = 0xFFFF, kCodePointShift = 16, kCodePointMask = 0x1FFFFF;

uint32_t code_point(const SchemaFrame& f) { return uint32_t((f.b >> kCodePointShift) & kCodePointMask); }
void set_code_point(SchemaFrame& f, uint32_t cp) {
  f.b = (f.b & ~(kCodePointMask << kCodePointShift)) | uint64_t(cp) << kCodePointShift;
}

// A whole character was read: a node with a pattern moves its DFA on, and must still be able to
// reach a match within maxLength (f.a counts this character already).
bool take_char(const JsonSchema& s, const SchemaNode& n, SchemaFrame& f, uint32_t cp) {
  if (n.dfa < 0) return true;
  const SchemaDfa& d = s.dfas[size_t(n.dfa)];
  const int32_t next = d.step(int32_t(dfa_state(f)), cp);
  if (next < 0) return false;
  if (n.kind == Kind::kString && int64_t(f.a) + d.dist[size_t(next)] > n.max_count) return false;
  f.b = with_dfa_state(f.b, uint32_t(next));
  return true;
}

// Inside a UTF-8 sequence: can some character it may still become move a pattern's DFA on (and
// leave a match in reach within maxLength)? Without this a lead byte could be taken that no
// character the pattern allows starts with: a dead end.
bool sequence_feasible(const JsonSchema& s, const SchemaNode& n, const SchemaFrame& f) {
  if (n.dfa < 0) return true;
  static const uint32_t kSmallest[] = {0, 0x80, 0x800, 0x10000};  // by continuation bytes in all
  const uint32_t shift = 6 * f.aux, cp = code_point(f);
  uint32_t lo = cp << shift, hi = std::min<uint32_t>(((cp + 1) << shift) - 1, 0x10FFFF);
  lo = std::max(lo, kSmallest[f.aux]);  // binds at the lead byte (overlong forms); later the bits so far exceed it
  const SchemaDfa& d = s.dfas[size_t(n.dfa)];
  const uint32_t state = dfa_state(f);
  for (uint32_t e = d.first[state]; e < d.first[state + 1]; ++e) {
    const SchemaDfa::Edge& x = d.edges[e];
    if (x.hi < lo || x.lo > hi) continue;
    if (n.kind != Kind::kString || int64_t(f.a) + d.dist[size_t(x.next)] <= n.max_count) return true;
  }
  return false;
}

// A UTF-8 lead byte (json_text.h): the continuation count in aux, the next byte's range and the
// character's first bits in b.
bool start_utf8(SchemaFrame& f, uint8_t byte) {
  uint8_t lo, hi;
  if (!utf8_lead(byte, &f.aux, &lo, &hi)) return false;
  f.b = (f.b & ~kRangeMask) | uint64_t(lo) | uint64_t(hi) << 8;
  set_code_point(f, byte & (0x7F >> (f.aux + 1)));
  return true;
}

// A continuation byte; true with *done set once the character is whole.
bool utf8_continue(SchemaFrame& f, uint8_t byte, bool* done) {
  if (byte < (f.b & 0xFF) || byte > ((f.b >> 8) & 0xFF)) return false;
  f.b = (f.b & ~kRangeMask) | 0x80 | 0xBF << 8;
  set_code_point(f, code_point(f) << 6 | (byte & 0x3F));
  *done = --f.aux == 0;
  return true;
}

// A backslash was read: can a pattern take one of the characters an escape writes? (JSON's
// one-letter escapes; \u is not written: a lone surrogate would not decode.)
bool escape_feasible(const JsonSchema& s, const SchemaNode& n, const SchemaFrame& f) {
  if (n.dfa < 0) return true;
  for (uint32_t cp : kJsonEscaped) {
    SchemaFrame trial = f;
    if (take_char(s, n, trial, cp)) return true;
  }
  return false;
}

bool at_match(const JsonSchema& s, const SchemaNode& n, const SchemaFrame& f) {
  return n.dfa < 0 || s.dfas[size_t(n.dfa)].accepting[dfa_state(f)];
}

}  // namespace

TextStep string_byte(const JsonSchema& s, const SchemaNode& n, SchemaFrame& f, uint8_t byte) {
  auto result = [](bool ok) { return ok ? TextStep::kTaken : TextStep::kReject; };
  switch (f.mode) {
    case kEscape: {
      const int32_t cp = json_escape(byte);
      if (cp < 0) return TextStep::kReject;
      f.mode = kChars;
      return result(take_char(s, n, f, uint32_t(cp)));
    }
    case kUtf8: {
      bool done = false;
      if (!utf8_continue(f, byte, &done)) return TextStep::kReject;
      if (!done) return result(sequence_feasible(s, n, f));
      f.mode = kChars;
      return result(take_char(s, n, f, code_point(f)));
    }
    default:
      break;
  }
  if (byte == '"') return int64_t(f.a) >= n.min_count && at_match(s, n, f) ? TextStep::kClosed : TextStep::kReject;
  if (byte < 0x20 || int64_t(f.a) >= n.max_count) return TextStep::kReject;  // control characters are escaped
  ++f.a;
  if (byte == '\\') return f.mode = kEscape, result(escape_feasible(s, n, f));
  if (byte < 0x80) return result(take_char(s, n, f, byte));
  if (!start_utf8(f, byte)) return TextStep::kReject;
  f.mode = kUtf8;
  return result(sequence_feasible(s, n, f));
}

bool raw_byte(const JsonSchema& s, const SchemaNode& n, SchemaFrame& f, uint8_t byte) {
  if (f.aux > 0) {
    bool done = false;
    if (!utf8_continue(f, byte, &done)) return false;
    return done ? take_char(s, n, f, code_point(f)) : sequence_feasible(s, n, f);
  }
  if (byte < 0x80) return take_char(s, n, f, byte);
  return start_utf8(f, byte) && sequence_feasible(s, n, f);
}

bool raw_complete(const JsonSchema& s, const SchemaNode& n, const SchemaFrame& f) {
  return f.aux == 0 && at_match(s, n, f);
}

}  // namespace schema_detail
}  // namespace llamas
