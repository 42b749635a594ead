#pragma once
// The CPU kernels, one table per instruction-set variant (generic, avx2, avx512). The variant is
// chosen once at run time from CPUID (LLAMAS_KERNEL=generic|avx2|avx512 overrides it), so one
// build runs on any x86-64. Every entry has a plain reference in reference.h.
#include <cstdint>
#include <string>
#include <vector>

#include "llamas/kernel_args.h"

namespace llamas {
namespace cpu {

using llamas::AdamWArgs;
using llamas::AttentionArgs;
using llamas::BLayout;
using llamas::GemmArgs;
using llamas::kKvBlockSize;

struct KernelTable {
  const char* name;
  void (*gemm)(const GemmArgs& args);
  // out = LN(x) * w + b over rows of C floats.
  void (*layernorm)(const float* x, const float* w, const float* b, float* out, int64_t rows,
                    int64_t C, float eps);
  // x += delta (the residual stream), then out = LN(x) * w + b.
  void (*residual_layernorm)(float* x, const float* delta, const float* w, const float* b,
                             float* out, int64_t rows, int64_t C, float eps);
  void (*gelu)(const float* x, float* y, int64_t n);
  void (*softmax)(const float* x, float* y, int64_t rows, int64_t cols);
  // log(sum exp(x)) of one row of n > 0 floats (log-probabilities' normaliser); NaN when the row
  // holds a NaN or +inf, or only -inf.
  double (*log_sum_exp)(const float* x, int64_t n);  // (double: x - it stays exact at |x| ~ 1e8)
  void (*add)(const float* a, const float* b, float* y, int64_t n);
  // Causal attention of several sequences' query rows over their paged KV caches.
  void (*attention)(const AttentionArgs* seqs, int n_seqs);

  // ---- training (cpu/train_impl.h) ----
  void (*column_sum)(const float* x, int64_t rows, int64_t N, float* out);  // out += column sums
  void (*layernorm_backward)(const float* dout, const float* x, const float* w, float* dx, float* dw, float* db,
                             float* stats, int64_t rows, int64_t C, float eps);
  void (*gelu_backward)(const float* x, const float* dy, float* dx, int64_t n);
  void (*cross_entropy)(float* logits, const int32_t* targets, float* losses, int64_t rows, int64_t V,
                        float grad_scale);
  void (*attention_forward)(const float* qkv, float* out, float* lse, int64_t B, int64_t T, int64_t H,
                            int64_t hd, float scale);
  void (*attention_backward)(const float* qkv, const float* out, const float* lse, const float* dout,
                             float* dqkv, int64_t B, int64_t T, int64_t H, int64_t hd, float scale);
  float (*sum_squares)(const float* x, int64_t n);
  void (*adamw)(float* p, const float* grad, float* m, float* v, int64_t n, const AdamWArgs& args);

  // Whether GEMMs with bfloat16 activations (GemmArgs::a_bf16) run VDPBF16PS here (AVX512_BF16 in
  // both the CPU and this variant's build), rather than the same sums as two FMAs a pair.
  bool (*bf16_dot_native)();
  // Whether GEMMs with int8 activations (GemmArgs::a_i8) run VPDPBUSD here (AVX512_VNNI in the
  // CPU and a compiler that targets it), rather than integer dots without it.
  bool (*i8_dot_native)();
};

// Longest training sequence: each thread's attention tiles hold 2 x 64 x T floats (2 MiB at 4096).
constexpr int64_t kTrainAttentionMaxT = 4096;

const KernelTable& kernels();
// The variants this machine can run, best first.
std::vector<std::string> available_variants();
// Chooses a variant by name; throws if the CPU cannot run it.
void set_variant(const std::string& name);

}  // namespace cpu
}  // namespace llamas
