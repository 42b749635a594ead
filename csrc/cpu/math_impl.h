#pragma once
// Vector math shared by every variant, written once against Vec (see vec_*.h). Internal linkage:
// each variant translation unit gets its own copy compiled for its instruction set.
#include <cstdint>

namespace {

// exp(x): x = n*ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial (error r^8/8! < 6e-9,
// below float32's 6e-8 half-ulp), 2^n built in the exponent bits. Inputs below -88 give exactly 0
// (n = -127 makes an all-zero exponent field), so exp(-inf) = 0 for masked attention scores.
inline Vec vexp(Vec x) {
  x = Vec::min(Vec::max(x, Vec::set1(-88.0f)), Vec::set1(88.3f));
  Vec n = Vec::round(x * Vec::set1(1.44269504088896341f));
  Vec r = Vec::fma(n, Vec::set1(-0.693145751953125f), x);   // ln2 split in two for exactness
  r = Vec::fma(n, Vec::set1(-1.42860682030941723212e-6f), r);
  Vec p = Vec::set1(1.0f / 5040.0f);
  p = Vec::fma(p, r, Vec::set1(1.0f / 720.0f));
  p = Vec::fma(p, r, Vec::set1(1.0f / 120.0f));
  p = Vec::fma(p, r, Vec::set1(1.0f / 24.0f));
  p = Vec::fma(p, r, Vec::set1(1.0f / 6.0f));
  p = Vec::fma(p, r, Vec::set1(0.5f));
  p = Vec::fma(p, r, Vec::set1(1.0f));
  p = Vec::fma(p, r, Vec::set1(1.0f));
  return p * Vec::pow2i(n);
}

// GPT-2's GELU, tanh form: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u)), which needs one exp and no cancellation near 0.
inline Vec vgelu(Vec x) {
  Vec x3 = x * x * x;
  Vec u = Vec::fma(Vec::set1(0.044715f), x3, x) * Vec::set1(0.7978845608028654f);
  Vec e = vexp(u * Vec::set1(-2.0f));
  return x / (Vec::set1(1.0f) + e);
}

inline Vec load_any(const float* p) { return Vec::load(p); }
inline Vec load_any(const uint16_t* p) { return Vec::load_bf16(p); }
inline Vec load_any_partial(const float* p, int n) { return Vec::load_partial(p, n); }
inline Vec load_any_partial(const uint16_t* p, int n) { return Vec::load_bf16_partial(p, n); }
inline Vec load_any(const int8_t* p) { return Vec::load_i8(p); }
inline Vec load_any_partial(const int8_t* p, int n) {
  int8_t lanes[Vec::W] = {};
  for (int i = 0; i < n; ++i) lanes[i] = p[i];
  return Vec::load_i8(lanes);
}

// Own min/max instead of std::min: a variant file must not instantiate shared inline templates
// (the linker could keep its AVX-512 copy for everyone).
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline int clamp_lanes(int64_t n) { return n < 0 ? 0 : (n > Vec::W ? Vec::W : static_cast<int>(n)); }

}  // namespace
