#pragma once
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
};

// What the CPU and the operating system support (CPUID plus XGETBV for the saved register state).
const CpuFeatures& cpu_features();
// LLAMAS_EMULATE_DOT=1: bfloat16 and int8 compute take their emulated paths (the FMA pair sums,
// the integer dots) even where the CPU has VDPBF16PS or VPDPBUSD, as a CPU without them would:
// how the tests reach those paths of the avx512 variant on a Zen 4. Read once.
bool emulate_dot_instructions();
// The CPU model string from CPUID, or the architecture name elsewhere.
std::string cpu_name();

}  // namespace llamas
