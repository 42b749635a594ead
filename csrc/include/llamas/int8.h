#pragma once
// int8 quantization, shared by the weights' panels (ops/quantize.cpp), int8 compute's activations
// (cpu/gemm_i8_dot_impl.h) and the int8 KV cache (kv_block.h): a vector as int8 times one float32
// scale, max |x| / 127, q = x / scale rounded to nearest (ties to even).
#include <cmath>
#include <cstdint>

#include "llamas/kernel_args.h"

namespace llamas {

// static, so that a kernel variant's copy (compiled with AVX flags) stays private: see kv_block.h.

// The scale of a vector whose largest magnitude is amax, and what its entries are multiplied by
// before rounding (0 for an all-zero vector, or a non-finite amax's NaN scale). The vectorized
// quantizers use it too, so every path forms the same q.
struct Int8Scale {
  float scale, inverse;
};
static inline Int8Scale int8_scale(float amax) {
  const float scale = amax / 127.0f;
  return {scale, scale > 0.0f ? 1.0f / scale : 0.0f};
}

// x[0..n) (stride x_stride) into q (stride q_stride); returns the scale (0 for an all-zero x). A
// NaN or infinity makes the scale non-finite, so the entries read back non-finite, as float32
// would hold them (the weights' quantizer refuses such weights before it gets here).
static inline float quantize_int8(const float* x, int64_t n, int64_t x_stride, int8_t* q, int64_t q_stride) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i * x_stride]);
    amax = (a > amax || a != a) ? a : amax;
  }
  const Int8Scale s = int8_scale(amax);
  for (int64_t i = 0; i < n; ++i) {
    // |x| <= amax, so |x / scale| <= 127 up to one rounding: the clamp only catches that (and NaN).
    const float r = std::nearbyint(x[i * x_stride] * s.inverse);
    q[i * q_stride] = int8_t(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : (r == r ? r : 0.0f));
  }
  return s.scale;
}

// Weight (k, n) of int8 panels (see i8_panel_bytes): its q, and the scale of its column and 32-row block.
static inline int8_t i8_panel_q(const int8_t* panels, int64_t K, int64_t k, int64_t n) {
  return panels[(n / kPanelWidth) * i8_panel_bytes(K) + k * kPanelWidth + n % kPanelWidth];
}
static inline float i8_panel_scale(const int8_t* panels, int64_t K, int64_t k, int64_t n) {
  const int8_t* panel = panels + (n / kPanelWidth) * i8_panel_bytes(K);
  return reinterpret_cast<const float*>(panel + K * kPanelWidth)[k / kI8Block * kPanelWidth + n % kPanelWidth];
}

// q * scale: the float32 product every GEMM path with float32 or bfloat16 activations forms.
static inline float i8_panel_weight(const int8_t* panels, int64_t K, int64_t k, int64_t n) {
  return float(i8_panel_q(panels, K, k, n)) * i8_panel_scale(panels, K, k, n);
}

}  // namespace llamas
