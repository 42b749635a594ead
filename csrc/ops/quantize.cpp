// int8 weight panels (see i8_panel_bytes in kernel_args.h): each column's weights, 32 k at a time,
// scaled by their largest magnitude / 127 and rounded to int8. Done once at load; the GEMM turns
// each weight back into q * scale in float32 (cpu/gemm_tile_impl.h).
#include <algorithm>
#include <cmath>
#include <cstring>

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

// Panels [p0, p1) of p from src stored (K, N) or (N, K).
template <typename Src>
void quantize_panels(const Src* src, BLayout layout, const PackedMatrix& p, int64_t p0, int64_t p1) {
  const int64_t K = p.K, N = p.N, record = i8_panel_bytes(K);
  auto at = [&](int64_t k, int64_t n) { return as_float(layout == BLayout::KN ? src[k * N + n] : src[n * K + k]); };
  for (int64_t panel = p0; panel < p1; ++panel) {
    int8_t* q = p.data.data<int8_t>() + panel * record;
    float* scales = reinterpret_cast<float*>(q + K * kPanelWidth);
    std::memset(q, 0, record);  // columns past N: weight 0, scale 0
    const int64_t n0 = panel * kPanelWidth, cols = std::min(kPanelWidth, N - n0);
    for (int64_t b0 = 0; b0 < K; b0 += kI8Block) {
      const int64_t b1 = std::min(K, b0 + kI8Block);
      for (int64_t j = 0; j < cols; ++j) {
        float block[kI8Block];
        for (int64_t k = b0; k < b1; ++k) {
          block[k - b0] = at(k, n0 + j);
          // A NaN or infinity would turn its whole block into NaN or a silent 127 * scale: a
          // corrupt checkpoint is refused instead (float32 and bfloat16 weights propagate it).
          LLAMAS_CHECK(std::isfinite(block[k - b0]), "quantize", "int8 weights must be finite, got ", block[k - b0],
                       " at row ", k, " of column ", n0 + j, " (as (in, out))");
        }
        scales[b0 / kI8Block * kPanelWidth + j] = quantize_int8(block, b1 - b0, 1, q + b0 * kPanelWidth + j, kPanelWidth);
      }
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
