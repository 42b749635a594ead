#pragma once
// The shared kernel code, compiled against whichever vec_*.h the including variant file put
// first, and the table of its entry points. Each variant_*.cpp includes its Vec header, then this,
// and returns this_variant_table() under its own name.
#include "cpu/kernel_table.h"
#include "cpu/math_impl.h"
#include "cpu/gemm_impl.h"
#include "cpu/norm_impl.h"
#include "cpu/attention_impl.h"
#include "cpu/train_impl.h"

namespace {

const llamas::cpu::KernelTable* this_variant_table() {
  static const llamas::cpu::KernelTable table = {kVariantName, gemm, layernorm, residual_layernorm, gelu, softmax,
      log_sum_exp, add, attention, column_sum, layernorm_backward, gelu_backward, cross_entropy, attention_forward,
      attention_backward, sum_squares, adamw, bf16_dot_native, i8_dot_native};
  return &table;
}

}  // namespace
