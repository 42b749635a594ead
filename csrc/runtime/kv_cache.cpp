#include "runtime/kv_cache.h"

#include "llamas/allocator.h"
#include "llamas/kv_block.h"
#include "llamas/error.h"

namespace llamas {
namespace {
std::atomic<int64_t> g_blocks_in_use{0};
std::atomic<int64_t> g_bytes_in_use{0};

// A block handle: its reference count beside the entries' allocation, not inside it (64 more
// bytes would move the bundled model's 192 KiB blocks up to the allocator's 224 KiB class).
struct Block {
  std::atomic<int32_t> refs{1};
  int64_t bytes = 0;  // of the entries
  char* entries = nullptr;
};

Block* as_block(void* handle) { return static_cast<Block*>(handle); }
char* entries(void* handle) { return as_block(handle)->entries; }
}  // namespace

void KvCache::retain_block(void* handle) { as_block(handle)->refs.fetch_add(1, std::memory_order_relaxed); }

void KvCache::release_block(void* handle) {
  Block* b = as_block(handle);
  if (b->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  g_blocks_in_use.fetch_sub(1, std::memory_order_relaxed);
  g_bytes_in_use.fetch_sub(b->bytes, std::memory_order_relaxed);
  cpu_free(b->entries);
  delete b;
}

KvCache::KvCache(int n_layer, int n_head, int head_dim, int64_t max_positions)
    : n_layer_(n_layer), n_head_(n_head), head_dim_(head_dim), max_positions_(max_positions) {
  key_ptrs_.resize(n_layer);
  value_ptrs_.resize(n_layer);
}

KvCache::~KvCache() { clear(); }

void KvCache::set_dtype(DType dtype) {
  LLAMAS_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::I8, "kv_cache",
               "KV cache entries must be float32, bfloat16 or int8, got ", dtype_name(dtype));
  LLAMAS_CHECK(blocks_.empty() || dtype == dtype_, "kv_cache", "this KV cache holds ", dtype_name(dtype_),
               " entries; it can only change dtype while empty (asked for ", dtype_name(dtype), ")");
  dtype_ = dtype;
}

void KvCache::reserve(int64_t n) {
  LLAMAS_CHECK(n <= max_positions_, "kv_cache", "sequence of ", n, " positions exceeds the context length ",
               max_positions_);
  while (blocks() * kKvBlockSize < n) {
    Block* block = new Block;
    block->bytes = int64_t(bytes_per_block());
    block->entries = static_cast<char*>(cpu_allocate(bytes_per_block()));
    g_blocks_in_use.fetch_add(1, std::memory_order_relaxed);
    g_bytes_in_use.fetch_add(int64_t(bytes_per_block()), std::memory_order_relaxed);
    push_block(block);
  }
}

void KvCache::push_block(void* block) {
  blocks_.push_back(block);
  const size_t layer_bytes = size_t(kv_region_bytes(int64_t(dtype_size(dtype_)), n_head_, head_dim_));
  char* e = entries(block);
  for (int l = 0; l < n_layer_; ++l) {
    key_ptrs_[l].push_back(e + (2 * l) * layer_bytes);
    value_ptrs_[l].push_back(e + (2 * l + 1) * layer_bytes);
  }
}

void KvCache::adopt(const std::vector<void*>& shared, DType dtype) {
  LLAMAS_CHECK(blocks_.empty() && length_ == 0, "kv_cache", "only an empty KV cache can adopt shared blocks (this one holds ",
               blocks(), " blocks)");
  LLAMAS_CHECK(int64_t(shared.size()) * kKvBlockSize <= max_positions_, "kv_cache", shared.size(),
               " shared blocks exceed the context length ", max_positions_);
  set_dtype(dtype);
  for (void* b : shared) {
    retain_block(b);
    push_block(b);
  }
  length_ = int64_t(shared.size()) * kKvBlockSize;
}

KvBlockRef::KvBlockRef(const KvCache& cache, int64_t index)
    : dtype_(cache.dtype()),
      bytes_(cache.bytes_per_block()),
      n_layer_(cache.n_layer()),
      n_head_(cache.n_head()),
      head_dim_(cache.head_dim()) {
  LLAMAS_CHECK(index >= 0 && index < cache.blocks() && cache.block_full(index), "kv_cache", "block ", index,
               " is not a full block of this cache (", cache.length(), " positions in ", cache.blocks(), " blocks)");
  block_ = cache.block(index);
  KvCache::retain_block(block_);
}

template <typename T>
void KvCache::write_typed(int layer, int64_t pos, int64_t n, const float* k, const float* v, int64_t stride) {
  T* kb = static_cast<T*>(const_cast<void*>(key_ptrs_[layer][pos / kKvBlockSize]));
  T* vb = static_cast<T*>(const_cast<void*>(value_ptrs_[layer][pos / kKvBlockSize]));
  kv_block_write_heads(kb, vb, 0, n_head_, head_dim_, pos % kKvBlockSize, k, v, n_head_, n, stride);
}

void KvCache::write_rows(int layer, int64_t pos, int64_t n, const float* k, const float* v, int64_t stride) {
  LLAMAS_CHECK(n >= 1 && pos % kKvBlockSize + n <= kKvBlockSize, "kv_cache", "positions ", pos, "..", pos + n - 1,
               " are not inside one block of ", kKvBlockSize);
  if (dtype_ == DType::BF16) write_typed<uint16_t>(layer, pos, n, k, v, stride);
  else if (dtype_ == DType::I8) write_typed<int8_t>(layer, pos, n, k, v, stride);
  else write_typed<float>(layer, pos, n, k, v, stride);
}

void KvCache::write(int layer, int64_t pos, const float* k, const float* v) { write_rows(layer, pos, 1, k, v, 0); }

void KvCache::truncate(int64_t n) {
  LLAMAS_CHECK(n >= 0 && n <= length_, "kv_cache", "cannot truncate ", length_, " positions to ", n);
  const int64_t keep = (n + kKvBlockSize - 1) / kKvBlockSize;
  LLAMAS_CHECK(n % kKvBlockSize == 0 || as_block(blocks_[keep - 1])->refs.load(std::memory_order_relaxed) == 1,
               "kv_cache", "cannot truncate to position ", n, ": its block is shared with another sequence or the "
               "prefix cache");
  while (blocks() > keep) {
    release_block(blocks_.back());
    blocks_.pop_back();
    for (auto& v : key_ptrs_) v.pop_back();
    for (auto& v : value_ptrs_) v.pop_back();
  }
  length_ = n;
}

void KvCache::clear() {
  for (void* b : blocks_) release_block(b);
  blocks_.clear();
  for (auto& v : key_ptrs_) v.clear();
  for (auto& v : value_ptrs_) v.clear();
  length_ = 0;
}

int64_t KvCache::blocks_in_use() { return g_blocks_in_use.load(std::memory_order_relaxed); }
int64_t KvCache::bytes_in_use() { return g_bytes_in_use.load(std::memory_order_relaxed); }

}  // namespace llamas
