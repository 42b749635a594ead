// Plain loops for the training kernels (cpu/train_impl.h), in double where a sum is long: the
// tests and the kernel benchmark compare the fast kernels to these.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/reference.h"

namespace llamas {
namespace cpu {
namespace reference {

void layernorm_backward(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                        int64_t rows, int64_t C, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    const float* d = dout + r * C;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < C; ++i) mean += xr[i];
    mean /= double(C);
    for (int64_t i = 0; i < C; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / double(C) + eps);
    double m1 = 0, m2 = 0;  // means of dout * w and of dout * w * xhat
    for (int64_t i = 0; i < C; ++i) {
      const double xhat = (xr[i] - mean) * rstd;
      m1 += double(d[i]) * w[i];
      m2 += double(d[i]) * w[i] * xhat;
      dw[i] += float(d[i] * xhat);
      db[i] += d[i];
    }
    m1 /= double(C), m2 /= double(C);
    for (int64_t i = 0; i < C; ++i) {
      const double xhat = (xr[i] - mean) * rstd;
      dx[r * C + i] += float((double(d[i]) * w[i] - m1 - xhat * m2) * rstd);
    }
  }
}

void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  const double s = 0.7978845608028654;
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i], t = std::tanh(s * (v + 0.044715 * v * v * v));
    dx[i] = float(dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * s * (1 + 3 * 0.044715 * v * v)));
  }
}

void cross_entropy(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V, float grad_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* z = logits + r * V;
    if (targets[r] < 0) {  // kIgnoreTarget
      losses[r] = 0.0f;
      if (grad_scale != 0.0f) std::fill(z, z + V, 0.0f);
      continue;
    }
    // The maximum in float (exact), widened once: a double fmax-reduction over float inputs crashes
    // GCC 12's aarch64 vectoriser (internal compiler error in vect_transform_reduction).
    float row_max = z[0];
    for (int64_t i = 1; i < V; ++i) row_max = std::fmax(row_max, z[i]);
    double mx = row_max, sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(z[i] - mx);
    losses[r] = float(mx + std::log(sum) - z[targets[r]]);
    if (grad_scale == 0.0f) continue;
    for (int64_t i = 0; i < V; ++i) z[i] = float(std::exp(z[i] - mx) / sum * grad_scale);
    z[targets[r]] -= grad_scale;
  }
}

void attention_backward(const float* qkv, const float* dout, float* dqkv, int64_t B, int64_t T, int64_t H,
                        int64_t hd) {
  const int64_t C = H * hd, C3 = 3 * C;
  const double scale = 1.0 / std::sqrt(double(hd));
  for (int64_t i = 0; i < B * T * C3; ++i) dqkv[i] = 0.0f;
  std::vector<double> p(T), dp(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto q = [&](int64_t t) { return qkv + (b * T + t) * C3 + h * hd; };
      auto k = [&](int64_t t) { return q(t) + C; };
      auto v = [&](int64_t t) { return q(t) + 2 * C; };
      auto dq = [&](int64_t t) { return dqkv + (b * T + t) * C3 + h * hd; };
      for (int64_t i = 0; i < T; ++i) {
        // Forward row i: softmax over keys 0..i, then out_i; backward through both.
        const float* dO = dout + (b * T + i) * C + h * hd;
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t d = 0; d < hd; ++d) s += double(q(i)[d]) * k(j)[d];
          p[j] = s * scale;
          mx = std::fmax(mx, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        double D = 0;
        for (int64_t j = 0; j <= i; ++j) {
          p[j] /= sum;
          dp[j] = 0;
          for (int64_t d = 0; d < hd; ++d) dp[j] += double(dO[d]) * v(j)[d];
          D += p[j] * dp[j];
        }
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - D) * scale;
          for (int64_t d = 0; d < hd; ++d) {
            dq(i)[d] += float(ds * k(j)[d]);
            dq(j)[C + d] += float(ds * q(i)[d]);
            dq(j)[2 * C + d] += float(p[j] * dO[d]);
          }
        }
      }
    }
}

void adamw(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWArgs& a) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = double(grad[i]) * a.grad_scale;
    m[i] = float(a.beta1 * double(m[i]) + (1 - a.beta1) * g);
    v[i] = float(a.beta2 * double(v[i]) + (1 - a.beta2) * g * g);
    const double denom = std::sqrt(double(v[i])) / std::sqrt(double(a.bias_correction2)) + a.eps;
    p[i] = float(double(p[i]) * (1 - double(a.lr) * a.weight_decay) - a.lr / a.bias_correction1 * m[i] / denom);
  }
}

}  // namespace reference
}  // namespace cpu
}  // namespace llamas
