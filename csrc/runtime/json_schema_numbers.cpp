// Bounded numbers, exactly. The recogniser writes a bounded number (and every integer) with at most
// kMaxDigits = 18 digits and no exponent, so what it can write is k / 10^f with |k| < 10^18 and
// f <= 17: prepare_bounds() narrows a node's bounds to the least and greatest such numbers inside
// them, and a number's digits so far are then compared with those in 128-bit integers. (With
// doubles, 10000000000000001 was 10^16, and the interval a 17th digit could still reach rounded to
// nothing, so a prefix that could not end there, such as a dot, became a dead end.)
#include "runtime/json_schema_internal.h"

namespace llamas {

namespace schema_detail {
namespace {

using Kind = SchemaNode::Kind;
using i128 = __int128;

constexpr int64_t kMaxWritable = 999999999999999999;  // 10^18 - 1: 18 digits

i128 pow10(int e) {
  i128 p = 1;
  while (e-- > 0) p *= 10;
  return p;
}

i128 floor_div(i128 a, i128 b) {  // b > 0
  i128 q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

i128 ceil_div(i128 a, i128 b) {  // b > 0
  i128 q = a / b;
  return (a % b != 0 && a > 0) ? q + 1 : q;
}

// A rational k / 10^f with |k| < 10^18 and f <= 17 (a number the recogniser can write).
struct Dec {
  i128 k;
  int f;
};

// a < b, exactly (cross-multiplied: below 10^35).
bool less(Dec a, Dec b) { return a.k * pow10(b.f) < b.k * pow10(a.f); }

// ceil (up) or floor of d * 10^e, for e >= 0.
i128 scaled(Dec d, int e, bool up) {
  if (e >= d.f) return d.k * pow10(e - d.f);
  return up ? ceil_div(d.k, pow10(d.f - e)) : floor_div(d.k, pow10(d.f - e));
}

// ceil (up) or floor of m 10^(e + f), exactly; *beyond: its magnitude is past 10^19 (sign of m).
i128 scaled_decimal(int64_t m, int32_t e, int f, bool up, bool* exact, bool* beyond) {
  const int p = e + f;
  *beyond = false, *exact = true;
  if (m == 0) return 0;
  if (p >= 0) {
    if (p > 19) {  // |m| >= 1: past every 18-digit number
      *beyond = true;
      return m > 0 ? i128(kMaxWritable) * 10 : -i128(kMaxWritable) * 10;
    }
    return i128(m) * pow10(p);  // below 10^19 10^19
  }
  if (-p > 36) {  // |m| < 10^19 <= 10^-p: the quotient lies strictly between -1 and 1
    *exact = false;
    return up ? (m > 0 ? 1 : 0) : (m > 0 ? 0 : -1);
  }
  const i128 div = pow10(-p);
  *exact = i128(m) % div == 0;
  return up ? ceil_div(m, div) : floor_div(m, div);
}

// The least (lower) or greatest writable number on the node's side of a bound; false: none.
bool writable_bound(const SchemaNode& n, bool lower, Dec* out) {
  if (!(lower ? n.has_lo : n.has_hi)) {
    *out = {lower ? -kMaxWritable : kMaxWritable, 0};
    return true;
  }
  const bool exclusive = lower ? n.lo_exclusive : n.hi_exclusive;
  // Each grid of 10^-f (f fraction digits; integers only for an integer node) has its own nearest
  // point inside the bound; the nearest of those is the answer (finer grids reach less far).
  bool found = false;
  const int max_f = n.kind == Kind::kInteger ? 0 : int(kMaxDigits) - 1;
  for (int f = 0; f <= max_f; ++f) {
    bool exact = true, beyond = false;
    i128 k = scaled_decimal(lower ? n.lo_m : n.hi_m, lower ? n.lo_e : n.hi_e, f, lower, &exact, &beyond);
    if (exact && exclusive && !beyond) k += lower ? 1 : -1;
    if (lower ? k > kMaxWritable : k < -kMaxWritable) continue;  // this grid has nothing inside
    if (k < -kMaxWritable) k = -kMaxWritable;
    if (k > kMaxWritable) k = kMaxWritable;
    const Dec d{k, f};
    if (!found || (lower ? less(d, *out) : less(*out, d))) *out = d;
    found = true;
  }
  return found;
}

// Whether some integer t in [a, b] has lo <= t / 10^e <= hi (magnitudes).
bool meets(i128 a, i128 b, int e, Dec lo, Dec hi) {
  const i128 t_lo = scaled(lo, e, true), t_hi = scaled(hi, e, false);
  return (a > t_lo ? a : t_lo) <= (b < t_hi ? b : t_hi);
}

}  // namespace

bool number_in_bounds(const SchemaNode& n, const SchemaFrame& f) {
  if (!n.has_lo && !n.has_hi) return true;
  if (n.bounds_empty) return false;
  const Dec x{(f.aux & kNegative) ? -i128(f.b) : i128(f.b), int(fraction_digits(f))};
  return !less(x, {n.lo_k, n.lo_f}) && !less({n.hi_k, n.hi_f}, x);
}

bool number_feasible(const SchemaNode& n, const SchemaFrame& f) {
  if (!n.has_lo && !n.has_hi) return true;
  if (n.bounds_empty) return false;
  const uint8_t phase = f.aux & 0x7F;
  const bool neg = f.aux & kNegative, integer = n.kind == Kind::kInteger;
  // The magnitudes the bounds allow, for the number's sign.
  const Dec lo = neg ? Dec{-i128(n.hi_k), n.hi_f} : Dec{n.lo_k, n.lo_f};
  const Dec hi = neg ? Dec{-i128(n.lo_k), n.lo_f} : Dec{n.hi_k, n.hi_f};
  if (less(hi, {0, 0})) return false;
  if (phase == kMinus)  // any writable negative number (or "-0" for a number) can follow
    return integer ? n.lo_k <= -1 : !less({0, 0}, {n.lo_k, n.lo_f});
  const int left = int(kMaxDigits) - int(digit_count(f));  // digits that can still be written
  const i128 v = i128(f.b);
  const i128 span = pow10(left);
  switch (phase) {
    case kZero:  // "0", or "0." and up to `left` fraction digits (an integer's "0" ends here)
      return integer ? meets(0, 0, 0, lo, hi) : meets(0, span - 1, left, lo, hi);
    case kInt:
      // k more integer digits, then (numbers) up to left - k fraction digits: in units of
      // 10^-(left - k) the values are the integers of [v 10^left, (v + 1) 10^left).
      for (int k = 0; k <= left; ++k) {
        if (integer) {
          if (meets(v * pow10(k), (v + 1) * pow10(k) - 1, 0, lo, hi)) return true;
        } else if (meets(v * span, (v + 1) * span - 1, left - k, lo, hi)) {
          return true;
        }
      }
      return false;
    case kDot:  // at least one fraction digit must follow
      return left >= 1 && meets(v * span, (v + 1) * span - 1, left, lo, hi);
    case kFrac:
      return meets(v * span, (v + 1) * span - 1, int(fraction_digits(f)) + left, lo, hi);
    default:
      return true;  // exponents are not written beside bounds
  }
}

}  // namespace schema_detail

void prepare_bounds(SchemaNode& n) {
  if (n.kind != SchemaNode::Kind::kInteger && n.kind != SchemaNode::Kind::kNumber) return;
  schema_detail::Dec lo{}, hi{};
  n.bounds_empty = !schema_detail::writable_bound(n, true, &lo) || !schema_detail::writable_bound(n, false, &hi) ||
                   schema_detail::less(hi, lo);
  n.lo_k = int64_t(lo.k), n.lo_f = lo.f, n.hi_k = int64_t(hi.k), n.hi_f = hi.f;
}

}  // namespace llamas
