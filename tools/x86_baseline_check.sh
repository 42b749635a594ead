#!/usr/bin/env bash
# Checks that one x86-64 build runs on CPUs without AVX-512 and without AVX at all, as the kernel
# variants chosen at run time promise. Only csrc/cpu/variant_avx2.cpp and variant_avx512.cpp are
# compiled with AVX flags; an AVX instruction anywhere else is a crash (SIGILL) on an older CPU.
#  1. Builds llamas_core and bench/bench_kernels (Release; the two AVX variant objects in Debug
#     too) and checks that those objects define no symbol another file could link to but their
#     own *_kernel_table(): a copy of a shared inline function the compiler did not inline there
#     is AVX code, and the linker may keep it for every caller (see CMakeLists.txt).
#  2. Where qemu-x86_64 (user mode; Debian: qemu-user) is installed, runs `bench_kernels --check`
#     under emulated CPUs that fault on any instruction they lack: qemu64 (the first x86-64s:
#     SSE2, SSE3; the generic variant) and Haswell (AVX2, FMA, F16C, no AVX-512: avx2 and generic).
#  3. With --pytest [pytest args]: the test suite of the llamas the active Python imports (after
#     `pip install ".[test]"`), under an emulated Nehalem (x86-64-v2: SSE4.2, POPCNT, no AVX;
#     numpy 2.x needs that much, so the package's floor is numpy's) and Haswell; subprocesses the
#     tests start (`python -m llamas ...`) run emulated too. ~40 minutes for both on 2 cores.
# ~1.5 minutes without --pytest on 2 cores; `.ci/run` runs it so. (The suite's own tests of the
# other variants, by LLAMAS_KERNEL and by hiding CPU features, run their kernels on this CPU: only
# an older CPU, or an emulated one, faults on the AVX code that leaks out of them.)
#   tools/x86_baseline_check.sh                 steps 1 and 2
#   tools/x86_baseline_check.sh --pytest -q tests/test_kernels.py
set -euo pipefail
run_pytest=0
if [[ "${1:-}" == "--pytest" ]]; then
  run_pytest=1
  shift
elif [[ $# -gt 0 ]]; then
  echo "usage: tools/x86_baseline_check.sh [--pytest [pytest args]]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "x86_baseline_check: not an x86-64 machine ($(uname -m)); skipped"; exit 0 ;;
esac
command -v cmake > /dev/null && command -v ninja > /dev/null || python -m pip install --quiet cmake ninja

# Emulated CPUs: qemu's models, less the system features its emulator lacks (each would print a
# warning on every start; user-mode programs never see them).
declare -A cpus=(
  [qemu64]=qemu64
  [Nehalem]=Nehalem
  [Haswell]=Haswell-v4,-pcid,-x2apic,-tsc-deadline,-invpcid,-spec-ctrl
)
declare -A expected_variant=([Nehalem]=generic [Haswell]=avx2)

configure() {  # configure DIR BUILD_TYPE
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE="$2" -DLLAMAS_BUILD_PYTHON=OFF -DLLAMAS_BUILD_BENCH=ON \
    > "$1.configure.log" || { cat "$1.configure.log"; exit 1; }
}

# check_variant_objects DIR: every AVX variant object in DIR defines, outside its own file, only
# its *_kernel_table() (and the exception personality's reference, data; with clang, also its
# __clang_call_terminate, which only calls std::terminate).
check_variant_objects() {
  local object found=0 extra
  for object in "$1"/CMakeFiles/llamas_core.dir/csrc/cpu/variant_avx*.cpp.o; do
    [[ -f "$object" ]] || continue
    found=$((found + 1))
    extra=$(nm -C --defined-only "$object" | awk '$2 !~ /^[a-z]$/' |
      grep -v -e ' llamas::cpu::[a-z0-9]*_kernel_table()$' -e ' DW\.ref\.__gxx_personality_v0$' \
        -e ' __clang_call_terminate$' || true)
    if [[ -n "$extra" ]]; then
      echo "x86_baseline_check: $object defines symbols other files could link to (AVX code on any CPU):" >&2
      echo "$extra" >&2
      exit 1
    fi
  done
  [[ "$found" -gt 0 ]] || { echo "x86_baseline_check: no AVX variant objects in $1 (the compiler takes no AVX flags?)" >&2; exit 1; }
  echo "x86_baseline_check: $1: the $found AVX variant objects export only their kernel tables"
}

# 1. The objects: Release, and Debug (where nothing is inlined unless CMakeLists.txt sees to it).
release=build/x86-baseline-release
debug=build/x86-baseline-debug
mkdir -p build
configure "$release" Release
cmake --build "$release" -j "$(nproc 2> /dev/null || echo 2)"
check_variant_objects "$release"
configure "$debug" Debug
objects=$(cd "$debug" && ninja -t targets all | grep -o '^CMakeFiles/llamas_core\.dir/csrc/cpu/variant_avx[0-9]*\.cpp\.o' || true)
[[ -z "$objects" ]] || (cd "$debug" && ninja $objects)
check_variant_objects "$debug"

# 2. The kernels on emulated CPUs.
if ! command -v qemu-x86_64 > /dev/null; then
  echo "x86_baseline_check: qemu-x86_64 is not installed, so nothing ran on an emulated older CPU"
  [[ "$run_pytest" == 0 ]] || { echo "x86_baseline_check: --pytest needs qemu-x86_64" >&2; exit 1; }
  exit 0
fi
for name in qemu64 Haswell; do
  echo "x86_baseline_check: bench_kernels --check on an emulated $name"
  qemu-x86_64 -cpu "${cpus[$name]}" "$release/bench_kernels" --check
done
[[ "$run_pytest" == 1 ]] || exit 0

# 3. The test suite: a launcher per CPU whose path is sys.executable (qemu's -0), so the tests'
# subprocesses start emulated too. It runs the active environment's interpreter with that
# environment's packages on the path (the launcher is outside the venv, so Python would not find
# them itself).
python_exe=$(python -c "import os, sys; print(os.path.realpath(sys.executable))")
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
work=$PWD/build/x86-baseline-pytest
mkdir -p "$work"
status=0
for name in Nehalem Haswell; do
  launcher=$work/python-$name
  cat > "$launcher" <<EOF
#!/bin/sh
export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}
exec qemu-x86_64 -cpu ${cpus[$name]} -0 $launcher $python_exe "\$@"
EOF
  chmod +x "$launcher"
  variant=$("$launcher" -c "import llamas; print(llamas.info()['kernel_variant'])")
  echo "x86_baseline_check: pytest on an emulated $name (llamas picks the $variant kernels)"
  [[ "$variant" == "${expected_variant[$name]}" ]] || {
    echo "x86_baseline_check: expected the ${expected_variant[$name]} kernels on $name" >&2
    exit 1
  }
  "$launcher" -m pytest -p no:cacheprovider "$@" || status=1
done
exit "$status"
