// The one dispatch point: each op validates its arguments, records a profile entry, and calls the
// backend for the tensors' device.
#include "llamas/ops.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/kernel_table.h"
#include "cpu/reference.h"
#include "llamas/bfloat16.h"
#include "llamas/cuda.h"
#include "llamas/error.h"
#include "llamas/int8.h"
#include "llamas/parallel.h"
#include "llamas/profiler.h"
#include "ops/checks.h"

namespace llamas {
namespace ops {
namespace {

// y = x @ B (+ bias) (GELU) for a float32 (M, K) x whose K the caller checked against B (N columns).
Tensor run_linear(const Tensor& x, int64_t N, const void* B, bool b_bf16, BLayout layout, int64_t ldb,
                  const Tensor* bias, bool gelu, DType compute = DType::F32, bool b_i8 = false,
                  bool b_streamed = false) {
  if (bias) {
    require_f32(*bias, "linear", "bias");
    LLAMAS_CHECK(bias->numel() == N, "linear", "bias must have ", N, " elements, got ", bias->describe());
  }
  Tensor out = Tensor::empty({x.dim(0), N}, DType::F32);
  GemmArgs g;
  g.M = x.dim(0), g.N = N, g.K = x.dim(1);
  g.A = x.data<float>(), g.lda = g.K;
  g.B = B, g.b_bf16 = b_bf16, g.b_layout = layout, g.ldb = ldb;
  g.bias = bias ? bias->data<float>() : nullptr;
  g.C = out.data<float>(), g.ldc = N;
  g.gelu = gelu, g.a_bf16 = compute == DType::BF16, g.a_i8 = compute == DType::I8, g.b_i8 = b_i8;
  g.b_streamed = b_streamed;
  gemm(g, x.device());
  return out;
}

}  // namespace

Tensor cast(const Tensor& src, DType dtype) {
  ProfileScope scope("cast");
  require_cpu(src, "cast");
  LLAMAS_CHECK((src.dtype() == DType::F32 || src.dtype() == DType::BF16) && (dtype == DType::F32 || dtype == DType::BF16),
               "cast", "only float32 <-> bfloat16 casts are supported, got ", src.describe(), " to ", dtype_name(dtype));
  if (src.dtype() == dtype) return src;
  Tensor dst = Tensor::empty(src.shape(), dtype);
  const int64_t n = src.numel();
  if (dtype == DType::BF16) {
    const float* s = src.data<float>();
    uint16_t* d = dst.data<uint16_t>();
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = float_to_bf16(s[i]);
    });
  } else {
    const uint16_t* s = src.data<uint16_t>();
    float* d = dst.data<float>();
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = bf16_to_float(s[i]);
    });
  }
  return dst;
}


void gemm(const GemmArgs& args, Device device) {
  ProfileScope scope("gemm");
  if (device != Device::CPU) cuda_unavailable("gemm");
  cpu::kernels().gemm(args);
}

Tensor linear(const Tensor& x, const Tensor& w, BLayout layout, const Tensor* bias, bool gelu) {
  require_f32(x, "linear", "input");
  require_cpu(x, "linear");
  LLAMAS_CHECK(x.ndim() == 2, "linear", "input must be 2-D (M, K), got ", x.describe());
  LLAMAS_CHECK(w.ndim() == 2 && (w.dtype() == DType::F32 || w.dtype() == DType::BF16), "linear",
               "weight must be a 2-D float32 or bfloat16 matrix, got ", w.describe());
  const int64_t K = x.dim(1);
  LLAMAS_CHECK(layout != BLayout::Panels, "linear", "panels are passed as a PackedMatrix");
  int64_t wk = layout == BLayout::KN ? w.dim(0) : w.dim(1);
  int64_t N = layout == BLayout::KN ? w.dim(1) : w.dim(0);
  LLAMAS_CHECK(wk == K, "linear", "input has ", K, " features but the weight expects ", wk,
               " (weight ", w.describe(), ")");
  return run_linear(x, N, w.raw(), w.dtype() == DType::BF16, layout, w.dim(1), bias, gelu);
}

