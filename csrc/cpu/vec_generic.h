#pragma once
// Vec for any CPU: 8 floats in a plain array. The compiler vectorises what it can with the
// baseline instruction set (SSE2 on x86-64, NEON on aarch64). This is the fallback variant and the
// one that runs where neither AVX2 nor AVX-512 is available.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct Vec {
  static constexpr int W = 8;
  float v[W];

  static Vec zero() { return set1(0.0f); }
  static Vec set1(float x) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static Vec load_partial(const float* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  static float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static Vec load_bf16(const uint16_t* p) { return load_bf16_partial(p, W); }
  static Vec load_bf16_partial(const uint16_t* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = bf16_to_float(p[i]);
    return r;
  }
  // One interleaved bfloat16 panel row (see bf16_panel_slot): columns 0-7 at the even slots,
  // 8-15 at the odd ones.
  static void load_bf16_panel(const uint16_t* row, Vec* out) {
    for (int i = 0; i < W; ++i) out[0].v[i] = bf16_to_float(row[2 * i]), out[1].v[i] = bf16_to_float(row[2 * i + 1]);
  }
  static Vec load_i8(const int8_t* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = float(p[i]);
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  void store_partial(float* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }

#define LLAMAS_GENERIC_BINARY(expr)          \
  Vec r;                                     \
  for (int i = 0; i < W; ++i) r.v[i] = expr; \
  return r;
  friend Vec operator+(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] + b.v[i]) }
  friend Vec operator-(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] - b.v[i]) }
  friend Vec operator*(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] * b.v[i]) }
  friend Vec operator/(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] / b.v[i]) }
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  static Vec fma(Vec a, Vec b, Vec c) { LLAMAS_GENERIC_BINARY(std::fma(a.v[i], b.v[i], c.v[i])) }
#else
  // Without hardware FMA, std::fma is a slow library call: multiply then add (two roundings).
  static Vec fma(Vec a, Vec b, Vec c) { LLAMAS_GENERIC_BINARY(a.v[i] * b.v[i] + c.v[i]) }
#endif
  static Vec sqrt(Vec a) { LLAMAS_GENERIC_BINARY(std::sqrt(a.v[i])) }
  static Vec max(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] > b.v[i] ? a.v[i] : b.v[i]) }
  static Vec min(Vec a, Vec b) { LLAMAS_GENERIC_BINARY(a.v[i] < b.v[i] ? a.v[i] : b.v[i]) }
  static Vec select_first(int n, Vec a, Vec b) { LLAMAS_GENERIC_BINARY(i < n ? a.v[i] : b.v[i]) }
  static Vec pow2i(Vec n) {
    Vec r;
    for (int i = 0; i < W; ++i) {
      uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
      std::memcpy(&r.v[i], &bits, 4);
    }
    return r;
  }
  static Vec round(Vec a) { LLAMAS_GENERIC_BINARY(std::nearbyint(a.v[i])) }
#undef LLAMAS_GENERIC_BINARY

  // Pairwise tree, the same order as the SIMD variants use.
  float reduce_add() const {
    float s4[4];
    for (int i = 0; i < 4; ++i) s4[i] = v[i] + v[i + 4];
    float s0 = s4[0] + s4[2], s1 = s4[1] + s4[3];
    return s0 + s1;
  }
  // Whether any lane is above x or NaN (unordered): when not, max(x, reduce_max()) is x exactly.
  bool any_above(float x) const {
    for (int i = 0; i < W; ++i)
      if (!(v[i] <= x)) return true;
    return false;
  }
  float reduce_max() const {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
};

inline void transpose_square(Vec* r) {
  for (int i = 0; i < Vec::W; ++i)
    for (int j = i + 1; j < Vec::W; ++j) {
      float t = r[i].v[j];
      r[i].v[j] = r[j].v[i];
      r[j].v[i] = t;
    }
}

constexpr int kGemmRows = 4;
constexpr const char* kVariantName = "generic";

}  // namespace
