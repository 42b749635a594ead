// The avx2 kernel variant: the shared kernel code compiled against vec_avx2.h.
#include "cpu/vec_avx2.h"
#include "cpu/variant_table_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* avx2_kernel_table() { return this_variant_table(); }

}  // namespace cpu
}  // namespace llamas
