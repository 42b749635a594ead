#!/usr/bin/env bash
# Cross-compiles the C++ runtime for 64-bit ARM (llamas_core with its generic and NEON kernel
# variants, and bench/bench_kernels), so a change that breaks the AArch64 build fails CI on an
# x86-64 machine. Where qemu-aarch64 is installed it also runs `bench_kernels --check` under it:
# every variant's GEMM paths against the reference at odd sizes.
#
# The compiler: aarch64-linux-gnu-g++ when installed (Debian: g++-aarch64-linux-gnu), else zig's
# clang from PyPI (`pip install ziglang`, installed here into the active environment when missing),
# linking a static musl binary that qemu runs without an AArch64 sysroot. ~2.5 minutes on 2 cores
# (zig's first run also builds its own C++ library, ~1 minute). `.ci/run` runs it.
#   tools/aarch64_check.sh            compile, and run the check if qemu-aarch64 is here
#   tools/aarch64_check.sh --gcc      insist on aarch64-linux-gnu-g++ (fail if it is missing)
#   tools/aarch64_check.sh --zig      use zig even where the GCC cross compiler is installed
set -euo pipefail
mode=${1:-auto}
case "$mode" in
  auto | --gcc | --zig) ;;
  *) echo "usage: tools/aarch64_check.sh [--gcc | --zig]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
build=build/aarch64-check-${mode#--}
mkdir -p "$build"
toolchain="$PWD/$build/toolchain.cmake"

if [[ "$mode" != "--zig" ]] && command -v aarch64-linux-gnu-g++ > /dev/null; then
  compiler="GCC $(aarch64-linux-gnu-g++ -dumpfullversion)"
  sysroot=/usr/aarch64-linux-gnu
  cat > "$toolchain" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH $sysroot)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
EOF
elif [[ "$mode" == "--gcc" ]]; then
  echo "aarch64_check: aarch64-linux-gnu-g++ not found (--gcc asks for it)" >&2
  exit 1
else
  python -c "import ziglang" 2> /dev/null || python -m pip install --quiet ziglang
  zig_cxx="$PWD/$build/zig-c++"
  # The compiler as one executable (CMake takes no arguments in CMAKE_CXX_COMPILER).
  printf '#!/bin/sh\nexec "%s" -m ziglang c++ -target aarch64-linux-musl "$@"\n' "$(command -v python)" > "$zig_cxx"
  chmod +x "$zig_cxx"
  compiler="zig $(python -m ziglang version) (clang), static musl"
  sysroot=""
  cat > "$toolchain" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER $zig_cxx)
set(CMAKE_EXE_LINKER_FLAGS_INIT -static)
EOF
fi
command -v cmake > /dev/null && command -v ninja > /dev/null || python -m pip install --quiet cmake ninja

echo "aarch64_check: building with $compiler"
cmake -S . -B "$build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMAS_BUILD_PYTHON=OFF -DLLAMAS_BUILD_BENCH=ON > "$build/configure.log" || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc 2> /dev/null || echo 2)"
file_kind=$(od -An -tx1 -j18 -N2 "$build/bench_kernels" | tr -d ' ')
[[ "$file_kind" == "b700" ]] || { echo "aarch64_check: bench_kernels is not an AArch64 executable (e_machine $file_kind)" >&2; exit 1; }

if command -v qemu-aarch64 > /dev/null; then
  echo "aarch64_check: bench_kernels --check under qemu-aarch64"
  qemu-aarch64 ${sysroot:+-L "$sysroot"} "$build/bench_kernels" --check
else
  echo "aarch64_check: compiled; qemu-aarch64 not installed, so the kernels were not run"
fi