namespace {

template <typename Out> Out convert_to(float f) { return float_as<Out>(f); }
template <typename Out> Out convert_to(uint16_t bits);
template <> inline float convert_to<float>(uint16_t bits) { return bf16_to_float(bits); }
template <> inline uint16_t convert_to<uint16_t>(uint16_t bits) { return bits; }

// Panels [p0, p1) of p from src stored (K, N) or (N, K) (bfloat16 rows interleaved). (K, N): 8
// panels at a time, k outer, so each source row is read 128 elements at a time, contiguously.
// (N, K): a panel is 16 source rows, each read front to back.
template <typename Src, typename Out>
void fill_panels(const Src* src, BLayout layout, const PackedMatrix& p, int64_t p0, int64_t p1) {
  Out* dst = p.data.data<Out>();
  auto panel_out = [&](int64_t panel) { return dst + panel * p.K * kPanelWidth; };
  auto panel_cols = [&](int64_t panel) { return std::min(kPanelWidth, p.N - panel * kPanelWidth); };
  // Where a panel row keeps column j (bfloat16 rows are interleaved, see bf16_panel_slot).
  auto slot = [](int64_t j) { return std::is_same_v<Out, uint16_t> ? bf16_panel_slot(j) : j; };
  for (int64_t panel = p0; panel < p1; ++panel)
    if (panel_cols(panel) < kPanelWidth) std::memset(panel_out(panel), 0, p.K * kPanelWidth * sizeof(Out));
  if (layout == BLayout::KN) {
    for (int64_t g0 = p0; g0 < p1; g0 += 8)
      for (int64_t k = 0; k < p.K; ++k)
        for (int64_t panel = g0; panel < std::min(p1, g0 + 8); ++panel) {
          const Src* row = src + k * p.N + panel * kPanelWidth;
          Out* out = panel_out(panel) + k * kPanelWidth;
          for (int64_t j = 0; j < panel_cols(panel); ++j) out[slot(j)] = convert_to<Out>(row[j]);
        }
    return;
  }
  for (int64_t panel = p0; panel < p1; ++panel)
    for (int64_t j = 0; j < panel_cols(panel); ++j) {
      const Src* row = src + (panel * kPanelWidth + j) * p.K;
      Out* out = panel_out(panel) + slot(j);
      for (int64_t k = 0; k < p.K; ++k) out[k * kPanelWidth] = convert_to<Out>(row[k]);
    }
}

template <typename Src>
void fill_panels_as(const Src* src, BLayout layout, const PackedMatrix& p) {
  parallel_for(p.data.dim(0), 8, [&](int64_t p0, int64_t p1) {
    if (p.dtype() == DType::F32) fill_panels<Src, float>(src, layout, p, p0, p1);
    else fill_panels<Src, uint16_t>(src, layout, p, p0, p1);
  });
}

}  // namespace

PackedMatrix pack_panels(const Tensor& w, BLayout layout, DType dtype) {
  ProfileScope scope("pack_panels");
  require_cpu(w, "pack_panels");
  LLAMAS_CHECK(w.ndim() == 2 && (w.dtype() == DType::F32 || w.dtype() == DType::BF16) && layout != BLayout::Panels,
               "pack_panels", "expects a 2-D float32 or bfloat16 matrix stored (K, N) or (N, K), got ", w.describe());
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8, "pack_panels",
               "panels are float32, bfloat16 or int8");
  if (dtype == DType::I8) return pack_panels_i8(w, layout);
  PackedMatrix p;
  p.K = layout == BLayout::KN ? w.dim(0) : w.dim(1);
  p.N = layout == BLayout::KN ? w.dim(1) : w.dim(0);
  p.data = Tensor::empty({(p.N + kPanelWidth - 1) / kPanelWidth, p.K, kPanelWidth}, dtype);
  if (w.dtype() == DType::F32) fill_panels_as(w.data<float>(), layout, p);
  else fill_panels_as(w.data<uint16_t>(), layout, p);
  return p;
}

bool compute_fits(DType compute, DType weights) {
  if (compute == DType::BF16) return weights == DType::BF16 || weights == DType::I8;
  if (compute == DType::I8) return weights == DType::I8;
  return compute == DType::F32;
}

Tensor linear(const Tensor& x, const PackedMatrix& w, const Tensor* bias, bool gelu, DType compute) {
  require_f32(x, "linear", "input");
  require_cpu(x, "linear");
  LLAMAS_CHECK(w.defined(), "linear", "packed weight is empty");
  LLAMAS_CHECK(x.ndim() == 2 && x.dim(1) == w.K, "linear", "input must be (M, ", w.K, "), got ", x.describe());
  LLAMAS_CHECK(compute == DType::F32 || compute == DType::BF16 || compute == DType::I8, "linear",
               "compute dtype must be float32, bfloat16 or int8, got ", dtype_name(compute));
  LLAMAS_CHECK(compute_fits(compute, w.dtype()), "linear", dtype_name(compute), " compute needs ",
               compute == DType::BF16 ? "bfloat16 or int8" : "int8", " weights, got ", dtype_name(w.dtype()), " ones");
  return run_linear(x, w.N, w.data.raw(), w.dtype() == DType::BF16, BLayout::Panels, w.K, bias, gelu, compute,
                    w.dtype() == DType::I8, w.streamed);
}

