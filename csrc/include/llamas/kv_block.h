#pragma once
// Writing one position into a KV cache block, in the layout kernel_args.h describes (keys
// transposed, [head][head_dim][kKvBlockSize]; values [head][kKvBlockSize][head_dim]): the one
// place that layout is written, for the model's KvCache, ops::attention's temporary cache and
// decode attention's own writes (AttentionArgs::new_k).
#include <cstdint>
#include <type_traits>

#include "llamas/bfloat16.h"
#include "llamas/int8.h"
#include "llamas/kernel_args.h"

namespace llamas {

// These functions are static (as in bfloat16.h and int8.h): the kernel variant files include them
// compiled with AVX flags, and a copy the compiler did not inline must stay private to its file,
// never merged with the copies other files call on CPUs without AVX (tools/x86_baseline_check.sh).

// An int8 region's scales (after its n_head * head_dim * 16 entries): [head][kKvBlockSize].
static inline float* kv_i8_scales(int8_t* region, int n_head, int head_dim) {
  return reinterpret_cast<float*>(region + int64_t(n_head) * head_dim * kKvBlockSize);
}
static inline const float* kv_i8_scales(const int8_t* region, int n_head, int head_dim) {
  return reinterpret_cast<const float*>(region + int64_t(n_head) * head_dim * kKvBlockSize);
}

// Positions [slot, slot + n) of a block (n = 1: a decode step's one; more: a prompt's rows, row i's
// keys at k + i * stride and values at v + i * stride): heads [h0, h1)'s keys k[h * head_dim + d]
// and values v[...], rounded to the block's entry type T (float, bfloat16 as uint16_t, or int8
// with a scale per head and position; n_head, the heads a region holds, places int8's scales).
// float32 and bfloat16 fill each transposed key line (16 positions of one head dimension) in one
// pass over the rows, which sit in L1 under it (16 rows of a head: 4 KiB); a position at a time
// touched the same 64 lines per head once per row, and the 768 of a row's 12 heads of 64 did not
// stay in L1 from one row to the next. GPT-2 124M's 512-token prefill, builds alternated 3 times:
// its KV writes 4.3-4.8 -> 3.1-3.5 ms.
template <typename T>
static inline void kv_block_write_heads(T* key_block, T* value_block, int h0, int h1, int head_dim, int64_t slot,
                                        const float* k, const float* v, int n_head, int64_t n = 1,
                                        int64_t stride = 0) {
  if constexpr (std::is_same_v<T, int8_t>) {
    float* k_scales = kv_i8_scales(key_block, n_head, head_dim);
    float* v_scales = kv_i8_scales(value_block, n_head, head_dim);
    for (int64_t i = 0; i < n; ++i)
      for (int h = h0; h < h1; ++h) {
        const int64_t at = i * stride + int64_t(h) * head_dim, s = slot + i;
        k_scales[h * kKvBlockSize + s] = quantize_int8(k + at, head_dim, 1,
                                                       key_block + int64_t(h) * head_dim * kKvBlockSize + s,
                                                       kKvBlockSize);
        v_scales[h * kKvBlockSize + s] = quantize_int8(v + at, head_dim, 1,
                                                       value_block + (int64_t(h) * kKvBlockSize + s) * head_dim, 1);
      }
  } else {
    for (int h = h0; h < h1; ++h) {
      const int64_t at = int64_t(h) * head_dim;
      T* kt = key_block + at * kKvBlockSize + slot;
      for (int d = 0; d < head_dim; ++d)
        for (int64_t i = 0; i < n; ++i) kt[d * kKvBlockSize + i] = float_as<T>(k[i * stride + at + d]);
      for (int64_t i = 0; i < n; ++i) {
        T* vrow = value_block + (int64_t(h) * kKvBlockSize + slot + i) * head_dim;
        for (int d = 0; d < head_dim; ++d) vrow[d] = float_as<T>(v[i * stride + at + d]);
      }
    }
  }
}

template <typename T>
static inline void kv_block_write(T* key_block, T* value_block, int n_head, int head_dim, int64_t slot,
                                  const float* k, const float* v) {
  kv_block_write_heads(key_block, value_block, 0, n_head, head_dim, slot, k, v, n_head);
}

// A decode step's new key and value (AttentionArgs::new_k, new_v) for heads [h0, h1), into the
// block of position first_pos. The blocks are the cache's own memory; the args hold them const
// because the attention kernels only read them otherwise.
template <typename T>
static inline void kv_write_new_position(const AttentionArgs& a, int h0, int h1) {
  const int64_t blk = a.first_pos / kKvBlockSize;
  kv_block_write_heads(static_cast<T*>(const_cast<void*>(a.k_blocks[blk])),
                       static_cast<T*>(const_cast<void*>(a.v_blocks[blk])), h0, h1, a.head_dim,
                       a.first_pos % kKvBlockSize, a.new_k, a.new_v, a.n_head);
}

}  // namespace llamas
