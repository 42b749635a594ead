// The generic kernel variant: the shared kernel code compiled against vec_generic.h.
#include "cpu/vec_generic.h"
#include "cpu/variant_table_impl.h"

namespace llamas {
namespace cpu {

const KernelTable* generic_kernel_table() { return this_variant_table(); }

}  // namespace cpu
}  // namespace llamas
