#include "llamas/allocator.h"

#include <sys/mman.h>

#include <algorithm>
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

// Classes from 128 KiB up to 2 MiB (KV blocks: 1.2 MB a block for GPT-2 124M, 196 KB for the
// bundled model; the bundled model's weight panels, 256-786 KB; decode activations) are carved
// one after another out of 16 MiB slabs on huge pages, so that they too are read without a page
// walk every 4 KiB. On their own they would each get 4 KiB pages (and one huge page each would
// waste up to 15/16 of it). GPT-2 124M decoding after a 512-token prompt (~3.4 MB of KV a layer
// a token), processes alternated 8 times: decode attention 181.6 -> 161.1 us a layer; whole
// decode steps 0.99-1.06x over three such runs (attention is ~13% of a step there). Under
// AddressSanitizer each block keeps its own allocation, so overruns between them are caught. A
// slab's RSS can run up to one huge page past the blocks carved from it so far.
#if defined(__SANITIZE_ADDRESS__)
#define LLAMAS_ALLOCATOR_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LLAMAS_ALLOCATOR_UNDER_ASAN 1
#endif
#endif
#ifdef LLAMAS_ALLOCATOR_UNDER_ASAN
constexpr size_t kSlabFrom = kHugeFrom;  // (no slabs)
#else
constexpr size_t kSlabFrom = size_t(128) << 10;
#endif
constexpr size_t kSlabBytes = 8 * kHugePage;

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
  // Slabs by base address: how much has been carved, into how many blocks. Blocks go back to the
  // free lists like any other; a slab goes back to the OS once all its blocks are cached.
  struct Slab {
    size_t carved = 0;
    int64_t blocks = 0;
  };
  std::map<char*, Slab> slabs;
  char* current_slab = nullptr;

  // A block of class cls (kSlabFrom <= cls < kHugeFrom) from the current slab, or a new one.
  void* carve(size_t cls) {
    if (!current_slab || slabs[current_slab].carved + cls > kSlabBytes) {
      char* base = static_cast<char*>(std::aligned_alloc(kHugePage, kSlabBytes));
      if (!base) return nullptr;
#ifdef MADV_HUGEPAGE
      madvise(base, kSlabBytes, MADV_HUGEPAGE);  // advice only
#endif
      slabs[base] = Slab{};
      current_slab = base;
      stats.bytes_reserved += static_cast<int64_t>(kSlabBytes);
    }
    Slab& slab = slabs[current_slab];
    void* block = current_slab + slab.carved;
    slab.carved += cls;
    slab.blocks++;
    return block;
  }

  // The slab holding p, or slabs.end().
  std::map<char*, Slab>::iterator slab_of(void* p) {
    char* c = static_cast<char*>(p);
    auto it = slabs.upper_bound(c);
    if (it == slabs.begin()) return slabs.end();
    --it;
    return c < it->first + kSlabBytes ? it : slabs.end();
  }

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
      const bool slab = cls >= kSlabFrom && cls < kHugeFrom;
      auto fresh = [&] { return slab ? carve(cls) : system_allocate(cls); };
      ptr = fresh();
      if (!ptr) {
        release_cached_locked();
        ptr = fresh();
      }
      if (!ptr) fail("allocator", "out of memory allocating ", bytes, " bytes");
      if (!slab) stats.bytes_reserved += static_cast<int64_t>(cls);  // (a slab counted when made)
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
    // Blocks of their own go back at once; slab blocks are counted per slab first.
    std::map<char*, int64_t> cached_in_slab;
    for (auto& entry : free_lists) {
      std::vector<void*> kept;
      for (void* p : entry.second) {
        auto slab = slab_of(p);
        if (slab != slabs.end()) {
          cached_in_slab[slab->first]++;
          kept.push_back(p);
          continue;
        }
        std::free(p);
        stats.bytes_cached -= static_cast<int64_t>(entry.first);
        stats.bytes_reserved -= static_cast<int64_t>(entry.first);
      }
      entry.second.swap(kept);
    }
    // Slabs whose every block is cached go back whole, their blocks leaving the free lists.
    std::vector<char*> empty;
    for (auto& [base, n] : cached_in_slab)
      if (n == slabs[base].blocks) empty.push_back(base);
    if (empty.empty()) return;
    for (auto& entry : free_lists) {
      auto& list = entry.second;
      for (size_t i = 0; i < list.size();) {
        auto slab = slab_of(list[i]);
        if (slab != slabs.end() && std::find(empty.begin(), empty.end(), slab->first) != empty.end()) {
          stats.bytes_cached -= static_cast<int64_t>(entry.first);
          list[i] = list.back();
          list.pop_back();
        } else {
          ++i;
        }
      }
    }
    for (char* base : empty) {
      std::free(base);
      slabs.erase(base);
      stats.bytes_reserved -= static_cast<int64_t>(kSlabBytes);
      if (current_slab == base) current_slab = nullptr;
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
