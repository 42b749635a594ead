#pragma once
// Writing one position into a KV cache block, in the layout kernel_args.h describes (keys
// transposed, [head][head_dim][kKvBlockSize]; values [head][kKvBlockSize][head_dim]): the one
// place that layout is written, for the model's KvCache and for ops::attention's temporary cache.
#include <cstdint>

#include "llamas/bfloat16.h"
#include "llamas/kernel_args.h"

namespace llamas {

// Position `slot` (0..kKvBlockSize-1) of a block: every head's keys k[h * head_dim + d] and
// values v[...], rounded to the block's entry type T (float or bfloat16 as uint16_t).
template <typename T>
inline void kv_block_write(T* key_block, T* value_block, int n_head, int head_dim, int64_t slot, const float* k,
                           const float* v) {
  for (int h = 0; h < n_head; ++h) {
    const float* kh = k + int64_t(h) * head_dim;
    const float* vh = v + int64_t(h) * head_dim;
    T* kt = key_block + int64_t(h) * head_dim * kKvBlockSize + slot;
    T* vrow = value_block + (int64_t(h) * kKvBlockSize + slot) * head_dim;
    for (int d = 0; d < head_dim; ++d) {
      kt[d * kKvBlockSize] = float_as<T>(kh[d]);
      vrow[d] = float_as<T>(vh[d]);
    }
  }
}

}  // namespace llamas
