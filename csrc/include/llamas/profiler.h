#pragma once
// Per-op profile: time and call count per op kind and per model region (the layer type an op ran
// in: "attn.qkv", "mlp.fc", "lm_head", ...), collected only while enabled (one relaxed atomic load
// per op and per region when off).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace llamas {

struct ProfileEntry {
  std::string name;    // op kind
  std::string region;  // innermost ProfileRegion of the calling thread, "" outside any
  int64_t calls = 0;
  double seconds = 0.0;
};

void profiler_enable(bool on);
bool profiler_enabled();
void profiler_reset();
std::vector<ProfileEntry> profiler_entries();
void profiler_record(const char* name, double seconds);

// Labels the ops the calling thread runs while it lives (regions nest; the innermost names them).
// Models mark their layer types with it, so a profile also answers "which matmul".
class ProfileRegion {
 public:
  explicit ProfileRegion(const char* name);
  ~ProfileRegion();
  ProfileRegion(const ProfileRegion&) = delete;
  ProfileRegion& operator=(const ProfileRegion&) = delete;

 private:
  const char* previous_ = nullptr;
  bool active_ = false;
};

class ProfileScope {
 public:
  explicit ProfileScope(const char* name) : name_(profiler_enabled() ? name : nullptr) {
    if (name_) start_ = std::chrono::steady_clock::now();
  }
  ~ProfileScope() {
    if (name_)
      profiler_record(name_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace llamas
