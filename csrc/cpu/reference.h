#pragma once
// Plain, obviously-correct loops beside the fast kernels: the benchmarks validate against them
// before timing, and tests compare the fast kernels to them.
#include "llamas/kernel_args.h"

namespace llamas {
namespace cpu {
namespace reference {

// One std::fma chain per element over k ascending, from the bias: bit-identical to the fast GEMM
// on CPUs with hardware FMA.
void gemm(const GemmArgs& args);
// Naive causal attention: full score row, max-subtracted softmax, weighted sum of values.
void attention(const AttentionArgs& args);
void layernorm(const float* x, const float* w, const float* b, float* out, int64_t rows, int64_t C, float eps);

}  // namespace reference
}  // namespace cpu
}  // namespace llamas
