#pragma once
// Training kernels written once against Vec: layernorm backward, GELU backward, the fused
// classifier (softmax + cross-entropy + dlogits in place), causal attention forward that keeps
// the log-sum-exp and a backward that recomputes the scores from it (no T x T matrix is stored),
// column sums (bias gradients) and AdamW. Every reduction runs in a fixed order on one thread, so
// results are identical run to run and at any thread count.
#include <cmath>
#include <cstring>

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

// dst[c0:c0+cols] += sum over rows of f(r, c) with one register pair per column block, rows in order.
template <typename RowTerm>
inline void column_block_sum(int64_t rows, int64_t c0, int64_t cols, float* dst, RowTerm term) {
  int l0 = clamp_lanes(cols), l1 = clamp_lanes(cols - Vec::W);
  Vec a0 = load_lanes(dst + c0, l0), a1 = load_lanes(dst + c0 + Vec::W, l1);
  for (int64_t r = 0; r < rows; ++r) {
    a0 = a0 + term(r, c0, l0);
    if (l1 > 0) a1 = a1 + term(r, c0 + Vec::W, l1);
  }
  store_lanes(dst + c0, a0, l0);
  if (l1 > 0) store_lanes(dst + c0 + Vec::W, a1, l1);
}

// out[n] += sum_r x[r, n]
void column_sum(const float* x, int64_t rows, int64_t N, float* out) {
  int64_t blocks = (N + kColBlock - 1) / kColBlock;
  llamas::parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c0 = b * kColBlock;
      column_block_sum(rows, c0, imin(kColBlock, N - c0), out,
                       [&](int64_t r, int64_t c, int lanes) { return load_lanes(x + r * N + c, lanes); });
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
      float mean, rstd;
      row_mean_rstd(xr, C, eps, &mean, &rstd);
      Vec vmean = Vec::set1(mean);
      stats[2 * r] = mean, stats[2 * r + 1] = rstd;
      Vec vrstd = Vec::set1(rstd);
      // Sums of dnorm = dout * w and of dnorm * xhat (partial loads are zero past the row end).
      Vec s1 = Vec::zero(), s2 = Vec::zero();
      for (int64_t i = 0; i < C; i += Vec::W) {
        int lanes = clamp_lanes(C - i);
        Vec dn = load_lanes(dr + i, lanes) * load_lanes(w + i, lanes);
        Vec xh = Vec::select_first(lanes, (load_lanes(xr + i, lanes) - vmean) * vrstd, Vec::zero());
        s1 = s1 + dn;
        s2 = Vec::fma(dn, xh, s2);
      }
      Vec m1 = Vec::set1(s1.reduce_add() / float(C)), m2 = Vec::set1(s2.reduce_add() / float(C));
      for (int64_t i = 0; i < C; i += Vec::W) {
        int lanes = clamp_lanes(C - i);
        Vec dn = load_lanes(dr + i, lanes) * load_lanes(w + i, lanes);
        Vec xh = (load_lanes(xr + i, lanes) - vmean) * vrstd;
        Vec g = (dn - m1 - xh * m2) * vrstd;
        store_lanes(dxr + i, (load_lanes(dxr + i, lanes) + g), lanes);
      }
    }
  });
  int64_t blocks = (C + kColBlock - 1) / kColBlock;
  llamas::parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c0 = b * kColBlock, cols = imin(kColBlock, C - c0);
      column_block_sum(rows, c0, cols, dw, [&](int64_t r, int64_t c, int lanes) {
        Vec xh = (load_lanes(x + r * C + c, lanes) - Vec::set1(stats[2 * r])) * Vec::set1(stats[2 * r + 1]);
        return load_lanes(dout + r * C + c, lanes) * xh;
      });
      column_block_sum(rows, c0, cols, db, [&](int64_t r, int64_t c, int lanes) {
        return load_lanes(dout + r * C + c, lanes);
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
      store_lanes(dx + i, (load_lanes(dy + i, lanes) * vgelu_grad(load_lanes(x + i, lanes))), lanes);
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
      if (targets[r] < 0) {  // kIgnoreTarget: no loss, no gradient
        losses[r] = 0.0f;
        if (grad_scale != 0.0f) std::memset(z, 0, size_t(V) * sizeof(float));
        continue;
      }
      const float mx = row_max(z, V);
      const float target_logit = z[targets[r]];
      Vec vm = Vec::set1(mx), sum = Vec::zero();
      int64_t i = 0;
      for (; i < V; i += Vec::W) {
        int lanes = clamp_lanes(V - i);
        Vec e = Vec::select_first(lanes, vexp(load_lanes(z + i, lanes) - vm), Vec::zero());
        sum = sum + e;
        if (grad_scale != 0.0f) store_lanes(z + i, e, lanes);
      }
      float total = sum.reduce_add();
      losses[r] = mx + std::log(total) - target_logit;
      if (grad_scale == 0.0f) continue;
      Vec k = Vec::set1(grad_scale / total);
      for (i = 0; i < V; i += Vec::W) {
        int lanes = clamp_lanes(V - i);
        store_lanes(z + i, (load_lanes(z + i, lanes) * k), lanes);
      }
      z[targets[r]] -= grad_scale;
    }
  });
}

