#include "llamas/cpu_features.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LLAMAS_X86 1
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
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
#elif defined(__aarch64__) && defined(__linux__)
CpuFeatures detect() {
  // Bit positions from the kernel's uapi asm/hwcap.h (fixed ABI; spelled out so that older
  // headers without the newer names still build).
  constexpr unsigned long kHwcapAsimd = 1ul << 1, kHwcapAsimdDp = 1ul << 20;
  constexpr unsigned long kHwcap2I8mm = 1ul << 13, kHwcap2Bf16 = 1ul << 14;
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  CpuFeatures f;
  f.neon = hw & kHwcapAsimd;
  f.asimd_dotprod = hw & kHwcapAsimdDp;
  f.arm_i8mm = hw2 & kHwcap2I8mm;
  f.arm_bf16 = hw2 & kHwcap2Bf16;
  return f;
}
#elif defined(__aarch64__) && defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int value = 0;
  size_t size = sizeof(value);
  return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
}

CpuFeatures detect() {
  CpuFeatures f;
  f.neon = true;  // every Apple silicon core
  f.asimd_dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.arm_bf16 = sysctl_flag("hw.optional.arm.FEAT_BF16");
  f.arm_i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
  return f;
}
#elif defined(__aarch64__)
CpuFeatures detect() {
  CpuFeatures f;
  f.neon = true;  // Advanced SIMD is part of ARMv8-A
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

namespace {

constexpr const char* kFeatureNames[] = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                         "avx512_bf16", "avx512_vnni", "avx512_vbmi", "avx512_fp16",
                                         "neon", "asimd_dotprod", "arm_bf16", "arm_i8mm"};

bool* feature_flag(CpuFeatures& f, const std::string& name) {
  bool* flags[] = {&f.avx2, &f.fma, &f.f16c, &f.avx512f, &f.avx512bw, &f.avx512vl, &f.avx512dq,
                   &f.avx512_bf16, &f.avx512_vnni, &f.avx512_vbmi, &f.avx512_fp16,
                   &f.neon, &f.asimd_dotprod, &f.arm_bf16, &f.arm_i8mm};
  for (size_t i = 0; i < sizeof(kFeatureNames) / sizeof(kFeatureNames[0]); ++i)
    if (name == kFeatureNames[i]) return flags[i];
  return nullptr;
}

// Clears the features LLAMAS_CPU_HIDE names; an unknown name is reported on stderr (at first use,
// before any kernel runs, where an exception would have nowhere to go) and otherwise ignored.
CpuFeatures without_hidden(CpuFeatures f) {
  const char* env = std::getenv("LLAMAS_CPU_HIDE");
  if (!env) return f;
  std::string list(env);
  for (size_t start = 0; start <= list.size();) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string name = list.substr(start, end - start);
    if (!name.empty()) {
      if (bool* flag = feature_flag(f, name)) *flag = false;
      else std::fprintf(stderr, "llamas: LLAMAS_CPU_HIDE names an unknown CPU feature '%s' (ignored)\n", name.c_str());
    }
    start = end + 1;
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = without_hidden(detect());
  return features;
}

const char* const* cpu_feature_names(int* count) {
  *count = int(sizeof(kFeatureNames) / sizeof(kFeatureNames[0]));
  return kFeatureNames;
}

bool has_cpu_feature(const std::string& name) {
  CpuFeatures copy = cpu_features();
  const bool* flag = feature_flag(copy, name);
  return flag && *flag;
}

namespace {

// ARM cores as Linux's /proc/cpuinfo identifies them: "CPU implementer" (0x41 Arm, 0xc0 Ampere,
// 0x48 HiSilicon, 0x46 Fujitsu, 0x51 Qualcomm) and "CPU part", the MIDR_EL1 fields. The Neoverse
// cores are the servers' (N1: AWS Graviton2, Ampere Altra; V1: Graviton3; V2: Graviton4, NVIDIA
// Grace; N2: Azure Cobalt 100, Alibaba Yitian 710), the Cortex ones the boards' and phones'.
struct ArmCore {
  unsigned implementer, part;
  const char* name;
};
const ArmCore kArmCores[] = {
    {0x41, 0xd03, "ARM Cortex-A53"},      {0x41, 0xd04, "ARM Cortex-A35"},
    {0x41, 0xd05, "ARM Cortex-A55"},      {0x41, 0xd07, "ARM Cortex-A57"},
    {0x41, 0xd08, "ARM Cortex-A72"},      {0x41, 0xd09, "ARM Cortex-A73"},
    {0x41, 0xd0a, "ARM Cortex-A75"},      {0x41, 0xd0b, "ARM Cortex-A76"},
    {0x41, 0xd0c, "ARM Neoverse N1"},     {0x41, 0xd0d, "ARM Cortex-A77"},
    {0x41, 0xd40, "ARM Neoverse V1"},     {0x41, 0xd41, "ARM Cortex-A78"},
    {0x41, 0xd44, "ARM Cortex-X1"},       {0x41, 0xd46, "ARM Cortex-A510"},
    {0x41, 0xd47, "ARM Cortex-A710"},     {0x41, 0xd48, "ARM Cortex-X2"},
    {0x41, 0xd49, "ARM Neoverse N2"},     {0x41, 0xd4b, "ARM Cortex-A78C"},
    {0x41, 0xd4d, "ARM Cortex-A715"},     {0x41, 0xd4e, "ARM Cortex-X3"},
    {0x41, 0xd4f, "ARM Neoverse V2"},     {0x41, 0xd80, "ARM Cortex-A520"},
    {0x41, 0xd81, "ARM Cortex-A720"},     {0x41, 0xd82, "ARM Cortex-X4"},
    {0x41, 0xd84, "ARM Neoverse V3"},     {0x41, 0xd85, "ARM Cortex-X925"},
    {0x41, 0xd87, "ARM Cortex-A725"},     {0x41, 0xd8e, "ARM Neoverse N3"},
    {0xc0, 0xac3, "Ampere AmpereOne"},    {0xc0, 0xac4, "Ampere AmpereOne A"},
    {0x48, 0xd01, "HiSilicon TaiShan v110 (Kunpeng 920)"},
    {0x46, 0x001, "Fujitsu A64FX"},       {0x51, 0x001, "Qualcomm Oryon"},
};

std::string trimmed(const std::string& s) {
  const size_t first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r") - first + 1);
}

}  // namespace

std::string arm_cpu_name_from_cpuinfo(const std::string& cpuinfo) {
  std::vector<std::pair<std::string, int>> cores;  // each distinct core, in order, and its count
  unsigned implementer = 0;
  bool have_implementer = false;
  std::istringstream lines(cpuinfo);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string key = trimmed(line.substr(0, colon)), value = trimmed(line.substr(colon + 1));
    char* end = nullptr;
    const unsigned long number = std::strtoul(value.c_str(), &end, 0);
    if (value.empty() || *end != 0) continue;  // not a number: not a field read here
    if (key == "CPU implementer") {
      implementer = unsigned(number);
      have_implementer = true;
    } else if (key == "CPU part" && have_implementer) {
      std::string name;
      for (const ArmCore& core : kArmCores)
        if (core.implementer == implementer && core.part == number) {
          name = core.name;
          break;
        }
      if (name.empty()) {
        char unknown[64];
        std::snprintf(unknown, sizeof(unknown), "implementer 0x%02x part 0x%03lx", implementer, number);
        name = unknown;
      }
      auto known = cores.begin();
      while (known != cores.end() && known->first != name) ++known;
      if (known == cores.end()) cores.emplace_back(name, 1);
      else ++known->second;
      have_implementer = false;
    }
  }
  // One kind of core: its name; big.LITTLE: "ARM Cortex-A76 x4 + ARM Cortex-A55 x4".
  if (cores.size() == 1) return cores[0].first;
  std::string joined;
  for (const auto& core : cores) joined += (joined.empty() ? "" : " + ") + core.first + " x" + std::to_string(core.second);
  return joined;
}

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("LLAMAS_LLC_BYTES")) {  // an override (a container whose sysfs misleads)
      char* end = nullptr;
      const long long value = std::strtoll(env, &end, 10);
      if (end != env && *end == 0 && value >= 0) return int64_t(value);
    }
    int64_t largest = 0;
