#pragma once
// Caching CPU allocator: 64-byte aligned blocks (one cache line, and the alignment AVX-512 loads
// like best), rounded up to size classes so that a freed block is reused by the next request of a
// similar size instead of going back to the OS. A decode step allocates the same activation
// buffers every token; after the first token every request is a cache hit.
#include <cstddef>
#include <cstdint>

namespace llamas {

struct MemoryStats {
  int64_t bytes_in_use = 0;       // handed out to callers, by size class
  int64_t peak_bytes_in_use = 0;
  int64_t bytes_cached = 0;       // held in free lists, ready for reuse
  int64_t bytes_reserved = 0;     // in use + cached: what the process holds from the OS
  int64_t allocations = 0;        // calls to allocate
  int64_t cache_hits = 0;         // allocations served from a free list
  int64_t frees = 0;
};

void* cpu_allocate(size_t bytes);
void cpu_free(void* ptr);
MemoryStats cpu_memory_stats();
void cpu_reset_peak();
// Returns cached (free) blocks to the OS.
void cpu_empty_cache();
// The size class a request of `bytes` is rounded up to (exposed for tests).
size_t cpu_size_class(size_t bytes);

}  // namespace llamas