Tensor matmul(const Tensor& a, const Tensor& b) {
  require_f32(a, "matmul", "a");
  require_f32(b, "matmul", "b");
  LLAMAS_CHECK(a.ndim() == 2 && b.ndim() == 2, "matmul", "expects 2-D arrays, got ", a.describe(), " and ",
               b.describe());
  LLAMAS_CHECK(a.dim(1) == b.dim(0), "matmul", "inner dimensions differ: ", a.describe(), " @ ", b.describe());
  return linear(a, b, BLayout::KN, nullptr, false);
}

void layernorm_rows(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C,
                    float eps, Device device) {
  ProfileScope scope("layernorm");
  if (device != Device::CPU) cuda_unavailable("layernorm");
  cpu::kernels().layernorm(x, w, b, out, rows, C, eps);
}

void residual_layernorm_rows(float* x, const float* delta, const float* w, const float* b, float* out,
                             int64_t rows, int64_t C, float eps, Device device) {
  ProfileScope scope("residual_layernorm");
  if (device != Device::CPU) cuda_unavailable("residual_layernorm");
  cpu::kernels().residual_layernorm(x, delta, w, b, out, rows, C, eps);
}

static void check_norm_params(const Tensor& x, const Tensor& w, const Tensor& b, const char* op) {
  require_f32(x, op, "input");
  require_f32(w, op, "weight");
  require_f32(b, op, "bias");
  require_cpu(x, op);
  LLAMAS_CHECK(x.ndim() >= 1, op, "input must have at least 1 dimension");
  int64_t C = x.dim(-1);
  LLAMAS_CHECK(C > 0, op, "last dimension must be positive");
  LLAMAS_CHECK(w.numel() == C && b.numel() == C, op, "weight and bias must have ", C, " elements, got ",
               w.describe(), " and ", b.describe());
}

Tensor layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps) {
  check_norm_params(x, w, b, "layernorm");
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  int64_t C = x.dim(-1);
  layernorm_rows(x.data<float>(), w.data<float>(), b.data<float>(), out.data<float>(), x.numel() / C, C, eps);
  return out;
}

Tensor residual_layernorm(Tensor& x, const Tensor& delta, const Tensor& w, const Tensor& b, float eps) {
  check_norm_params(x, w, b, "residual_layernorm");
  require_f32(delta, "residual_layernorm", "delta");
  LLAMAS_CHECK(delta.shape() == x.shape(), "residual_layernorm", "delta ", delta.describe(),
               " must match the residual ", x.describe());
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  int64_t C = x.dim(-1);
  residual_layernorm_rows(x.data<float>(), delta.data<float>(), w.data<float>(), b.data<float>(),
                          out.data<float>(), x.numel() / C, C, eps);
  return out;
}

Tensor gelu(const Tensor& x) {
  ProfileScope scope("gelu");
  require_f32(x, "gelu", "input");
  require_cpu(x, "gelu");
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  cpu::kernels().gelu(x.data<float>(), out.data<float>(), x.numel());
  return out;
}

Tensor softmax(const Tensor& x) {
  ProfileScope scope("softmax");
  require_f32(x, "softmax", "input");
  require_cpu(x, "softmax");
  LLAMAS_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "softmax", "needs a non-empty last dimension, got ", x.describe());
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  int64_t cols = x.dim(-1);
  cpu::kernels().softmax(x.data<float>(), out.data<float>(), x.numel() / cols, cols);
  return out;
}

void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols, Device device) {
  // No profile entry of its own: its caller (the sampler, inside "sample") already has one, and
  // a nested entry would count the same time twice in the profile's shares.
  if (device != Device::CPU) cuda_unavailable("softmax");
  cpu::kernels().softmax(x, y, rows, cols);
}

