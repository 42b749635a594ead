#pragma once
// Training kernels written once against Vec: layernorm backward, GELU backward, the fused
// classifier (softmax + cross-entropy + dlogits in place), causal attention forward that keeps
// the log-sum-exp and a backward that recomputes the scores from it (no T x T matrix is stored),
// column sums (bias gradients) and AdamW. Every reduction runs in a fixed order on one thread, so
// results are identical run to run and at any thread count.
#include <cmath>

#include "llamas/parallel.h"

namespace {

// Columns per block of the column-parallel reductions: 2 registers = 64 bytes with AVX2.
constexpr int64_t kColBlock = 2 * Vec::W;

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc = Vec::zero();
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) acc = Vec::fma(Vec::load(a + i), Vec::load(b + i), acc);
  if (i < n) acc = Vec::fma(Vec::load_partial(a + i, int(n - i)), Vec::load_partial(b + i, int(n - i)), acc);
  return acc.reduce_add();
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  Vec va = Vec::set1(a);
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) Vec::fma(va, Vec::load(x + i), Vec::load(y + i)).store(y + i);
  if (i < n) {
    int lanes = int(n - i);
    Vec::fma(va, Vec::load_partial(x + i, lanes), Vec::load_partial(y + i, lanes)).store_partial(y + i, lanes);
  }
}

// dst[c0:c0+cols] += sum over rows of f(r, c) with one register pair per column block, rows in order.
template <typename RowTerm>
inline void column_block_sum(int64_t rows, int64_t c0, int64_t cols, float* dst, RowTerm term) {
  int l0 = clamp_lanes(cols), l1 = clamp_lanes(cols - Vec::W);
  Vec a0 = Vec::load_partial(dst + c0, l0), a1 = Vec::load_partial(dst + c0 + Vec::W, l1);
  for (int64_t r = 0; r < rows; ++r) {
    a0 = a0 + term(r, c0, l0);
    if (l1 > 0) a1 = a1 + term(r, c0 + Vec::W, l1);
  }
  a0.store_partial(dst + c0, l0);
  if (l1 > 0) a1.store_partial(dst + c0 + Vec::W, l1);
}

// out[n] += sum_r x[r, n]
void column_sum(const float* x, int64_t rows, int64_t N, float* out) {
  int64_t blocks = (N + kColBlock - 1) / kColBlock;
  llamas::parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c0 = b * kColBlock;
      column_block_sum(rows, c0, imin(kColBlock, N - c0), out,
                       [&](int64_t r, int64_t c, int lanes) { return Vec::load_partial(x + r * N + c, lanes); });
    }
  });
}

// Layernorm backward. dx += dLN/dx; dw += sum_r dout * xhat; db += sum_r dout. Mean and rstd are
// recomputed exactly as the forward computes them and kept in `stats` (2 floats per row) for the
// column pass.
void layernorm_backward(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                        float* stats, int64_t rows, int64_t C, float eps) {
  llamas::parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* dr = dout + r * C;
      float* dxr = dx + r * C;
      float mean = row_sum(xr, C) / float(C);
      Vec vmean = Vec::set1(mean);
      Vec var_acc = Vec::zero();
      int64_t i = 0;
      for (; i + Vec::W <= C; i += Vec::W) {
        Vec d = Vec::load(xr + i) - vmean;
        var_acc = Vec::fma(d, d, var_acc);
      }
      if (i < C) {
        int lanes = int(C - i);
        Vec d = Vec::select_first(lanes, Vec::load_partial(xr + i, lanes) - vmean, Vec::zero());
        var_acc = Vec::fma(d, d, var_acc);
      }
      float rstd = 1.0f / std::sqrt(var_acc.reduce_add() / float(C) + eps);
      stats[2 * r] = mean, stats[2 * r + 1] = rstd;
      Vec vrstd = Vec::set1(rstd);
      // Sums of dnorm = dout * w and of dnorm * xhat (partial loads are zero past the row end).
      Vec s1 = Vec::zero(), s2 = Vec::zero();
      for (i = 0; i < C; i += Vec::W) {
        int lanes = clamp_lanes(C - i);
        Vec dn = Vec::load_partial(dr + i, lanes) * Vec::load_partial(w + i, lanes);
        Vec xh = Vec::select_first(lanes, (Vec::load_partial(xr + i, lanes) - vmean) * vrstd, Vec::zero());
        s1 = s1 + dn;
        s2 = Vec::fma(dn, xh, s2);
      }
      Vec m1 = Vec::set1(s1.reduce_add() / float(C)), m2 = Vec::set1(s2.reduce_add() / float(C));
      for (i = 0; i < C; i += Vec::W) {
        int lanes = clamp_lanes(C - i);
        Vec dn = Vec::load_partial(dr + i, lanes) * Vec::load_partial(w + i, lanes);
        Vec xh = (Vec::load_partial(xr + i, lanes) - vmean) * vrstd;
        Vec g = (dn - m1 - xh * m2) * vrstd;
        (Vec::load_partial(dxr + i, lanes) + g).store_partial(dxr + i, lanes);
      }
    }
  });
  int64_t blocks = (C + kColBlock - 1) / kColBlock;
  llamas::parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c0 = b * kColBlock, cols = imin(kColBlock, C - c0);
      column_block_sum(rows, c0, cols, dw, [&](int64_t r, int64_t c, int lanes) {
        Vec xh = (Vec::load_partial(x + r * C + c, lanes) - Vec::set1(stats[2 * r])) * Vec::set1(stats[2 * r + 1]);
        return Vec::load_partial(dout + r * C + c, lanes) * xh;
      });
      column_block_sum(rows, c0, cols, db, [&](int64_t r, int64_t c, int lanes) {
        return Vec::load_partial(dout + r * C + c, lanes);
      });
    }
  });
}

