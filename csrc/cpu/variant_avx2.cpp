// The avx2 kernel variant: the shared kernel code compiled against vec_avx2.h.
#include "cpu/kernel_table.h"
#include "cpu/vec_avx2.h"
#include "cpu/math_impl.h"
#include "cpu/gemm_impl.h"
#include "cpu/norm_impl.h"
#include "cpu/attention_impl.h"
#include "cpu/train_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* avx2_kernel_table() {
  static const KernelTable table = {kVariantName, gemm, layernorm, residual_layernorm, gelu, softmax, add, attention,
      column_sum, layernorm_backward, gelu_backward, cross_entropy, attention_forward, attention_backward,
      sum_squares, adamw, bf16_dot_native, i8_dot_native};
  return &table;
}

}  // namespace cpu
}  // namespace llamas
