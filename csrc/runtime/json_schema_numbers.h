#pragma once
// Numbers in structured output (json_schema.cpp): a number frame's phase and digits, and whether
// the digits so far can still end inside the node's bounds.
#include <cstdint>

#include "runtime/json_schema.h"

namespace llamas {
namespace schema_numbers {

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

// x lies inside the node's bounds.
bool in_bounds(const SchemaNode& n, double x);
// Can a number that starts with the frame's bytes still end inside the node's bounds?
bool number_feasible(const SchemaNode& n, const SchemaFrame& f);
// The number's value once it ends.
double number_value(const SchemaFrame& f);

}  // namespace schema_numbers
}  // namespace llamas
