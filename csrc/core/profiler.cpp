#include "llamas/profiler.h"

#include <map>
#include <mutex>

namespace llamas {
namespace {
std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
thread_local const char* t_region = nullptr;
std::map<std::pair<std::string, std::string>, ProfileEntry>& table() {  // (region, op) -> entry
  static auto* t = new std::map<std::pair<std::string, std::string>, ProfileEntry>();
  return *t;
}
}  // namespace

ProfileRegion::ProfileRegion(const char* name) {
  if (!profiler_enabled()) return;
  previous_ = t_region;
  t_region = name;
  active_ = true;
}

ProfileRegion::~ProfileRegion() {
  if (active_) t_region = previous_;
}

void profiler_enable(bool on) { g_enabled.store(on, std::memory_order_relaxed); }
bool profiler_enabled() { return g_enabled.load(std::memory_order_relaxed); }

void profiler_reset() {
  std::lock_guard<std::mutex> lock(g_mutex);
  table().clear();
}

void profiler_record(const char* name, double seconds) {
  const char* region = t_region ? t_region : "";
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& e = table()[{region, name}];
  e.name = name;
  e.region = region;
  e.calls++;
  e.seconds += seconds;
}

std::vector<ProfileEntry> profiler_entries() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<ProfileEntry> out;
  for (auto& kv : table()) out.push_back(kv.second);
  return out;
}

}  // namespace llamas
