#pragma once
#include <cstdint>
#include <string>

namespace llamas {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool avx512_vbmi = false;
  bool avx512_fp16 = false;
  // AArch64: Advanced SIMD (every ARMv8-A core has it; the neon kernel variant needs only this),
  // and the dot-product, bfloat16 and int8 matrix-multiply extensions (reported, not yet used).
  bool neon = false;
  bool asimd_dotprod = false;
  bool arm_bf16 = false;
  bool arm_i8mm = false;
};

// What the CPU and the operating system support (x86: CPUID plus XGETBV for the saved register
// state; AArch64: the kernel's HWCAP bits on Linux, sysctl on macOS),
// less the features LLAMAS_CPU_HIDE names (a comma list of cpu_feature_names, e.g.
// "avx512_bf16,avx512_vnni"): the kernels then run as on a CPU without them. That is how the tests
// reach, on a Zen 4, the paths a Skylake-X (no VNNI, no BF16) or a Cascade Lake (no VBMI) takes.
const CpuFeatures& cpu_features();
// The feature names, in CpuFeatures order (also the keys of llamas._C.cpu_features()), and whether
// cpu_features() has the named one (false for an unknown name).
const char* const* cpu_feature_names(int* count);
bool has_cpu_feature(const std::string& name);
// The CPU model string from CPUID (x86), sysctl (macOS) or /proc/cpuinfo's core numbers (AArch64
// Linux: "ARM Neoverse V1"), or the architecture name elsewhere.
std::string cpu_name();
// The size of the largest CPU cache, in bytes (Linux: sysfs's cache of cpu0; macOS: sysctl), or
// 32 MiB when the system does not say; $LLAMAS_LLC_BYTES (a byte count) overrides it. A model
// whose weights are larger reads them from memory at every token; GPT2Model marks its matrices so
// (PackedMatrix::streamed).
int64_t last_level_cache_bytes();
// The ARM cores a /proc/cpuinfo text lists, by name ("implementer 0x.. part 0x..." for one this
// does not know), each distinct one once: "ARM Cortex-A76 x4 + ARM Cortex-A55 x4" where they
// differ; "" when the text names none. Portable, so it is tested everywhere.
std::string arm_cpu_name_from_cpuinfo(const std::string& cpuinfo);

}  // namespace llamas