// Query rows per attention tile: a 64 x T score tile (64 KiB at T = 256) stays in L2.
constexpr int64_t kAttnTile = 64;

inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, bool a_trans, const float* B,
                      BLayout layout, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  GemmArgs g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.lda = lda, g.a_trans = a_trans;
  g.B = B, g.b_layout = layout, g.ldb = ldb;
  g.C = C, g.ldc = ldc, g.accumulate = accumulate;
  gemm(g);  // called from inside a parallel task: its own parallel_for runs serially
}

// Row i of a score tile (keys 0..n-1): p_j = exp(scale s_j - shift) for j <= i, 0 after.
inline void masked_exp_row(float* s, int64_t n, int64_t i, float scale, float shift) {
  const Vec vscale = Vec::set1(scale), vshift = Vec::set1(shift);
  for (int64_t j = 0; j < n; j += Vec::W) {
    int lanes = clamp_lanes(n - j);
    Vec e = vexp(load_lanes(s + j, lanes) * vscale - vshift);
    e = Vec::select_first(clamp_lanes(i + 1 - j), e, Vec::zero());
    store_lanes(s + j, e, lanes);
  }
}

// Causal self-attention over qkv (B, T, 3C) rows [q | k | v], heads interleaved as GPT-2 packs
// them. out (B, T, C); lse (B, H, T) = log sum_j exp(score_ij), kept for the backward. Each
// (batch, head) is one task; 64-query tiles compute S = Q K^T and O = P V as small GEMMs that
// read q, k and v in place (row stride 3C).
void attention_forward(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t H, int64_t hd,
                       float scale) {
  const int64_t C = H * hd, C3 = 3 * C;
  llamas::parallel_for(B * H, 1, [&](int64_t t0, int64_t t1) {
    ScratchBuffer tile(static_cast<size_t>(kAttnTile * T));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* q = qkv + b * T * C3 + h * hd;
      const float* k = q + C;
      const float* v = q + 2 * C;
      float* o = out + b * T * C + h * hd;
      for (int64_t q0 = 0; q0 < T; q0 += kAttnTile) {
        const int64_t m = imin(kAttnTile, T - q0), nk = q0 + m;
        float* S = tile.data;
        tile_gemm(m, nk, hd, q + q0 * C3, C3, false, k, BLayout::NK, C3, S, nk, false);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = q0 + r;
          float* row = S + r * nk;
          float mx = -INFINITY;
          for (int64_t j = 0; j <= i; ++j) mx = row[j] > mx ? row[j] : mx;
          mx *= scale;
          masked_exp_row(row, nk, i, scale, mx);
          float sum = row_sum(row, i + 1);
          lse[task * T + i] = mx + std::log(sum);
          const Vec inv = Vec::set1(1.0f / sum);
          for (int64_t j = 0; j <= i; j += Vec::W) {
            int lanes = clamp_lanes(i + 1 - j);
            store_lanes(row + j, load_lanes(row + j, lanes) * inv, lanes);
          }
        }
        tile_gemm(m, hd, nk, S, nk, false, v, BLayout::KN, C3, o + q0 * C, C, false);
      }
    }
  });
}

