#include "runtime/json_schema.h"

#include <algorithm>
#include <cstring>

#include "llamas/error.h"
#include "runtime/json_schema_internal.h"

namespace llamas {
namespace {

using Kind = SchemaNode::Kind;
using namespace schema_detail;

bool is_digit(uint8_t b) { return b >= '0' && b <= '9'; }
bool is_space(uint8_t b) { return b == ' ' || b == '\n' || b == '\t' || b == '\r'; }

// Properties that may come next in an object with `count` written so far: from `next` up to and
// including the first required one (required properties are never skipped; the order is the
// schema's), leaving out optional ones whose values need more than `room` levels of nesting, and
// any after which too few properties are left for minProperties (n.min_count) or the required
// ones would pass maxProperties (n.max_count).
uint64_t key_candidates(const JsonSchema& s, const SchemaNode& n, uint32_t next, uint32_t count, int room) {
  const size_t total = n.literals.size();
  if (int64_t(count) >= n.max_count) return 0;
  int64_t required_after = 0;  // (only maxProperties needs it)
  if (n.max_count != INT64_MAX)
    for (size_t i = next; i < total; ++i) required_after += n.required[i];
  uint64_t mask = 0;
  for (size_t i = next; i < total; ++i) {
    required_after -= n.required[i];
    const bool fits = n.required[i] || s.nodes[size_t(n.children[i])].min_depth <= room;
    const bool under_max = n.required[i] || int64_t(count) + 1 + required_after <= n.max_count;
    const bool enough_left = int64_t(count) + 1 + int64_t(total - i - 1) >= n.min_count;
    if (fits && under_max && enough_left) mask |= uint64_t(1) << i;
    if (n.required[i]) break;
  }
  return mask;
}

bool may_close_object(const SchemaNode& n, uint32_t next, uint32_t count) {
  for (size_t i = next; i < n.required.size(); ++i)
    if (n.required[i]) return false;
  return int64_t(count) >= n.min_count;
}

// Sub-range of the sorted enum literals [lo, hi) (which agree on their first pos bytes) whose byte
// at pos is `byte`.
std::pair<uint32_t, uint32_t> narrow(const std::vector<std::string>& lits, uint32_t lo, uint32_t hi, size_t pos,
                                     uint8_t byte) {
  auto at = [&](uint32_t i) { return lits[i].size() > pos ? int(uint8_t(lits[i][pos])) : -1; };
  uint32_t first = lo, last = hi;
  while (first < last) {  // first index whose byte >= byte
    uint32_t mid = (first + last) / 2;
    if (at(mid) < int(byte)) first = mid + 1;
    else last = mid;
  }
  uint32_t end = first;
  while (end < hi && at(end) == int(byte)) ++end;
  return {first, end};
}

}  // namespace

bool SchemaThread::same(const SchemaThread& o) const {
  return depth == o.depth && ws_run == o.ws_run && std::memcmp(frames, o.frames, depth * sizeof(SchemaFrame)) == 0;
}

SchemaState::SchemaState(std::shared_ptr<const JsonSchema> schema) : schema_(std::move(schema)) {
  schema_->validate();
  if (schema_->nodes[size_t(schema_->root)].kind == Kind::kRule) {
    start_grammar();
    return;
  }
  SchemaThread t;
  push(t, schema_->root);
  if (schema_->nodes[size_t(schema_->root)].kind == Kind::kRegex) t.frames[0].mode = kRaw;  // no quotes, no spaces
  threads_.push_back(t);
}

bool SchemaState::fits(const SchemaThread& t, int32_t node) const {
  return t.depth + schema_->nodes[size_t(node)].min_depth <= SchemaThread::kMaxDepth;
}

bool SchemaState::push(SchemaThread& t, int32_t node) const {
  if (!fits(t, node)) return false;
  t.frames[t.depth++] = SchemaFrame{uint16_t(node), kStart, 0, 0, 0};
  return true;
}

bool SchemaState::end_value(SchemaThread& t) const {
  --t.depth;
  return true;
}

bool SchemaState::can_end_frame(const SchemaFrame& f) const {
  const SchemaNode& n = schema_->nodes[f.node];
  if (f.mode == kNumber) return accepting(f.aux & 0x7F) && number_in_bounds(n, f);
  if (f.mode == kLiteral) return n.literals[f.a & 0xFFFF].size() == f.b;
  if (f.mode == kRaw) return schema_detail::raw_complete(*schema_, n, f);
  return false;
}

// The first byte of the top frame's value (not whitespace).
bool SchemaState::start_value(SchemaThread& t, uint8_t byte, std::vector<SchemaThread>& out) const {
  SchemaFrame& f = t.frames[t.depth - 1];
  const SchemaNode& n = schema_->nodes[f.node];
  switch (n.kind) {
    case Kind::kAnyOf:
      // Every alternative that takes this byte becomes a reading of its own.
      for (int32_t alt : n.children) {
        if (t.depth - 1 + schema_->nodes[size_t(alt)].min_depth > SchemaThread::kMaxDepth) continue;
        SchemaThread fork = t;
        fork.frames[fork.depth - 1].node = uint16_t(alt);
        if (start_value(fork, byte, out)) out.push_back(fork);
      }
      return false;
    case Kind::kEnum: {
      auto [lo, hi] = narrow(n.literals, 0, uint32_t(n.literals.size()), 0, byte);
      if (lo == hi) return false;
      f.mode = kLiteral, f.a = lo | (hi << 16), f.b = 1;
      return true;
    }
    case Kind::kString:
      if (byte != '"') return false;
      f.mode = kChars, f.a = 0;
      return true;
    case Kind::kInteger:
    case Kind::kNumber:
      if (byte == '-') f.aux = kMinus | kNegative;
      else if (byte == '0') f.aux = kZero;
      else if (is_digit(byte)) f.aux = kInt;
      else return false;
      f.mode = kNumber, f.a = byte == '-' ? 0 : 1, f.b = byte == '-' ? 0 : uint64_t(byte - '0');
      return number_feasible(n, f);
    case Kind::kObject:
      if (byte != '{') return false;
      f.mode = kObjOpen, f.a = 0;
      return true;
    case Kind::kMap:
      if (byte != '{') return false;
      f.mode = kMapOpen;
      return true;
    case Kind::kArray:
      if (byte != '[') return false;
      f.mode = kArrOpen, f.a = 0;
      return true;
    case Kind::kRegex:  // the root, read in kRaw from the start
    case Kind::kRule:   // grammars are read in kGram frames
    case Kind::kSequence:
    case Kind::kCharSet:
      return false;
  }
  return false;
}

bool SchemaState::step_frame(SchemaThread& t, uint8_t byte, std::vector<SchemaThread>& out) const {
  if (t.depth == 0) return false;  // nothing follows the value
  SchemaFrame& f = t.frames[t.depth - 1];
  const SchemaNode& n = schema_->nodes[f.node];
  switch (f.mode) {
    case kChars:
    case kEscape:
    case kUtf8: {
      const TextStep r = string_byte(*schema_, n, f, byte);
      return r == TextStep::kClosed ? end_value(t) : r == TextStep::kTaken;
    }
    case kRaw:
      return raw_byte(*schema_, n, f, byte);
    case kGram:
      return grammar_byte(t, byte, out);
    case kNumber: {
      const uint8_t phase = f.aux & 0x7F, sign = f.aux & kNegative;
      const bool integer = n.kind == Kind::kInteger, bounded = n.has_lo || n.has_hi;
      uint8_t next = 0xFF;  // the phase this byte leads to, or none: the number ends before it
      if (is_digit(byte)) {
        if (phase == kMinus) next = byte == '0' ? (integer ? 0xFF : kZero) : kInt;  // "-0": not an integer
        else if (phase == kInt || phase == kFrac || phase == kExpDigits) next = phase;
        else if (phase == kDot) next = kFrac;
        else if (phase == kExp || phase == kExpSign) next = kExpDigits;
      } else if (byte == '.' && !integer && (phase == kZero || phase == kInt)) {
        next = kDot;
      } else if ((byte == 'e' || byte == 'E') && !integer && !bounded &&
                 (phase == kZero || phase == kInt || phase == kFrac)) {
        next = kExp;
      } else if ((byte == '+' || byte == '-') && phase == kExp) {
        next = kExpSign;
      }
      if (next == 0xFF) {
        if (!can_end_frame(f)) return false;
        end_value(t);
        return step_frame(t, byte, out);  // the byte belongs to what follows the number
      }
      if (is_digit(byte) && (integer || bounded)) {
        if (digit_count(f) == kMaxDigits) return false;
        f.b = f.b * 10 + uint64_t(byte - '0');
        f.a += next == kFrac ? 0x101 : 1;
      }
      f.aux = next | sign;
      return number_feasible(n, f);
    }
    case kLiteral: {
      const uint32_t lo = f.a & 0xFFFF, hi = f.a >> 16;
      auto [nlo, nhi] = narrow(n.literals, lo, hi, size_t(f.b), byte);
      if (nlo < nhi) {
        f.a = nlo | (nhi << 16), ++f.b;
        return true;
      }
      if (!can_end_frame(f)) return false;
      end_value(t);
      return step_frame(t, byte, out);
    }
    case kObjKey: {
      // f.a: bytes of the name so far; f.b: the properties whose names start with them. A quote
      // inside a name is escaped, so a quote here ends a name exactly when one is this long.
      uint64_t left = 0;
      for (uint64_t m = f.b; m; m &= m - 1) {
        const int i = __builtin_ctzll(m);
        const std::string& name = n.literals[size_t(i)];
        if (byte == '"' && name.size() == f.a) {
          f.mode = kObjColon, f.a = uint32_t(i + 1), f.b = 0, ++f.aux;  // aux: properties written
          return true;
        }
        if (name.size() > f.a && uint8_t(name[f.a]) == byte) left |= uint64_t(1) << i;
      }
      ++f.a, f.b = left;
      return left != 0;
    }
    default:
      break;
  }
  // Structural modes (and kStart) take whitespace.
  if (is_space(byte)) {
    if (schema_->compact) return false;
    // Whitespace as llama.cpp's schema grammars allow it: one space, or a newline and at most
    // kMaxIndent spaces or tabs. A model that only pads is made to write something else.
    if (t.ws_run == 0 && (byte == ' ' || byte == '\n')) return t.ws_run = byte == ' ' ? 1 : 2, true;
    return t.ws_run >= 2 && t.ws_run < 2 + kMaxIndent && (byte == ' ' || byte == '\t') && (++t.ws_run, true);
  }
  t.ws_run = 0;
  switch (f.mode) {
    case kStart:
      return start_value(t, byte, out);
    case kObjOpen:
      if (byte == '}') return may_close_object(n, f.a, f.aux) && end_value(t);
      [[fallthrough]];
    case kObjNext:
      if (byte != '"') return false;
      f.b = key_candidates(*schema_, n, f.a, f.aux, SchemaThread::kMaxDepth - t.depth);
      f.mode = kObjKey, f.a = 0;
      return f.b != 0;
    case kObjColon:
      if (byte != ':') return false;
      f.mode = kObjAfter;
      return push(t, n.children[f.a - 1]);
    case kObjAfter:
      if (byte == '}') return may_close_object(n, f.a, f.aux) && end_value(t);
      if (byte != ',' || key_candidates(*schema_, n, f.a, f.aux, SchemaThread::kMaxDepth - t.depth) == 0)
        return false;
      return f.mode = kObjNext, true;
    case kMapOpen:
      if (byte == '}') return n.min_count == 0 && end_value(t);
      [[fallthrough]];
    case kMapNext:  // the key, then a value that fits; aux: keys written
      if (byte != '"' || !fits(t, n.children[0]) || int64_t(f.aux) >= n.max_count) return false;
      f.mode = kMapColon, f.aux += f.aux < 255;  // (Python refuses minProperties past 255)
      if (!push(t, n.children[1])) return false;
      t.frames[t.depth - 1].mode = kChars;  // the key's opening quote is this byte
      return true;
    case kMapColon:
      if (byte != ':') return false;
      f.mode = kMapAfter;
      return push(t, n.children[0]);
    case kMapAfter:
      if (byte == '}') return int64_t(f.aux) >= n.min_count && end_value(t);
      return byte == ',' && int64_t(f.aux) < n.max_count && (f.mode = kMapNext, true);
    case kArrOpen:
      if (byte == ']') return n.min_count == 0 && end_value(t);
      [[fallthrough]];
    case kArrNext:
      if (int64_t(f.a) >= n.max_count) return false;
      ++f.a, f.mode = kArrAfter;
      return push(t, n.children[0]) && start_value(t, byte, out);
    case kArrAfter:
      if (byte == ']') return int64_t(f.a) >= n.min_count && end_value(t);
      return byte == ',' && int64_t(f.a) < n.max_count && fits(t, n.children[0]) && (f.mode = kArrNext, true);
    default:
      return false;
  }
}

void SchemaState::step(const SchemaThread& t, uint8_t byte, std::vector<SchemaThread>& out) const {
  SchemaThread next = t;
  if (step_frame(next, byte, out)) out.push_back(next);
}

void SchemaState::keep_distinct(std::vector<SchemaThread>& readings) {
  // Readings that became the same are one; past kMaxThreads the rest are dropped (each kept one
  // is still a valid way on).
  size_t kept = 0;
  for (size_t i = 0; i < readings.size() && kept < size_t(kMaxThreads); ++i) {
    bool dup = false;
    for (size_t j = 0; j < kept && !dup; ++j) dup = readings[j].same(readings[i]);
    if (!dup) {
      if (kept != i) readings[kept] = readings[i];
      ++kept;
    }
  }
  readings.resize(kept);
}

bool SchemaState::advance(const std::vector<SchemaThread>& from, uint8_t byte, std::vector<SchemaThread>& to) const {
  to.clear();
  for (const SchemaThread& t : from) step(t, byte, to);
  keep_distinct(to);
  return !to.empty();
}

bool SchemaState::accepts(const std::vector<SchemaThread>& from, const char* begin, const char* end,
                          std::vector<SchemaThread>& a, std::vector<SchemaThread>& b) const {
  a = from;
  for (const char* c = begin; c != end; ++c) {
    if (!advance(a, uint8_t(*c), b)) return false;
    a.swap(b);
  }
  return true;
}

bool SchemaState::feed(const std::string& bytes) {
  std::vector<SchemaThread> a, b;
  if (!accepts(threads_, bytes.data(), bytes.data() + bytes.size(), a, b)) return false;
  threads_.swap(a);
  return true;
}

bool SchemaState::feed(uint8_t byte) { return feed(std::string(1, char(byte))); }

bool SchemaState::complete() const {
  for (const SchemaThread& t : threads_)
    if (t.depth == 0 || (t.depth == 1 && can_end_frame(t.frames[0]))) return true;
  return false;
}

const SchemaFrame* SchemaState::raw_frame() const {
  if (threads_.size() != 1 || threads_[0].depth != 1 || threads_[0].frames[0].mode != kRaw) return nullptr;
  return &threads_[0].frames[0];
}

bool SchemaState::raw_accepts(const SchemaFrame& f, const std::string& bytes) const {
  SchemaFrame trial = f;
  const SchemaNode& n = schema_->nodes[f.node];
  for (char c : bytes)
    if (!raw_byte(*schema_, n, trial, uint8_t(c))) return false;
  return true;
}

bool SchemaState::raw_complete(const SchemaFrame& f) const {
  return schema_detail::raw_complete(*schema_, schema_->nodes[f.node], f);
}

int64_t SchemaState::plain_string_room() const {
  int64_t room = 0;
  for (const SchemaThread& t : threads_) {
    if (t.depth == 0 || t.frames[t.depth - 1].mode != kChars) continue;
    const SchemaFrame& f = t.frames[t.depth - 1];
    if (schema_->nodes[f.node].dfa >= 0) continue;  // a pattern decides what plain text fits
    room = std::max(room, schema_->nodes[f.node].max_count - int64_t(f.a));
  }
  return room;
}

}  // namespace llamas
