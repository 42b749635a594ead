#include "runtime/kv_cache.h"

#include "llamas/allocator.h"
#include "llamas/error.h"

namespace llamas {
namespace {
std::atomic<int64_t> g_blocks_in_use{0};
}

KvCache::KvCache(int n_layer, int n_head, int head_dim, int64_t max_positions)
    : n_layer_(n_layer), n_head_(n_head), head_dim_(head_dim), max_positions_(max_positions) {
  layer_floats_ = size_t(n_head) * head_dim * kKvBlockSize;
  block_floats_ = layer_floats_ * 2 * n_layer;
  key_ptrs_.resize(n_layer);
  value_ptrs_.resize(n_layer);
}

KvCache::~KvCache() { clear(); }

void KvCache::reserve(int64_t n) {
  LLAMAS_CHECK(n <= max_positions_, "kv_cache", "sequence of ", n, " positions exceeds the context length ",
               max_positions_);
  while (blocks() * kKvBlockSize < n) {
    float* block = static_cast<float*>(cpu_allocate(block_floats_ * sizeof(float)));
    blocks_.push_back(block);
    g_blocks_in_use.fetch_add(1, std::memory_order_relaxed);
    for (int l = 0; l < n_layer_; ++l) {
      key_ptrs_[l].push_back(block + (2 * l) * layer_floats_);
      value_ptrs_[l].push_back(block + (2 * l + 1) * layer_floats_);
    }
  }
}

void KvCache::write(int layer, int64_t pos, const float* k, const float* v) {
  float* kb = const_cast<float*>(key_ptrs_[layer][pos / kKvBlockSize]);
  float* vb = const_cast<float*>(value_ptrs_[layer][pos / kKvBlockSize]);
  const int64_t slot = pos % kKvBlockSize;
  for (int h = 0; h < n_head_; ++h) {
    const float* kh = k + h * head_dim_;
    const float* vh = v + h * head_dim_;
    float* kt = kb + size_t(h) * head_dim_ * kKvBlockSize + slot;
    float* vrow = vb + (size_t(h) * kKvBlockSize + slot) * head_dim_;
    for (int d = 0; d < head_dim_; ++d) {
      kt[d * kKvBlockSize] = kh[d];
      vrow[d] = vh[d];
    }
  }
}

void KvCache::clear() {
  for (float* b : blocks_) cpu_free(b);
  g_blocks_in_use.fetch_sub(blocks(), std::memory_order_relaxed);
  blocks_.clear();
  for (auto& v : key_ptrs_) v.clear();
  for (auto& v : value_ptrs_) v.clear();
  length_ = 0;
}

int64_t KvCache::blocks_in_use() { return g_blocks_in_use.load(std::memory_order_relaxed); }

}  // namespace llamas