#if defined(__linux__)
    // index0..: L1d, L1i, L2, L3; each "size" reads like "32768K".
    for (int i = 0; i < 8; ++i) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      long long value = 0;
      std::string unit;
      if (!(file >> value)) break;
      file >> unit;
      const int64_t scale = unit == "K" ? 1 << 10 : unit == "M" ? 1 << 20 : 1;
      if (value * scale > largest) largest = value * scale;
    }
#elif defined(__APPLE__)
    for (const char* name : {"hw.l3cachesize", "hw.l2cachesize"}) {
      int64_t value = 0;
      size_t size = sizeof(value);
      if (sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value > largest) largest = value;
    }
#endif
    return largest > 0 ? largest : int64_t(32) << 20;
  }();
  return bytes;
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
#elif defined(__aarch64__) && defined(__APPLE__)
  char brand[128] = {0};
  size_t size = sizeof(brand) - 1;
  if (sysctlbyname("machdep.cpu.brand_string", brand, &size, nullptr, 0) == 0 && brand[0]) return brand;  // "Apple M2"
  return "arm64";
#elif defined(__aarch64__)
  std::ifstream file("/proc/cpuinfo");
  std::stringstream text;
  text << file.rdbuf();
  const std::string name = arm_cpu_name_from_cpuinfo(text.str());
  return name.empty() ? "aarch64" : name;
#else
  return "unknown";
#endif
}

}  // namespace llamas
