#pragma once
// A small thread pool for parallel-for. Work is split into a few fixed ranges per thread (whole
// multiples of the grain) that threads claim dynamically, so a thread the OS has descheduled on a
// busy machine does not hold the others up. Kernels never split one reduction across ranges, so
// results do not depend on the partition, the thread count or which thread ran a range.
#include <cstdint>
#include <utility>

namespace llamas {

void set_num_threads(int n);
int num_threads();

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
// Runs fn(ctx, begin, end) over [0, n) split into ranges whose bounds are multiples of `grain`
// (except the last). Nested calls run serially on the calling thread.
void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx);

template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& body) {
  auto trampoline = [](void* ctx, int64_t begin, int64_t end) {
    (*static_cast<std::remove_reference_t<F>*>(ctx))(begin, end);
  };
  parallel_for_raw(n, grain, trampoline, static_cast<void*>(&body));
}

}  // namespace llamas
