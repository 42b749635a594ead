#include "llamas/parallel.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLAMAS_CPU_RELAX() _mm_pause()
#else
#define LLAMAS_CPU_RELAX() std::this_thread::yield()
#endif

#include "llamas/error.h"

namespace llamas {
namespace {

thread_local bool t_inside_parallel_region = false;
constexpr int kPausePolls = 256;          // ~5 us of PAUSE-polling
constexpr int kWaitBeforeSleepUs = 100;   // then yield-polling up to this long

constexpr int kMaxThreads = 1024;  // as set_num_threads (99999 started ~32k threads: fork failed machine-wide)

int default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  const int cpus = hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
  if (const char* env = std::getenv("LLAMAS_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n >= 1 && n <= kMaxThreads) return static_cast<int>(n);
    std::fprintf(stderr, "llamas: LLAMAS_NUM_THREADS=%s is not a thread count in [1, %d]; using %d (the CPUs)\n",
                 env, kMaxThreads, cpus);
  }
  return cpus;
}

class ThreadPool {
 public:
  explicit ThreadPool(int n) { resize(n); }
  ~ThreadPool() { stop_workers(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    std::lock_guard<std::mutex> guard(dispatch_mutex_);
    stop_workers();
    stopping_ = false;
    // The generation is read here, before the thread starts: a worker that read it itself could
    // miss the first job's bump and sleep through it.
    const uint64_t start_generation = generation_.load(std::memory_order_acquire);
    for (int i = 1; i < n; ++i)
      workers_.emplace_back([this, start_generation] { worker_loop(start_generation); });
  }

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx, int pieces_per_thread) {
    // Another Python thread may be inside the pool already (server engine + user code): run
    // serially rather than wait, so no caller can deadlock on the pool.
    std::unique_lock<std::mutex> guard(dispatch_mutex_, std::try_to_lock);
    int64_t chunks = grain > 0 ? (n + grain - 1) / grain : n;
    int threads = static_cast<int>(std::min<int64_t>(size(), chunks));
    if (!guard.owns_lock() || threads <= 1 || t_inside_parallel_region) {
      fn(ctx, 0, n);
      return;
    }
    job_fn_ = fn;
    job_ctx_ = ctx;
    job_n_ = n;
    job_grain_ = grain;
    job_chunks_ = chunks;
    const int64_t pieces = std::min<int64_t>(chunks, int64_t(threads) * std::max(1, pieces_per_thread));
    job_pieces_ = pieces;
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    job_id_ = (job_id_ + 1) & kIdMask;
    work_.store(pack(job_id_, uint64_t(pieces), 0), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_cv_.notify_all();
    while (run_next_piece()) {
    }
    // Wait only for pieces other threads are still running. Spin briefly, then yield the core: on
    // a busy machine a spinning caller would keep a descheduled worker from finishing its piece.
    for (int spin = 0; done_.load(std::memory_order_acquire) != pieces; ++spin) spin_pause(spin);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // The work word: job id (24 bits) | piece count (20 bits) | next piece (20 bits). Claiming a
  // piece is one compare-exchange on it, so a worker that wakes late can never claim a piece of a
  // newer job by mistake, and a job's fields stay unchanged until all of its pieces are done.
  static constexpr uint64_t kIdMask = (1u << 24) - 1;
    static uint64_t pack(uint64_t id, uint64_t pieces, uint64_t next) { return (id << 40) | (pieces << 20) | next; }

  // Claims and runs the next piece of the current job; false when none is left. Pieces are handed
  // out dynamically (a thread the OS has not scheduled simply claims none); each piece is a fixed
  // range of whole grains, and no kernel splits a reduction across ranges, so results do not
  // depend on which thread ran what.
  bool run_next_piece() {
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t pieces = (w >> 20) & 0xFFFFF, next = w & 0xFFFFF;
      if (next >= pieces) return false;
      if (work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        run_piece(int64_t(next));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }

  void run_piece(int64_t piece) {
    int64_t begin_chunk = job_chunks_ * piece / job_pieces_;
    int64_t end_chunk = job_chunks_ * (piece + 1) / job_pieces_;
    int64_t begin = std::min(job_n_, begin_chunk * job_grain_);
    int64_t end = std::min(job_n_, end_chunk * job_grain_);
    if (begin >= end) return;
    bool was_inside = t_inside_parallel_region;
    t_inside_parallel_region = true;
    try {
      job_fn_(job_ctx_, begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
    t_inside_parallel_region = was_inside;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Wait briefly before sleeping: a decode step issues ~100 parallel regions a few tens of
      // microseconds apart, and a condition-variable wake-up costs about as much as one region.
      // The first few hundred polls pause; after that each poll yields, so a runnable thread of
      // the process (a server's event loop, the caller's Python between steps) gets the core
      // instead of a spinning worker (16 streaming clients: the spin was ~7% of all CPU time).
      uint64_t now = seen;
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(kWaitBeforeSleepUs);
      for (int spin = 0;; ++spin) {
        now = generation_.load(std::memory_order_acquire);
        if (now != seen || stopping_.load(std::memory_order_relaxed)) break;
        if (spin < kPausePolls) {
          LLAMAS_CPU_RELAX();
        } else {
          if (std::chrono::steady_clock::now() > give_up) break;
          std::this_thread::yield();
        }
      }
      if (now == seen && !stopping_.load(std::memory_order_relaxed)) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        wake_cv_.wait(lock, [&] {
          return generation_.load(std::memory_order_acquire) != seen || stopping_.load();
        });
        now = generation_.load(std::memory_order_acquire);
      }
      if (stopping_.load()) return;
      seen = now;
      while (run_next_piece()) {
      }
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      stopping_ = true;
    }
    wake_cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex dispatch_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> work_{0};
  std::atomic<int64_t> done_{0};
  uint64_t job_id_ = 0;
  std::atomic<bool> stopping_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
  RangeFn job_fn_ = nullptr;
  void* job_ctx_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_grain_ = 1;
  int64_t job_chunks_ = 1;
  int64_t job_pieces_ = 1;
};

ThreadPool& pool() {
  static ThreadPool* instance = new ThreadPool(default_threads());
  return *instance;
}

}  // namespace

void spin_pause(int spin) {
  if (spin < 256) LLAMAS_CPU_RELAX();
  else std::this_thread::yield();
}

void set_num_threads(int n) {
  LLAMAS_CHECK(n >= 1 && n <= kMaxThreads, "set_num_threads", "thread count must be in [1, 1024], got ", n);
  if (n != pool().size()) pool().resize(n);
}

int num_threads() { return pool().size(); }

void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx, int pieces_per_thread) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  pool().run(n, grain, fn, ctx, pieces_per_thread);
}

}  // namespace llamas