// d/dx of 0.5 x (1 + tanh(u)), u = s (x + 0.044715 x^3). With sig = 1 / (1 + e^(-2u)) = 0.5 (1 + tanh u)
// and 1 - tanh^2 u = 4 sig (1 - sig): gelu'(x) = sig + 2 x sig (1 - sig) s (1 + 0.134145 x^2).
inline Vec vgelu_grad(Vec x) {
  const Vec s = Vec::set1(0.7978845608028654f);
  Vec x2 = x * x;
  Vec u = Vec::fma(Vec::set1(0.044715f) * x2, x, x) * s;
  Vec sig = Vec::set1(1.0f) / (Vec::set1(1.0f) + vexp(u * Vec::set1(-2.0f)));
  Vec du = s * Vec::fma(Vec::set1(0.134145f), x2, Vec::set1(1.0f));
  return Vec::fma(Vec::set1(2.0f) * x * sig * (Vec::set1(1.0f) - sig), du, sig);
}

// dx = dy * gelu'(x)
void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  llamas::parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += Vec::W) {
      int lanes = clamp_lanes(i1 - i);
      (Vec::load_partial(dy + i, lanes) * vgelu_grad(Vec::load_partial(x + i, lanes))).store_partial(dx + i, lanes);
    }
  });
}

// The fused classifier, per row: loss = logsumexp(z) - z[target]; when grad_scale != 0 the row is
// overwritten in place by grad_scale * (softmax(z) - onehot(target)), so the logits buffer becomes
// dlogits and no second vocabulary-sized buffer exists.
void cross_entropy(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V, float grad_scale) {
  llamas::parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* z = logits + r * V;
      Vec vmax = Vec::set1(-INFINITY);
      int64_t i = 0;
      for (; i + Vec::W <= V; i += Vec::W) vmax = Vec::max(vmax, Vec::load(z + i));
      float mx = vmax.reduce_max();
      for (; i < V; ++i) mx = z[i] > mx ? z[i] : mx;
      const float target_logit = z[targets[r]];
      Vec vm = Vec::set1(mx), sum = Vec::zero();
      for (i = 0; i < V; i += Vec::W) {
        int lanes = clamp_lanes(V - i);
        Vec e = Vec::select_first(lanes, vexp(Vec::load_partial(z + i, lanes) - vm), Vec::zero());
        sum = sum + e;
        if (grad_scale != 0.0f) e.store_partial(z + i, lanes);
      }
      float total = sum.reduce_add();
      losses[r] = mx + std::log(total) - target_logit;
      if (grad_scale == 0.0f) continue;
      Vec k = Vec::set1(grad_scale / total);
      for (i = 0; i < V; i += Vec::W) {
        int lanes = clamp_lanes(V - i);
        (Vec::load_partial(z + i, lanes) * k).store_partial(z + i, lanes);
      }
      z[targets[r]] -= grad_scale;
    }
  });
}

// Longest sequence the training attention handles: one row of scores lives on the stack.
constexpr int64_t kTrainMaxT = llamas::cpu::kTrainAttentionMaxT;

inline void exp_shifted(float* s, int64_t n, float shift) {
  Vec vs = Vec::set1(shift);
  for (int64_t j = 0; j < n; j += Vec::W) {
    int lanes = clamp_lanes(n - j);
    vexp(Vec::load_partial(s + j, lanes) - vs).store_partial(s + j, lanes);
  }
}

