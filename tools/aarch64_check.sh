#!/usr/bin/env bash
# Cross-compiles the C++ runtime for 64-bit ARM, so a change that breaks those builds fails CI on
# an x86-64 machine: llamas_core (its generic and NEON kernel variants) and bench/bench_kernels,
#  1. for AArch64 Linux, and where qemu-aarch64 is installed runs `bench_kernels --check` under it
#     (every variant's GEMM paths against the reference at odd sizes);
#  2. for macOS on Apple silicon (compiled and linked; nothing here can run it).
#
# Compilers: for Linux, aarch64-linux-gnu-g++ when installed (Debian: g++-aarch64-linux-gnu), else
# zig's clang (a static musl binary, which qemu runs without an AArch64 sysroot); for macOS, zig's
# clang. zig comes from PyPI (`pip install ziglang`, done here in the active environment when
# missing). ~3.5 minutes on 2 cores with zig for both (its first run also builds its C++ library);
# `.ci/run` runs it.
#   tools/aarch64_check.sh            as above
#   tools/aarch64_check.sh --gcc      insist on aarch64-linux-gnu-g++ for Linux (fail if missing)
#   tools/aarch64_check.sh --zig      zig for Linux too, even where the GCC cross compiler is installed
set -euo pipefail
mode=${1:-auto}
case "$mode" in
  auto | --gcc | --zig) ;;
  *) echo "usage: tools/aarch64_check.sh [--gcc | --zig]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
command -v cmake > /dev/null && command -v ninja > /dev/null || python -m pip install --quiet cmake ninja

# zig_toolchain BUILD TARGET SYSTEM PROCESSOR [CMAKE LINES...]: BUILD/zig/c++, ar and ranlib as
# single executables (CMake takes no arguments in CMAKE_CXX_COMPILER) running zig for TARGET, and
# BUILD/toolchain.cmake naming them, for CMAKE_SYSTEM_NAME SYSTEM, plus the extra lines.
zig_toolchain() {
  local build=$1 target=$2 system=$3 processor=$4
  shift 4
  zig_tools "$PWD/$build/zig" "$target"
  {
    echo "set(CMAKE_SYSTEM_NAME $system)"
    echo "set(CMAKE_SYSTEM_PROCESSOR $processor)"
    for tool in CXX_COMPILER:c++ AR:ar RANLIB:ranlib; do echo "set(CMAKE_${tool%%:*} $PWD/$build/zig/${tool#*:})"; done
    for line in "$@"; do echo "$line"; done
  } > "$build/toolchain.cmake"
}

zig_tools() {
  python -c "import ziglang" 2> /dev/null || python -m pip install --quiet ziglang
  local python_exe
  python_exe=$(command -v python)
  mkdir -p "$1"
  printf '#!/bin/sh\nexec "%s" -m ziglang c++ -target %s "$@"\n' "$python_exe" "$2" > "$1/c++"
  printf '#!/bin/sh\nexec "%s" -m ziglang ar "$@"\n' "$python_exe" > "$1/ar"
  printf '#!/bin/sh\nexec "%s" -m ziglang ranlib "$@"\n' "$python_exe" > "$1/ranlib"
  chmod +x "$1/c++" "$1/ar" "$1/ranlib"
}

# build DIR WHAT: configures and builds llamas_core and bench_kernels in DIR with DIR/toolchain.cmake.
build() {
  echo "aarch64_check: $2"
  cmake -S . -B "$1" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$PWD/$1/toolchain.cmake" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMAS_BUILD_PYTHON=OFF -DLLAMAS_BUILD_BENCH=ON > "$1/configure.log" || { cat "$1/configure.log"; exit 1; }
  cmake --build "$1" -j "$(nproc 2> /dev/null || echo 2)"
}

# 1. AArch64 Linux
if [[ "$mode" != "--zig" ]] && command -v aarch64-linux-gnu-g++ > /dev/null; then
  linux=build/aarch64-check-linux-gcc
  mkdir -p "$linux"
  compiler="GCC $(aarch64-linux-gnu-g++ -dumpfullversion)"
  sysroot=/usr/aarch64-linux-gnu
  cp tools/aarch64-linux-gnu.cmake "$linux/toolchain.cmake"
elif [[ "$mode" == "--gcc" ]]; then
  echo "aarch64_check: aarch64-linux-gnu-g++ not found (--gcc asks for it)" >&2
  exit 1
else
  linux=build/aarch64-check-linux-zig
  mkdir -p "$linux"
  zig_toolchain "$linux" aarch64-linux-musl Linux aarch64 "set(CMAKE_EXE_LINKER_FLAGS_INIT -static)"
  compiler="zig $(python -m ziglang version) (clang), static musl"
  sysroot=""
fi
build "$linux" "AArch64 Linux with $compiler"
# ELF e_machine (bytes 18-19) must be EM_AARCH64 (183).
machine=$(od -An -tu2 -j18 -N2 "$linux/bench_kernels" | tr -d ' ')
[[ "$machine" == "183" ]] || { echo "aarch64_check: $linux/bench_kernels is not AArch64 (e_machine $machine)" >&2; exit 1; }
if command -v qemu-aarch64 > /dev/null; then
  echo "aarch64_check: bench_kernels --check under qemu-aarch64"
  qemu-aarch64 ${sysroot:+-L "$sysroot"} "$linux/bench_kernels" --check
else
  echo "aarch64_check: AArch64 Linux build compiled; qemu-aarch64 is not installed, so its kernels did not run"
fi

# 2. macOS on Apple silicon
mac=build/aarch64-check-macos
mkdir -p "$mac"
zig_toolchain "$mac" aarch64-macos Darwin arm64 'set(CMAKE_OSX_SYSROOT "")' 'set(CMAKE_OSX_DEPLOYMENT_TARGET "")'
build "$mac" "macOS arm64 with zig $(python -m ziglang version) (clang)"
# Mach-O: magic 0xfeedfacf, then cputype CPU_TYPE_ARM64 (0x0100000c), little-endian.
header=$(od -An -tx1 -N8 "$mac/bench_kernels" | tr -d ' ')
[[ "$header" == "cffaedfe0c000001" ]] || { echo "aarch64_check: $mac/bench_kernels is not an arm64 Mach-O ($header)" >&2; exit 1; }
echo "aarch64_check: macOS arm64 build compiled and linked (not run: no macOS here)"
