// The neon kernel variant (AArch64): the shared kernel code compiled against vec_neon.h.
#include "cpu/vec_neon.h"
#include "cpu/variant_table_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* neon_kernel_table() { return this_variant_table(); }

}  // namespace cpu
}  // namespace llamas
