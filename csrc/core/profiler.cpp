#include "llamas/profiler.h"

#include <map>
#include <mutex>

namespace llamas {
namespace {
std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
std::map<std::string, ProfileEntry>& table() {
  static auto* t = new std::map<std::string, ProfileEntry>();
  return *t;
}
}  // namespace

void profiler_enable(bool on) { g_enabled.store(on, std::memory_order_relaxed); }
bool profiler_enabled() { return g_enabled.load(std::memory_order_relaxed); }

void profiler_reset() {
  std::lock_guard<std::mutex> lock(g_mutex);
  table().clear();
}

void profiler_record(const char* name, double seconds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& e = table()[name];
  e.name = name;
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
