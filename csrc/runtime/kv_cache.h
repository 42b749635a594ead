#pragma once
// Per-sequence KV cache in blocks of kKvBlockSize (16) positions. A block holds every layer's keys
// and values for its 16 positions, so a sequence grows one allocation per 16 tokens and gives all
// of them back the moment it is cleared or destroyed (through the caching allocator, which reuses
// them for the next sequence). Keys are stored transposed per block (see kernel_args.h). Entries are
// float32 or bfloat16 (the model's choice, fixed while the cache holds blocks): bfloat16 halves
// the bytes a decode step's attention streams (GPT-2 124M at 600 positions: 42 -> 21 MB a token).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "llamas/kernel_args.h"
#include "llamas/tensor.h"

namespace llamas {

class KvCache {
 public:
  KvCache(int n_layer, int n_head, int head_dim, int64_t max_positions);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  int64_t length() const { return length_; }
  int64_t max_positions() const { return max_positions_; }
  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }
  DType dtype() const { return dtype_; }
  // The entry type of the blocks to come: float32 or bfloat16; only while the cache is empty.
  void set_dtype(DType dtype);
  // Makes room for positions [0, n) (allocating blocks as needed).
  void reserve(int64_t n);
  // Writes one position's keys and values (n_head * head_dim floats each, rounded to the cache's
  // dtype) for a layer.
  void write(int layer, int64_t pos, const float* k, const float* v);
  void set_length(int64_t n) { length_ = n; }
  // One layer's blocks, entries of dtype().
  const void* const* key_blocks(int layer) const { return key_ptrs_[layer].data(); }
  const void* const* value_blocks(int layer) const { return value_ptrs_[layer].data(); }
  // Frees every block; the sequence starts again at position 0.
  void clear();

  static int64_t blocks_in_use();      // over all caches in the process
  static int64_t bytes_in_use();       // their bytes (blocks of bfloat16 caches count half)
  size_t bytes_per_block() const { return block_entries_ * dtype_size(dtype_); }

 private:
  int n_layer_, n_head_, head_dim_;
  int64_t max_positions_;
  int64_t length_ = 0;
  DType dtype_ = DType::F32;
  size_t layer_entries_;  // one layer's K or V in a block
  size_t block_entries_;
  std::vector<void*> blocks_;
  std::vector<std::vector<const void*>> key_ptrs_, value_ptrs_;

  template <typename T>
  void write_typed(int layer, int64_t pos, const float* k, const float* v);
};

}  // namespace llamas
