#include "runtime/json_schema_internal.h"

namespace llamas {
namespace schema_detail {
namespace {

using Kind = SchemaNode::Kind;

constexpr double kPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,
                             1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18};

// Whether some x with low <(=) x <(=) high exists, after narrowing [low, high] to the node's bounds.
bool meets_bounds(const SchemaNode& n, double low, bool low_open, double high, bool high_open) {
  if (n.has_lo && (n.lo > low || (n.lo == low && n.lo_exclusive))) low = n.lo, low_open = n.lo_exclusive;
  if (n.has_hi && (n.hi < high || (n.hi == high && n.hi_exclusive))) high = n.hi, high_open = n.hi_exclusive;
  return low < high || (low == high && !low_open && !high_open);
}

}  // namespace

bool in_bounds(const SchemaNode& n, double x) { return meets_bounds(n, x, false, x, false); }

bool number_feasible(const SchemaNode& n, const SchemaFrame& f) {
  if (!n.has_lo && !n.has_hi) return true;
  const uint8_t phase = f.aux & 0x7F;
  const bool neg = f.aux & kNegative;
  const uint32_t digits = digit_count(f);
  if (digits == kMaxDigits) return accepting(phase) && in_bounds(n, number_value(f));  // it can only end
  const double v = double(f.b);
  // Magnitudes in [a, b] (b excluded when b_open) that the number can still take.
  auto check = [&](double a, double b, bool b_open) {
    return neg ? meets_bounds(n, -b, b_open, -a, false) : meets_bounds(n, a, false, b, b_open);
  };
  switch (phase) {
    case kMinus:  // an integer's magnitude is at least 1 ("-0" is not written); a number's any
      return n.kind == Kind::kInteger ? check(1, kPow10[kMaxDigits] - 1, false) : check(0, kPow10[kMaxDigits], true);
    case kZero:
      return n.kind == Kind::kInteger ? check(0, 0, false) : check(0, 1, true);
    case kInt:
      // v and k more integer digits: [v 10^k, (v + 1) 10^k), or up to v 10^k + 10^k - 1 for an integer
      for (uint32_t k = 0; digits + k <= kMaxDigits; ++k) {
        const double lo = v * kPow10[k];
        if (n.kind == Kind::kInteger ? check(lo, lo + kPow10[k] - 1, false) : check(lo, lo + kPow10[k], true))
          return true;
      }
      return false;
    case kDot:
      return check(v, v + 1, true);
    case kFrac: {
      const double scale = kPow10[fraction_digits(f)];
      return check(v / scale, (v + 1) / scale, true);
    }
    default:
      return true;  // exponents are not written beside bounds
  }
}

double number_value(const SchemaFrame& f) {
  const double mag = double(f.b) / kPow10[fraction_digits(f)];
  return (f.aux & kNegative) ? -mag : mag;
}

}  // namespace schema_detail
}  // namespace llamas