// Causal self-attention over qkv (B, T, 3C) rows [q | k | v], heads interleaved as GPT-2 packs
// them. out (B, T, C); lse (B, H, T) = log sum_j exp(score_ij), kept for the backward.
void attention_forward(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t H, int64_t hd,
                       float scale) {
  const int64_t C = H * hd, C3 = 3 * C;
  llamas::parallel_for(B * H, 1, [&](int64_t t0, int64_t t1) {
    float scores[kTrainMaxT];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* base = qkv + b * T * C3 + h * hd;
      for (int64_t i = 0; i < T; ++i) {
        const float* q = base + i * C3;
        float mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          scores[j] = dot(q, base + j * C3 + C, hd) * scale;
          mx = scores[j] > mx ? scores[j] : mx;
        }
        exp_shifted(scores, i + 1, mx);
        float* o = out + (b * T + i) * C + h * hd;
        for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
        float sum = 0.0f;
        for (int64_t j = 0; j <= i; ++j) {
          sum += scores[j];
          axpy(scores[j], base + j * C3 + 2 * C, o, hd);
        }
        float inv = 1.0f / sum;
        for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
        lse[task * T + i] = mx + std::log(sum);
      }
    }
  });
}

// Backward of attention_forward: p_ij = exp(score_ij - lse_i) is recomputed row by row;
// dv_j += p_ij do_i, ds_ij = p_ij (do_i . v_j - do_i . o_i), dq_i += scale ds_ij k_j,
// dk_j += scale ds_ij q_i. dqkv is overwritten. Each (batch, head) is one task, so the sums over
// i into dk and dv run in order on one thread.
void attention_backward(const float* qkv, const float* out, const float* lse, const float* dout, float* dqkv,
                        int64_t B, int64_t T, int64_t H, int64_t hd, float scale) {
  const int64_t C = H * hd, C3 = 3 * C;
  llamas::parallel_for(B * H, 1, [&](int64_t t0, int64_t t1) {
    float p[kTrainMaxT];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* base = qkv + b * T * C3 + h * hd;
      float* dbase = dqkv + b * T * C3 + h * hd;
      for (int64_t i = 0; i < T; ++i)
        for (int part = 0; part < 3; ++part)
          for (int64_t d = 0; d < hd; ++d) dbase[i * C3 + part * C + d] = 0.0f;
      for (int64_t i = 0; i < T; ++i) {
        const float* q = base + i * C3;
        const float* o = out + (b * T + i) * C + h * hd;
        const float* dout_i = dout + (b * T + i) * C + h * hd;
        const float Di = dot(dout_i, o, hd);
        for (int64_t j = 0; j <= i; ++j) p[j] = dot(q, base + j * C3 + C, hd) * scale;
        exp_shifted(p, i + 1, lse[task * T + i]);
        float* dq = dbase + i * C3;
        for (int64_t j = 0; j <= i; ++j) {
          const float* v = base + j * C3 + 2 * C;
          float ds = p[j] * (dot(dout_i, v, hd) - Di) * scale;
          axpy(ds, base + j * C3 + C, dq, hd);
          axpy(ds, q, dbase + j * C3 + C, hd);
          axpy(p[j], dout_i, dbase + j * C3 + 2 * C, hd);
        }
      }
    }
  });
}

// Sum of squares of x[0:n] in float with one vector accumulator (callers sum fixed-size chunks in
// double, in order, for the global gradient norm).
float sum_squares(const float* x, int64_t n) {
  Vec acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::W) {
    Vec v = Vec::load_partial(x + i, clamp_lanes(n - i));
    acc = Vec::fma(v, v, acc);
  }
  return acc.reduce_add();
}

// AdamW, as torch.optim.AdamW: g = grad * grad_scale (the clip coefficient);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p *= 1 - lr wd;
// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), with bc_i = 1 - b_i^t.
void adamw(float* p, const float* grad, float* m, float* v, int64_t n, const llamas::AdamWArgs& a) {
  const Vec b1 = Vec::set1(a.beta1), c1 = Vec::set1(1.0f - a.beta1);
  const Vec b2 = Vec::set1(a.beta2), c2 = Vec::set1(1.0f - a.beta2);
  const Vec gs = Vec::set1(a.grad_scale), decay = Vec::set1(1.0f - a.lr * a.weight_decay);
  const Vec step = Vec::set1(a.lr / a.bias_correction1);
  const Vec inv_sqrt_bc2 = Vec::set1(1.0f / std::sqrt(a.bias_correction2));
  const Vec eps = Vec::set1(a.eps);
  llamas::parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += Vec::W) {
      int lanes = clamp_lanes(i1 - i);
      Vec g = Vec::load_partial(grad + i, lanes) * gs;
      Vec mi = Vec::fma(b1, Vec::load_partial(m + i, lanes), c1 * g);
      Vec vi = Vec::fma(b2, Vec::load_partial(v + i, lanes), c2 * g * g);
      Vec denom = Vec::fma(Vec::sqrt(vi), inv_sqrt_bc2, eps);
      Vec pi = Vec::load_partial(p + i, lanes) * decay - step * (mi / denom);
      mi.store_partial(m + i, lanes);
      vi.store_partial(v + i, lanes);
      pi.store_partial(p + i, lanes);
    }
  });
}

}  // namespace
