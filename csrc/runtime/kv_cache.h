#pragma once
// Per-sequence KV cache in blocks of kKvBlockSize (16) positions. A block holds every layer's keys
// and values for its 16 positions, so a sequence grows one allocation per 16 tokens and gives all
// of them back the moment it is cleared or destroyed (through the caching allocator, which reuses
// them for the next sequence). Blocks are reference-counted: a full block (all 16 positions
// written, so never written again) can be shared with other caches and with KvBlockRef holders (a
// prefix cache), and goes back to the allocator with its last reference. Keys are stored
// transposed per block (see kernel_args.h). Entries are float32, bfloat16 or int8 with a scale per
// head and position (the model's choice, fixed while the cache holds blocks): bfloat16 halves the
// bytes a decode step's attention streams (GPT-2 124M at 600 positions: 42 -> 21 MB a token), int8
// with 64-entry heads brings them to 0.27 of float32's.
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
  // The entry type of the blocks to come: float32, bfloat16 or int8; only while the cache is empty.
  void set_dtype(DType dtype);
  // Makes room for positions [0, n) (allocating blocks as needed).
  void reserve(int64_t n);
  // Writes one position's keys and values (n_head * head_dim floats each, rounded to the cache's
  // dtype) for a layer.
  void write(int layer, int64_t pos, const float* k, const float* v);
  // Writes n consecutive positions from pos, all in one block (pos % 16 + n <= 16): position
  // pos + i's keys at k + i * stride, values at v + i * stride.
  void write_rows(int layer, int64_t pos, int64_t n, const float* k, const float* v, int64_t stride);
  void set_length(int64_t n) { length_ = n; }
  // Drops positions [n, length) (speculative decoding's rejected drafts): blocks past position n
  // go back. The block position n falls in is written again next, so it must be this cache's own
  // (not shared with another sequence or the prefix cache).
  void truncate(int64_t n);
  // One layer's blocks, entries of dtype().
  const void* const* key_blocks(int layer) const { return key_ptrs_[layer].data(); }
  const void* const* value_blocks(int layer) const { return value_ptrs_[layer].data(); }
  // Frees every block (drops this cache's references); the sequence starts again at position 0.
  void clear();
  // Starts this empty cache from shared full blocks (each gains a reference): positions
  // [0, 16 * blocks.size()) are theirs, and writes go to blocks of its own after them.
  void adopt(const std::vector<void*>& shared, DType dtype);
  // Block i (an opaque handle for KvBlockRef and adopt), and whether it is full.
  void* block(int64_t i) const { return blocks_[i]; }
  bool block_full(int64_t i) const { return (i + 1) * kKvBlockSize <= length_; }
  int n_layer() const { return n_layer_; }
  int n_head() const { return n_head_; }
  int head_dim() const { return head_dim_; }

  // Reference counting of blocks (any thread): retain adds one, release drops one and frees the
  // block with the last.
  static void retain_block(void* block);
  static void release_block(void* block);

  static int64_t blocks_in_use();      // over all caches in the process
  static int64_t bytes_in_use();       // their bytes (bfloat16 blocks count half, int8 ones a quarter + scales)
  size_t bytes_per_block() const {
    return size_t(2 * n_layer_ * kv_region_bytes(int64_t(dtype_size(dtype_)), n_head_, head_dim_));
  }

 private:
  int n_layer_, n_head_, head_dim_;
  int64_t max_positions_;
  int64_t length_ = 0;
  DType dtype_ = DType::F32;
  std::vector<void*> blocks_;
  std::vector<std::vector<const void*>> key_ptrs_, value_ptrs_;

  template <typename T>
  void write_typed(int layer, int64_t pos, int64_t n, const float* k, const float* v, int64_t stride);
  void push_block(void* block);
};

// One reference to a full block of some cache, held outside any cache (a prefix cache's entry).
// It remembers the cache shape and dtype it belongs to, so that adopting it elsewhere is checked.
class KvBlockRef {
 public:
  KvBlockRef(const KvCache& cache, int64_t index);
  ~KvBlockRef() { KvCache::release_block(block_); }
  KvBlockRef(const KvBlockRef&) = delete;
  KvBlockRef& operator=(const KvBlockRef&) = delete;
  void* block() const { return block_; }
  DType dtype() const { return dtype_; }
  size_t bytes() const { return bytes_; }
  // Whether a cache could hold this block: same layers, heads and head size.
  bool fits(const KvCache& cache) const {
    return n_layer_ == cache.n_layer() && n_head_ == cache.n_head() && head_dim_ == cache.head_dim();
  }

 private:
  void* block_;
  DType dtype_;
  size_t bytes_;
  int n_layer_, n_head_, head_dim_;
};

}  // namespace llamas
