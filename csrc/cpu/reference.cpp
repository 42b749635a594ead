#include "cpu/reference.h"

#include "llamas/kv_block.h"

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "llamas/bfloat16.h"

namespace llamas {
namespace cpu {
namespace reference {

// Element i of a float32 or bfloat16 array.
static float element(const void* base, int64_t i, bool bf16) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

static float b_at(const GemmArgs& g, int64_t k, int64_t n) {
  if (g.b_i8) return i8_panel_weight(static_cast<const int8_t*>(g.B), g.K, k, n);
  int64_t idx = g.b_layout == BLayout::KN   ? k * g.ldb + n
                : g.b_layout == BLayout::NK ? n * g.ldb + k
                                            : ((n / kPanelWidth) * g.K + k) * kPanelWidth +
                                                  (g.b_bf16 ? bf16_panel_slot(n % kPanelWidth) : n % kPanelWidth);
  return element(g.B, idx, g.b_bf16);
}

void gemm(const GemmArgs& g) {
  auto a_at = [&](int64_t m, int64_t k) {
    const float a = g.a_trans ? g.A[k * g.lda + m] : g.A[m * g.lda + k];
    return g.a_bf16 ? bf16_to_float(float_to_bf16(a)) : a;
  };
  const int64_t blocks = (g.K + kI8Block - 1) / kI8Block;
  std::vector<int8_t> qa(static_cast<size_t>(blocks * kI8Block));
  std::vector<float> sa(static_cast<size_t>(blocks));
  for (int64_t m = 0; m < g.M; ++m) {
    if (g.a_i8)  // row m's 32-k blocks quantized as the weights are
      for (int64_t b = 0; b < blocks; ++b)
        sa[b] = quantize_int8(g.A + m * g.lda + b * kI8Block, std::min(kI8Block, g.K - b * kI8Block), 1,
                              qa.data() + b * kI8Block, 1);
    for (int64_t n = 0; n < g.N; ++n) {
      float acc = g.accumulate ? g.C[m * g.ldc + n] : (g.bias ? g.bias[n] : 0.0f);
      if (g.a_i8) {
        // One fma per block: its exact integer dot times the activations' and the weights' scales.
        const int8_t* panels = static_cast<const int8_t*>(g.B);
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t dot = 0;
          for (int64_t k = b * kI8Block; k < std::min(g.K, (b + 1) * kI8Block); ++k)
            dot += int32_t(qa[k]) * i8_panel_q(panels, g.K, k, n);
          acc = std::fma(float(dot), sa[b] * i8_panel_scale(panels, g.K, b * kI8Block, n), acc);
        }
      } else if (g.a_bf16) {
        // k pairs, the odd product first (one VDPBF16PS lane); an odd K's last pair adds 0 x 0.
        for (int64_t k = 0; k < g.K; k += 2) {
          const bool whole = k + 1 < g.K;
          acc = std::fma(whole ? a_at(m, k + 1) : 0.0f, whole ? b_at(g, k + 1, n) : 0.0f, acc);
          acc = std::fma(a_at(m, k), b_at(g, k, n), acc);
        }
      } else {
        for (int64_t k = 0; k < g.K; ++k) acc = std::fma(a_at(m, k), b_at(g, k, n), acc);
      }
      if (g.gelu) {
        float u = 0.7978845608028654f * (acc + 0.044715f * acc * acc * acc);
        acc = 0.5f * acc * (1.0f + std::tanh(u));
      }
      g.C[m * g.ldc + n] = acc;
    }
  }
}

void attention(const AttentionArgs& a) {
  const int hd = a.head_dim;
  if (a.new_k) {
    if (a.kv_i8) kv_write_new_position<int8_t>(a, 0, a.n_head);
    else if (a.kv_bf16) kv_write_new_position<uint16_t>(a, 0, a.n_head);
    else kv_write_new_position<float>(a, 0, a.n_head);
  }
  // Entry i of a region (int8: q * the scale of head h, position j).
  auto entry = [&](const void* region, int64_t i, int h, int64_t j) {
    if (!a.kv_i8) return element(region, i, a.kv_bf16);
    const int8_t* q = static_cast<const int8_t*>(region);
    return float(q[i]) * kv_i8_scales(q, a.n_head, hd)[h * kKvBlockSize + j % kKvBlockSize];
  };
  for (int64_t t = 0; t < a.n_query; ++t) {
    const int64_t pos = a.first_pos + t;
    for (int h = 0; h < a.n_head; ++h) {
      const float* q = a.q + t * a.q_stride + int64_t(h) * hd;
      std::vector<float> scores(pos + 1);
      float max_score = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const void* kb = a.k_blocks[j / kKvBlockSize];
        const int64_t k0 = int64_t(h) * hd * kKvBlockSize + j % kKvBlockSize;
        float s = 0.f;
        for (int d = 0; d < hd; ++d) s += q[d] * entry(kb, k0 + d * kKvBlockSize, h, j);
        scores[j] = s * a.scale;
        max_score = std::fmax(max_score, scores[j]);
      }
      float total = 0.f;
      for (auto& s : scores) total += (s = std::exp(s - max_score));
      float* out = a.out + t * a.out_stride + int64_t(h) * hd;
      for (int d = 0; d < hd; ++d) out[d] = 0.f;
      for (int64_t j = 0; j <= pos; ++j) {
        const void* vb = a.v_blocks[j / kKvBlockSize];
        const int64_t v0 = (int64_t(h) * kKvBlockSize + j % kKvBlockSize) * hd;
        for (int d = 0; d < hd; ++d) out[d] += scores[j] / total * entry(vb, v0 + d, h, j);
      }
    }
  }
}

double log_sum_exp(const float* x, int64_t n) {
  float mx = -INFINITY;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nan |= x[i] != x[i];
  }
  if (nan || !(mx < INFINITY) || !(mx > -INFINITY)) return NAN;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(x[i] - mx));
  return double(mx) + std::log(sum);
}

void layernorm(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < C; ++i) mean += xr[i];
    mean /= double(C);
    for (int64_t i = 0; i < C; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= double(C);
    double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < C; ++i) out[r * C + i] = float((xr[i] - mean) * rstd * w[i] + b[i]);
  }
}

}  // namespace reference
}  // namespace cpu
}  // namespace llamas