// Backward of attention_forward, tile by tile, recomputing P = exp(scale Q K^T - lse) from the
// saved log-sum-exp (no T x T matrix is kept): dP = dO V^T, dS = P (dP - rowdot(dO, O)) scale,
// dQ = dS K, dK += dS^T Q, dV += P^T dO. dqkv is overwritten. Each (batch, head) is one task, so
// the sums into dK and dV run in order on one thread.
void attention_backward(const float* qkv, const float* out, const float* lse, const float* dout, float* dqkv,
                        int64_t B, int64_t T, int64_t H, int64_t hd, float scale) {
  const int64_t C = H * hd, C3 = 3 * C;
  llamas::parallel_for(B * H, 1, [&](int64_t t0, int64_t t1) {
    ScratchBuffer tiles(static_cast<size_t>(2 * kAttnTile * T));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* q = qkv + b * T * C3 + h * hd;
      const float* k = q + C;
      const float* v = q + 2 * C;
      const float* o = out + b * T * C + h * hd;
      const float* dO = dout + b * T * C + h * hd;
      float* dq = dqkv + b * T * C3 + h * hd;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < hd; ++d) dk[t * C3 + d] = 0.0f, dv[t * C3 + d] = 0.0f;
      for (int64_t q0 = 0; q0 < T; q0 += kAttnTile) {
        const int64_t m = imin(kAttnTile, T - q0), nk = q0 + m;
        float* P = tiles.data;
        float* dS = tiles.data + kAttnTile * T;
        tile_gemm(m, nk, hd, q + q0 * C3, C3, false, k, BLayout::NK, C3, P, nk, false);
        tile_gemm(m, nk, hd, dO + q0 * C, C, false, v, BLayout::NK, C3, dS, nk, false);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = q0 + r;
          float* prow = P + r * nk;
          float* drow = dS + r * nk;
          masked_exp_row(prow, nk, i, scale, lse[task * T + i]);
          const Vec Di = Vec::set1(dot(dO + i * C, o + i * C, hd)), vscale = Vec::set1(scale);
          for (int64_t j = 0; j < nk; j += Vec::W) {
            int lanes = clamp_lanes(nk - j);
            Vec ds = load_lanes(prow + j, lanes) * (load_lanes(drow + j, lanes) - Di) * vscale;
            store_lanes(drow + j, ds, lanes);
          }
        }
        tile_gemm(m, hd, nk, dS, nk, false, k, BLayout::KN, C3, dq + q0 * C3, C3, false);
        tile_gemm(nk, hd, m, dS, nk, true, q + q0 * C3, BLayout::KN, C3, dk, C3, true);
        tile_gemm(nk, hd, m, P, nk, true, dO + q0 * C, BLayout::KN, C, dv, C3, true);
      }
    }
  });
}

// Sum of squares of x[0:n] in float with one vector accumulator (callers sum fixed-size chunks in
// double, in order, for the global gradient norm).
float sum_squares(const float* x, int64_t n) {
  Vec acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::W) {
    Vec v = load_lanes(x + i, clamp_lanes(n - i));
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
      Vec g = load_lanes(grad + i, lanes) * gs;
      Vec mi = Vec::fma(b1, load_lanes(m + i, lanes), c1 * g);
      Vec vi = Vec::fma(b2, load_lanes(v + i, lanes), c2 * g * g);
      Vec denom = Vec::fma(Vec::sqrt(vi), inv_sqrt_bc2, eps);
      Vec pi = load_lanes(p + i, lanes) * decay - step * (mi / denom);
      store_lanes(m + i, mi, lanes);
      store_lanes(v + i, vi, lanes);
      store_lanes(p + i, pi, lanes);
    }
  });
}

}  // namespace
