#pragma once
// Row-wise kernels written once against Vec: layernorm (optionally fused with the residual add),
// softmax, GELU, add. Rows are split across threads; each row's reduction stays on one thread in
// a fixed order.
#include <cmath>

#include "llamas/parallel.h"

namespace {

// Sum of a row with one vector accumulator, then a fixed-order horizontal reduction.
inline float row_sum(const float* x, int64_t n) {
  Vec acc = Vec::zero();
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) acc = acc + Vec::load(x + i);
  if (i < n) acc = acc + Vec::load_partial(x + i, int(n - i));
  return acc.reduce_add();
}

// Mean and 1/sqrt(variance + eps) of a row (two passes; the backward recomputes them this way).
inline void row_mean_rstd(const float* x, int64_t C, float eps, float* mean_out, float* rstd_out) {
  float mean = row_sum(x, C) / float(C);
  Vec vmean = Vec::set1(mean);
  Vec var_acc = Vec::zero();
  int64_t i = 0;
  for (; i + Vec::W <= C; i += Vec::W) {
    Vec d = Vec::load(x + i) - vmean;
    var_acc = Vec::fma(d, d, var_acc);
  }
  if (i < C) {
    int lanes = int(C - i);
    Vec d = Vec::select_first(lanes, Vec::load_partial(x + i, lanes) - vmean, Vec::zero());
    var_acc = Vec::fma(d, d, var_acc);
  }
  *mean_out = mean;
  *rstd_out = 1.0f / std::sqrt(var_acc.reduce_add() / float(C) + eps);
}

inline void layernorm_row(const float* x, const float* w, const float* b, float* out, int64_t C, float eps) {
  float mean, rstd_value;
  row_mean_rstd(x, C, eps, &mean, &rstd_value);
  Vec vmean = Vec::set1(mean), rstd = Vec::set1(rstd_value);
  int64_t i = 0;
  for (; i + Vec::W <= C; i += Vec::W) {
    Vec n = (Vec::load(x + i) - vmean) * rstd;
    Vec::fma(n, Vec::load(w + i), Vec::load(b + i)).store(out + i);
  }
  if (i < C) {
    int lanes = int(C - i);
    Vec n = (Vec::load_partial(x + i, lanes) - vmean) * rstd;
    Vec::fma(n, Vec::load_partial(w + i, lanes), Vec::load_partial(b + i, lanes)).store_partial(out + i, lanes);
  }
}

void layernorm(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C, float eps) {
  llamas::parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) layernorm_row(x + r * C, w, b, out + r * C, C, eps);
  });
}

void residual_layernorm(float* x, const float* delta, const float* w, const float* b, float* out,
                        int64_t rows, int64_t C, float eps) {
  llamas::parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = x + r * C;
      const float* dr = delta + r * C;
      int64_t i = 0;
      for (; i + Vec::W <= C; i += Vec::W) (Vec::load(xr + i) + Vec::load(dr + i)).store(xr + i);
      if (i < C) {
        int lanes = int(C - i);
        (Vec::load_partial(xr + i, lanes) + Vec::load_partial(dr + i, lanes)).store_partial(xr + i, lanes);
      }
      layernorm_row(xr, w, b, out + r * C, C, eps);
    }
  });
}

void gelu(const float* x, float* y, int64_t n) {
  llamas::parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + Vec::W <= i1; i += Vec::W) vgelu(Vec::load(x + i)).store(y + i);
    if (i < i1) vgelu(Vec::load_partial(x + i, int(i1 - i))).store_partial(y + i, int(i1 - i));
  });
}

void add(const float* a, const float* b, float* y, int64_t n) {
  llamas::parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + Vec::W <= i1; i += Vec::W) (Vec::load(a + i) + Vec::load(b + i)).store(y + i);
    if (i < i1) {
      int lanes = int(i1 - i);
      (Vec::load_partial(a + i, lanes) + Vec::load_partial(b + i, lanes)).store_partial(y + i, lanes);
    }
  });
}

// The largest of x[0..n) (n > 0), which softmax, log_sum_exp and cross_entropy subtract (-inf for
// an all -inf row; a NaN may or may not be seen: callers that care test for it).
inline float row_max(const float* x, int64_t n) {
  Vec vmax = Vec::set1(-INFINITY);
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) vmax = Vec::max(vmax, Vec::load(x + i));
  if (i < n) {
    const int lanes = int(n - i);
    vmax = Vec::max(vmax, Vec::select_first(lanes, Vec::load_partial(x + i, lanes), Vec::set1(-INFINITY)));
  }
  return vmax.reduce_max();
}

// log(sum_i exp(x_i)) of one row (n > 0), as max + log(sum exp(x - max)): the exps in registers
// (vexp), summed in float lanes over runs of 256 and the runs' sums in double, so the result
// is within a few float32 ulps of the float64 value at any length (GPT-2's 50,257 logits: a
// scalar double exp per logit took ~250 us of every scored position; this ~15). NaN when the row
// holds a NaN or +inf, or only -inf: no distribution to normalise.
double log_sum_exp(const float* x, int64_t n) {
  const float mx = row_max(x, n);
  int unordered = 0;  // (a NaN compares unequal to itself; vexp would clamp it to -88)
  int64_t i = 0;
  for (; i < n; ++i) unordered |= x[i] != x[i];
  if (unordered || !(mx < INFINITY) || !(mx > -INFINITY)) return NAN;
  constexpr int64_t kRun = 256;
  const Vec m = Vec::set1(mx);
  double total = 0.0;
  for (int64_t r = 0; r < n; r += kRun) {
    const int64_t end = r + kRun < n ? r + kRun : n;
    Vec sum = Vec::zero();
    for (i = r; i + Vec::W <= end; i += Vec::W) sum = sum + vexp(Vec::load(x + i) - m);
    if (i < end) sum = sum + Vec::select_first(int(end - i), vexp(Vec::load_partial(x + i, int(end - i)) - m), Vec::zero());
    total += double(sum.reduce_add());
  }
  return double(mx) + std::log(total);  // (in double: in float 1e8 + log 2 was 1e8, and x - it 0)
}

void softmax(const float* x, float* y, int64_t rows, int64_t cols) {
  llamas::parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * cols;
      float* yr = y + r * cols;
      Vec m = Vec::set1(row_max(xr, cols));
      Vec sum = Vec::zero();
      int64_t i = 0;
      for (; i + Vec::W <= cols; i += Vec::W) {
        Vec e = vexp(Vec::load(xr + i) - m);
        sum = sum + e;
        e.store(yr + i);
      }
      if (i < cols) {
        int lanes = int(cols - i);
        Vec e = Vec::select_first(lanes, vexp(Vec::load_partial(xr + i, lanes) - m), Vec::zero());
        sum = sum + e;
        e.store_partial(yr + i, lanes);
      }
      Vec inv = Vec::set1(1.0f / sum.reduce_add());
      for (i = 0; i + Vec::W <= cols; i += Vec::W) (Vec::load(yr + i) * inv).store(yr + i);
      if (i < cols) (Vec::load_partial(yr + i, int(cols - i)) * inv).store_partial(yr + i, int(cols - i));
    }
  });
}

}  // namespace
