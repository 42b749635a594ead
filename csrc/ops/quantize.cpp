// int8 weight panels (see i8_panel_bytes in kernel_args.h): each column's weights, 32 k at a time,
// scaled by their largest magnitude / 127 and rounded to int8 (llamas/int8.h). Done once at load;
// the GEMM turns each weight back into q * scale in float32 (cpu/gemm_tile_impl.h), or, with int8
// compute, sums q against the activations' q (cpu/gemm_i8_dot_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "llamas/bfloat16.h"
#include "llamas/error.h"
#include "llamas/int8.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"

namespace llamas {
namespace ops {

namespace {

inline float as_float(float x) { return x; }
inline float as_float(uint16_t bits) { return bf16_to_float(bits); }

// One block of a panel, up to 32 rows x 16 columns (tile[k][j], columns past `cols` zero), as
// quantize_int8 quantizes each column: into q rows of 16 (q + k * 16) and 16 scales. Returns false,
// writing nothing, if a value is not finite (the caller then names it). quantize_int8's arithmetic
// a row of 16 columns at a time, instead of one column's 32 values through quantize_int8 with a
// finiteness check per value (and a library nearbyint where SSE4.1 is not assumed): packing a
// 768 x 50257 matrix 194 -> 33 ms (2 threads), GPT-2 124M's int8 load 0.63-0.68 -> 0.30-0.36 s.
bool quantize_block(const float (&tile)[kI8Block][kPanelWidth], int64_t rows, int8_t* q, float* scales) {
  float amax[kPanelWidth] = {}, inverse[kPanelWidth];
  bool finite = true;
  for (int64_t k = 0; k < rows; ++k)
    for (int j = 0; j < kPanelWidth; ++j) {
      const float a = std::fabs(tile[k][j]);
      finite &= a <= std::numeric_limits<float>::max();
      amax[j] = a > amax[j] ? a : amax[j];
    }
  if (!finite) return false;
  for (int j = 0; j < kPanelWidth; ++j) {
    const Int8Scale s = int8_scale(amax[j]);
    scales[j] = s.scale, inverse[j] = s.inverse;
  }
  for (int64_t k = 0; k < rows; ++k) {
    int8_t* out = q + k * kPanelWidth;
#if defined(__SSE2__)
    // CVTPS2DQ rounds as nearbyint does (the current mode: nearest, ties to even); |x / scale| <= 127
    // up to one rounding, and the clamp catches that.
    __m128i quads[4];
    for (int c = 0; c < 4; ++c) {
      const __m128 r = _mm_mul_ps(_mm_loadu_ps(&tile[k][4 * c]), _mm_loadu_ps(inverse + 4 * c));
      quads[c] = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(r, _mm_set1_ps(-127.0f)), _mm_set1_ps(127.0f)));
    }
    const __m128i words = _mm_packs_epi32(quads[0], quads[1]), words_hi = _mm_packs_epi32(quads[2], quads[3]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(words, words_hi));
#else
    for (int j = 0; j < kPanelWidth; ++j) {
      const float r = std::nearbyint(tile[k][j] * inverse[j]);
      out[j] = int8_t(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
#endif
  }
  return true;
}

// Panels [p0, p1) of p from src stored (K, N) or (N, K).
template <typename Src>
void quantize_panels(const Src* src, BLayout layout, const PackedMatrix& p, int64_t p0, int64_t p1) {
  const int64_t K = p.K, N = p.N, record = i8_panel_bytes(K);
  for (int64_t panel = p0; panel < p1; ++panel) {
    int8_t* q = p.data.data<int8_t>() + panel * record;
    float* scales = reinterpret_cast<float*>(q + K * kPanelWidth);
    std::memset(q, 0, record);  // columns past N: weight 0, scale 0
    const int64_t n0 = panel * kPanelWidth, cols = std::min(kPanelWidth, N - n0);
    for (int64_t b0 = 0; b0 < K; b0 += kI8Block) {
      const int64_t b1 = std::min(K, b0 + kI8Block);
      float tile[kI8Block][kPanelWidth] = {};
      if (layout == BLayout::KN) {
        for (int64_t k = b0; k < b1; ++k)
          for (int64_t j = 0; j < cols; ++j) tile[k - b0][j] = as_float(src[k * N + n0 + j]);
      } else {
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t k = b0; k < b1; ++k) tile[k - b0][j] = as_float(src[(n0 + j) * K + k]);
      }
      if (quantize_block(tile, b1 - b0, q + b0 * kPanelWidth, scales + b0 / kI8Block * kPanelWidth)) continue;
      // A NaN or infinity would turn its whole block into NaN or a silent 127 * scale: a corrupt
      // checkpoint is refused instead (float32 and bfloat16 weights propagate it).
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t k = b0; k < b1; ++k)
          LLAMAS_CHECK(std::isfinite(tile[k - b0][j]), "quantize", "int8 weights must be finite, got ",
                       tile[k - b0][j], " at row ", k, " of column ", n0 + j, " (as (in, out))");
    }
  }
}

}  // namespace

PackedMatrix pack_panels_i8(const Tensor& w, BLayout layout) {
  PackedMatrix p;
  p.K = layout == BLayout::KN ? w.dim(0) : w.dim(1);
  p.N = layout == BLayout::KN ? w.dim(1) : w.dim(0);
  const int64_t panels = (p.N + kPanelWidth - 1) / kPanelWidth;
  p.data = Tensor::empty({panels, i8_panel_bytes(p.K)}, DType::I8);
  parallel_for(panels, 8, [&](int64_t p0, int64_t p1) {
    if (w.dtype() == DType::F32) quantize_panels(w.data<float>(), layout, p, p0, p1);
    else quantize_panels(w.data<uint16_t>(), layout, p, p0, p1);
  });
  return p;
}

Tensor dequantize_panels(const PackedMatrix& p) {
  LLAMAS_CHECK(p.defined() && p.dtype() == DType::I8, "dequantize", "expects int8 panels, got ",
               p.defined() ? dtype_name(p.dtype()) : "an empty matrix");
  Tensor out = Tensor::empty({p.K, p.N}, DType::F32);
  for (int64_t k = 0; k < p.K; ++k)
    for (int64_t n = 0; n < p.N; ++n) out.data<float>()[k * p.N + n] = i8_panel_weight(p.data.data<int8_t>(), p.K, k, n);
  return out;
}

}  // namespace ops
}  // namespace llamas
