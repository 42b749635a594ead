#include "llamas/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LLAMAS_X86 1
#endif

namespace llamas {
namespace {

#ifdef LLAMAS_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  bool osxsave = c & (1u << 27);
  bool has_fma = c & (1u << 12);
  bool has_f16c = c & (1u << 29);
  bool has_avx = c & (1u << 28);
  if (!osxsave || !has_avx) return f;
  uint64_t xcr0 = read_xcr0();
  bool ymm_state = (xcr0 & 0x6) == 0x6;            // SSE and AVX registers saved by the OS
  bool zmm_state = (xcr0 & 0xe6) == 0xe6;          // plus opmask and the upper ZMM halves
  if (!ymm_state) return f;
  f.fma = has_fma;
  f.f16c = has_f16c;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = b & (1u << 5);
  if (zmm_state) {
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.avx512_vbmi = c & (1u << 1);
    f.avx512_fp16 = d & (1u << 23);
    unsigned a1, b1, c1, d1;
    if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = a1 & (1u << 5);
  }
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool emulate_dot_instructions() {
  static const bool emulate = [] {
    const char* env = std::getenv("LLAMAS_EMULATE_DOT");
    return env && *env && std::string(env) != "0";
  }();
  return emulate;
}

std::string cpu_name() {
#ifdef LLAMAS_X86
  unsigned regs[12];
  unsigned max_ext = __get_cpuid_max(0x80000000, nullptr);
  if (max_ext < 0x80000004) return "x86-64";
  for (unsigned i = 0; i < 3; ++i)
    __get_cpuid(0x80000002 + i, &regs[i * 4], &regs[i * 4 + 1], &regs[i * 4 + 2], &regs[i * 4 + 3]);
  char name[49];
  std::memcpy(name, regs, 48);
  name[48] = 0;
  std::string s(name);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "unknown";
#endif
}

}  // namespace llamas
