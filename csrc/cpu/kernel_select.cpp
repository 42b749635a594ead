#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/kernel_table.h"
#include "llamas/cpu_features.h"
#include "llamas/error.h"

namespace llamas {
namespace cpu {

const KernelTable* generic_kernel_table();
#ifdef LLAMAS_WITH_AVX2
const KernelTable* avx2_kernel_table();
#endif
#ifdef LLAMAS_WITH_AVX512
const KernelTable* avx512_kernel_table();
#endif
#ifdef LLAMAS_WITH_NEON
const KernelTable* neon_kernel_table();
#endif

namespace {

const KernelTable* table_for(const std::string& name) {
  const CpuFeatures& f = cpu_features();
#ifdef LLAMAS_WITH_AVX512
  if (name == "avx512" && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma)
    return avx512_kernel_table();
#endif
#ifdef LLAMAS_WITH_AVX2
  if (name == "avx2" && f.avx2 && f.fma && f.f16c) return avx2_kernel_table();
#endif
#ifdef LLAMAS_WITH_NEON
  if (name == "neon" && f.neon) return neon_kernel_table();
#endif
  if (name == "generic") return generic_kernel_table();
  (void)f;
  return nullptr;
}

const KernelTable* best_table() {
  const std::vector<std::string> variants = available_variants();
  if (const char* env = std::getenv("LLAMAS_KERNEL")) {
    if (const KernelTable* t = table_for(env)) return t;
    std::string options;
    for (const std::string& n : variants) options += (options.empty() ? "" : ", ") + n;
    std::fprintf(stderr, "llamas: LLAMAS_KERNEL=%s is not a kernel variant this CPU runs (%s); using %s\n", env,
                 options.c_str(), variants.front().c_str());
  }
  return table_for(variants.front());
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{best_table()};
  return table;
}

}  // namespace

std::vector<std::string> available_variants() {
  std::vector<std::string> names;
  for (const char* name : {"avx512", "avx2", "neon", "generic"})
    if (table_for(name)) names.push_back(name);
  return names;
}

const KernelTable& kernels() { return *current().load(std::memory_order_relaxed); }

void set_variant(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (!t) {
    std::string options;
    for (auto& n : available_variants()) options += (options.empty() ? "" : ", ") + n;
    fail("set_kernel_variant", "variant '", name, "' is not available on this CPU or build (available: ",
         options, ")");
  }
  current().store(t);
}

}  // namespace cpu
}  // namespace llamas
