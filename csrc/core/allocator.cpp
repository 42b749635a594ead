#include "llamas/allocator.h"

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "llamas/error.h"

namespace llamas {
namespace {

constexpr size_t kAlignment = 64;
constexpr size_t kMinClass = 64;
constexpr size_t kReuseLimit = 2;  // a cached block serves requests down to half its class
// Classes are powers of two split into 4 steps (64, 80, 96, 112, 128, 160, ...): at most 25%
// waste, and a bounded number of free lists (4 per doubling).
size_t round_to_class(size_t bytes) {
  if (bytes <= kMinClass) return kMinClass;
  size_t pow2 = kMinClass;
  while (pow2 * 2 < bytes) pow2 *= 2;
  size_t step = pow2 / 4;
  size_t rounded = (bytes + step - 1) / step * step;
  return rounded;
}

// Blocks of 2 MiB and more (weight panels, prefill activations) sit on 2 MiB boundaries and ask
// for transparent huge pages over the whole huge pages they span: streaming 500 MB of weights per
// decoded token otherwise walks the page table every 4 KiB, and faulting them in at load costs one
// fault per 2 MiB instead of 512. The advice stops at the last whole huge page inside the class,
// so a tail keeps 4 KiB pages and no block's RSS grows past its class. (From 4 MiB only, GPT-2
// 124M's bfloat16 qkv and attention-projection panels, 3.5 and 1.2 MB, had none.)
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeFrom = kHugePage;

void* system_allocate(size_t cls) {
  // aligned_alloc's size must be a multiple of the alignment (C11 7.22.3.1; AddressSanitizer
  // refuses 160 at 64): classes step by 16-32 bytes below 256, so round the request, not the class.
  if (cls < kHugeFrom) return std::aligned_alloc(kAlignment, (cls + kAlignment - 1) / kAlignment * kAlignment);
  void* ptr = std::aligned_alloc(kHugePage, (cls + kHugePage - 1) / kHugePage * kHugePage);
#ifdef MADV_HUGEPAGE
  if (ptr) madvise(ptr, cls / kHugePage * kHugePage, MADV_HUGEPAGE);  // advice only
#endif
  return ptr;
}

struct CachingAllocator {
  std::mutex mutex;
  std::map<size_t, std::vector<void*>> free_lists;             // class -> blocks, ordered
  std::unordered_map<void*, size_t> live;                      // block -> class
  MemoryStats stats;

  void* allocate(size_t bytes) {
    size_t cls = round_to_class(bytes);
    std::lock_guard<std::mutex> lock(mutex);
    stats.allocations++;
    void* ptr = nullptr;
    // A cached block of this class or of one up to kReuseLimit times larger: with only exact
    // classes, a server's changing batch shapes kept touching new classes (its cache grew
    // 19.9 -> 25.8 MiB over the first ~1,500 requests while peak use stayed flat).
    for (auto it = free_lists.lower_bound(cls); it != free_lists.end() && it->first <= cls * kReuseLimit; ++it) {
      if (it->second.empty()) continue;
      ptr = it->second.back();
      it->second.pop_back();
      cls = it->first;
      stats.cache_hits++;
      stats.bytes_cached -= static_cast<int64_t>(cls);
      break;
    }
    if (!ptr) {
      ptr = system_allocate(cls);
      if (!ptr) {
        release_cached_locked();
        ptr = system_allocate(cls);
      }
      if (!ptr) fail("allocator", "out of memory allocating ", bytes, " bytes");
      stats.bytes_reserved += static_cast<int64_t>(cls);
    }
    live[ptr] = cls;
    stats.bytes_in_use += static_cast<int64_t>(cls);
    if (stats.bytes_in_use > stats.peak_bytes_in_use) stats.peak_bytes_in_use = stats.bytes_in_use;
    return ptr;
  }

  void free(void* ptr) {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = live.find(ptr);
    if (it == live.end()) fail("allocator", "free of a pointer this allocator did not hand out");
    size_t cls = it->second;
    live.erase(it);
    stats.frees++;
    stats.bytes_in_use -= static_cast<int64_t>(cls);
    stats.bytes_cached += static_cast<int64_t>(cls);
    free_lists[cls].push_back(ptr);
  }

  void release_cached_locked() {
    for (auto& entry : free_lists) {
      for (void* p : entry.second) {
        std::free(p);
        stats.bytes_cached -= static_cast<int64_t>(entry.first);
        stats.bytes_reserved -= static_cast<int64_t>(entry.first);
      }
      entry.second.clear();
    }
  }
};

CachingAllocator& instance() {
  // Leaked on purpose: blocks may be freed by static destructors after main returns.
  static CachingAllocator* allocator = new CachingAllocator();
  return *allocator;
}

}  // namespace

void* cpu_allocate(size_t bytes) { return instance().allocate(bytes); }
void cpu_free(void* ptr) { instance().free(ptr); }
size_t cpu_size_class(size_t bytes) { return round_to_class(bytes); }

MemoryStats cpu_memory_stats() {
  auto& a = instance();
  std::lock_guard<std::mutex> lock(a.mutex);
  return a.stats;
}

void cpu_reset_peak() {
  auto& a = instance();
  std::lock_guard<std::mutex> lock(a.mutex);
  a.stats.peak_bytes_in_use = a.stats.bytes_in_use;
}

void cpu_empty_cache() {
  auto& a = instance();
  std::lock_guard<std::mutex> lock(a.mutex);
  a.release_cached_locked();
}

}  // namespace llamas
