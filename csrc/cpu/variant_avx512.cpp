// The avx512 kernel variant: the shared kernel code compiled against vec_avx512.h.
#include "cpu/vec_avx512.h"
#include "cpu/variant_table_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* avx512_kernel_table() { return this_variant_table(); }

}  // namespace cpu
}  // namespace llamas
