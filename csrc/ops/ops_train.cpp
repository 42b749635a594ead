// Dispatch for the training ops (see llamas/ops.h): argument checks, profile scopes, CPU kernels.
#include <cmath>
#include <vector>

#include "cpu/kernel_table.h"
#include "llamas/error.h"
#include "llamas/ops.h"
#include "llamas/parallel.h"
#include "llamas/profiler.h"

namespace llamas {
namespace ops {

void column_sum(const float* x, int64_t rows, int64_t N, float* out) {
  ProfileScope scope("bias_backward");
  cpu::kernels().column_sum(x, rows, N, out);
}

void layernorm_backward(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                        int64_t rows, int64_t C, float eps) {
  ProfileScope scope("layernorm_backward");
  std::vector<float> stats(2 * rows);
  cpu::kernels().layernorm_backward(dout, x, w, dx, dw, db, stats.data(), rows, C, eps);
}

void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  ProfileScope scope("gelu_backward");
  cpu::kernels().gelu_backward(x, dy, dx, n);
}

void check_targets(const int32_t* targets, int64_t rows, int64_t V) {
  for (int64_t r = 0; r < rows; ++r)
    LLAMAS_CHECK(valid_target(targets[r], V), "cross_entropy", "target ", targets[r], " at row ", r,
                 " is out of the vocabulary [0, ", V, ") and not ", kIgnoreTarget, " (ignored)");
}

void cross_entropy(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V, float grad_scale) {
  ProfileScope scope("cross_entropy");
  check_targets(targets, rows, V);
  cpu::kernels().cross_entropy(logits, targets, losses, rows, V, grad_scale);
}

void attention_forward(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t H, int64_t hd,
                       float scale) {
  ProfileScope scope("attention");
  LLAMAS_CHECK(T <= cpu::kTrainAttentionMaxT, "attention", "training sequence length ", T, " exceeds ",
               cpu::kTrainAttentionMaxT);
  cpu::kernels().attention_forward(qkv, out, lse, B, T, H, hd, scale);
}

void attention_backward(const float* qkv, const float* out, const float* lse, const float* dout, float* dqkv,
                        int64_t B, int64_t T, int64_t H, int64_t hd, float scale) {
  ProfileScope scope("attention_backward");
  LLAMAS_CHECK(T <= cpu::kTrainAttentionMaxT, "attention_backward", "training sequence length ", T, " exceeds ",
               cpu::kTrainAttentionMaxT);
  cpu::kernels().attention_backward(qkv, out, lse, dout, dqkv, B, T, H, hd, scale);
}

void embedding_backward(const int32_t* ids, const int64_t* positions, int64_t n, const float* dx, float* dwte,
                        float* dwpe, int64_t C) {
  ProfileScope scope("embedding_backward");
  // 64 columns per range: each thread owns whole cache lines of every table row it touches.
  parallel_for(C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i) {
      const float* src = dx + i * C;
      float* te = dwte + int64_t(ids[i]) * C;
      float* pe = dwpe + positions[i] * C;
      for (int64_t c = c0; c < c1; ++c) {
        te[c] += src[c];
        pe[c] += src[c];
      }
    }
  });
}

double sum_squares(const float* x, int64_t n) {
  ProfileScope scope("grad_norm");
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      partial[c] = cpu::kernels().sum_squares(x + begin, len);
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

void adamw(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWArgs& args) {
  ProfileScope scope("adamw");
  cpu::kernels().adamw(p, grad, m, v, n, args);
}

}  // namespace ops
}  // namespace llamas
