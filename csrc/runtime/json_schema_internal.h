#pragma once
// The parts of the structured-output recogniser (json_schema.cpp) that live in their own files:
// frame modes, numbers (json_schema_numbers.cpp) and characters (json_schema_text.cpp).
#include <cstdint>

#include "runtime/json_schema.h"

namespace llamas {
namespace schema_detail {

// Frame modes. kStart: before the value's first byte. The rest name what the frame waits for.
enum Mode : uint8_t {
  kStart,
  kChars, kEscape, kUtf8,                              // string
  kNumber,                                             // integer, number (phase in aux)
  kLiteral,                                            // enum
  kObjOpen, kObjKey, kObjColon, kObjAfter, kObjNext,   // object: after '{', in a key, ...
  kMapOpen, kMapColon, kMapAfter, kMapNext,            // map (free keys)
  kArrOpen, kArrAfter, kArrNext,                       // array
  kRaw,                                                // text matching a regex (the whole output)
  kGram,                                               // a grammar rule's alternative (a: its next element)
};

// A number's phase (aux & 0x7F); aux & 0x80 is its minus sign.
enum Phase : uint8_t { kMinus, kZero, kInt, kDot, kFrac, kExp, kExpSign, kExpDigits };
inline constexpr uint8_t kNegative = 0x80;
inline constexpr uint32_t kMaxDigits = 18;  // 10^18 - 1 < 2^63: a bounded number's digits always fit

inline bool accepting(uint8_t phase) {
  return phase == kZero || phase == kInt || phase == kFrac || phase == kExpDigits;
}

// A number frame's digits: f.b holds them all as one integer (the mantissa), f.a the count in its
// low byte and how many of them follow the point in the next. Only bounded numbers and integers
// keep them (at most kMaxDigits); a number without bounds never needs its value.
inline uint32_t digit_count(const SchemaFrame& f) { return f.a & 0xFF; }
inline uint32_t fraction_digits(const SchemaFrame& f) { return f.a >> 8; }

// The number the frame's digits spell lies inside the node's bounds (exactly).
bool number_in_bounds(const SchemaNode& n, const SchemaFrame& f);
// Can a number that starts with the frame's bytes still end inside the node's bounds (exactly)?
bool number_feasible(const SchemaNode& n, const SchemaFrame& f);

// ---- characters -------------------------------------------------------------------------------
// A string frame's b: bits 0-15 the range of the next UTF-8 continuation byte (lo, hi), 16-36 the
// code point so far, 40-63 the state of the node's DFA (pattern); aux: continuation bytes due.
inline uint32_t dfa_state(const SchemaFrame& f) { return uint32_t(f.b >> 40); }
inline uint64_t with_dfa_state(uint64_t b, uint32_t state) { return (b & ((uint64_t(1) << 40) - 1)) | uint64_t(state) << 40; }

enum class TextStep { kReject, kTaken, kClosed };
// One byte of a JSON string's content (kChars, kEscape, kUtf8): kClosed for the closing quote
// when the string may end there (length, pattern), the caller then ends the value.
TextStep string_byte(const JsonSchema& s, const SchemaNode& n, SchemaFrame& f, uint8_t byte);
// One byte of text matching the node's regex (kRaw), as UTF-8.
bool raw_byte(const JsonSchema& s, const SchemaNode& n, SchemaFrame& f, uint8_t byte);
// The text so far is a whole match (and no UTF-8 sequence is open).
bool raw_complete(const JsonSchema& s, const SchemaNode& n, const SchemaFrame& f);

}  // namespace schema_detail
}  // namespace llamas
