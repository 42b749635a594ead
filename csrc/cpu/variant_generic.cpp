// The generic kernel variant: the shared kernel code compiled against vec_generic.h.
#include "cpu/kernel_table.h"
#include "cpu/vec_generic.h"
#include "cpu/math_impl.h"
#include "cpu/gemm_impl.h"
#include "cpu/norm_impl.h"
#include "cpu/attention_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* generic_kernel_table() {
  static const KernelTable table = {kVariantName, gemm, layernorm, residual_layernorm, gelu, softmax, add, attention};
  return &table;
}

}  // namespace cpu
}  // namespace llamas
