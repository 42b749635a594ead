#pragma once
// bfloat16 <-> float32 scalar conversions (the top 16 bits of a float32): weights cast at load,
// KV caches of bfloat16 models, reference kernels.
#include <cstdint>
#include <cstring>

namespace llamas {

// static, so that a kernel variant's copy (compiled with AVX flags) stays private: see kv_block.h.

// Round to nearest, ties to even; a NaN stays a (quiet) NaN instead of rounding to infinity.
static inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7F800000) == 0x7F800000 && (bits & 0x7FFFFF)) return uint16_t((bits >> 16) | 0x40);
  uint32_t rounding = 0x7FFF + ((bits >> 16) & 1);
  return uint16_t((bits + rounding) >> 16);
}

static inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// x as an element of a float32 (Out = float) or bfloat16 (Out = uint16_t) array.
template <typename Out>
static inline Out float_as(float x);
template <>
inline float float_as<float>(float x) { return x; }
template <>
inline uint16_t float_as<uint16_t>(float x) { return float_to_bf16(x); }

}  // namespace llamas