Tensor log_softmax(const Tensor& x, bool reference) {
  ProfileScope scope("log_softmax");
  require_f32(x, "log_softmax", "input");
  require_cpu(x, "log_softmax");
  LLAMAS_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "log_softmax", "needs a non-empty last dimension, got ", x.describe());
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  const int64_t cols = x.dim(-1), rows = x.numel() / cols;
  const float* in = x.data<float>();
  float* o = out.data<float>();
  parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double norm = reference ? cpu::reference::log_sum_exp(in + r * cols, cols)
                                    : cpu::kernels().log_sum_exp(in + r * cols, cols);
      for (int64_t i = 0; i < cols; ++i) o[r * cols + i] = float(double(in[r * cols + i]) - norm);
    }
  });
  return out;
}

double log_sum_exp_row(const float* x, int64_t n, Device device) {
  // No profile entry: its callers (scoring, logprobs) are inside "sample".
  if (device != Device::CPU) cuda_unavailable("log_softmax");
  return cpu::kernels().log_sum_exp(x, n);
}

void add_into(const float* a, const float* b, float* y, int64_t n, Device device) {
  ProfileScope scope("add");
  if (device != Device::CPU) cuda_unavailable("add");
  cpu::kernels().add(a, b, y, n);
}

void paged_attention(const AttentionArgs* seqs, int n_seqs, Device device) {
  ProfileScope scope("attention");
  if (device != Device::CPU) cuda_unavailable("attention");
  for (int s = 0; s < n_seqs; ++s) {
    LLAMAS_CHECK(seqs[s].head_dim > 0 && seqs[s].head_dim <= 256, "attention",
                 "head_dim must be in [1, 256], got ", seqs[s].head_dim);
    LLAMAS_CHECK(!seqs[s].new_k == !seqs[s].new_v && (!seqs[s].new_k || seqs[s].n_query == 1), "attention",
                 "a new key and value come together, and only with one query row (decode)");
  }
  cpu::kernels().attention(seqs, n_seqs);
}

void embedding(const int32_t* ids, const int64_t* positions, int64_t n, const Tensor& wte, const Tensor& wpe,
               float* out, const PackedMatrix* wte_panels) {
  ProfileScope scope("embedding");
  require_cpu(wte, "embedding");
  const int64_t V = wte.dim(0), C = wte.dim(1), P = wpe.dim(0);
  if (wte_panels != nullptr)
    LLAMAS_CHECK(wte_panels->N == V && wte_panels->K == C, "embedding", "the panels must hold wte (", V, " x ", C,
                 "), got ", wte_panels->N, " x ", wte_panels->K);
  // Row v of wte in the panels: column v % 16 of panel v / 16, one element per 64-byte panel row
  // (float32; 32 bytes bfloat16), at its interleaved slot for bfloat16.
  auto panel_row = [&](int64_t v, float* dst) {
    const int64_t base = (v / kPanelWidth) * C * kPanelWidth;
    if (wte_panels->dtype() == DType::F32) {
      const float* src = wte_panels->data.data<float>() + base + v % kPanelWidth;
      for (int64_t c = 0; c < C; ++c) dst[c] = src[c * kPanelWidth];
    } else if (wte_panels->dtype() == DType::I8) {  // q * scale, as the lm_head GEMM forms it
      for (int64_t c = 0; c < C; ++c) dst[c] = i8_panel_weight(wte_panels->data.data<int8_t>(), C, c, v);
    } else {
      const uint16_t* src = wte_panels->data.data<uint16_t>() + base + bf16_panel_slot(v % kPanelWidth);
      for (int64_t c = 0; c < C; ++c) dst[c] = bf16_to_float(src[c * kPanelWidth]);
    }
  };
  auto load_row = [&](const Tensor& table, int64_t row, float* dst, bool add) {
    if (table.dtype() == DType::F32) {
      const float* src = table.data<float>() + row * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = add ? dst[c] + src[c] : src[c];
    } else {
      const uint16_t* src = table.data<uint16_t>() + row * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = add ? dst[c] + bf16_to_float(src[c]) : bf16_to_float(src[c]);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    LLAMAS_CHECK(ids[i] >= 0 && ids[i] < V, "embedding", "token id ", ids[i], " is out of range [0, ", V, ")");
    LLAMAS_CHECK(positions[i] >= 0 && positions[i] < P, "embedding", "position ", positions[i],
                 " is beyond the context length ", P);
    if (wte_panels != nullptr) panel_row(ids[i], out + i * C);
    else load_row(wte, ids[i], out + i * C, false);
    load_row(wpe, positions[i], out + i * C, true);
  }
}

}  // namespace ops
}  // namespace llamas
