#!/usr/bin/env bash
# The test suite against a build of the extension with AddressSanitizer and UndefinedBehaviorSanitizer:
# out-of-bounds reads and writes, use after free, misaligned or oversized allocations, signed
# overflow and bad shifts in the C++ runtime fail the run with a stack trace instead of passing by luck.
# Run it from an environment where `pip install ".[test]"` was done: `tools/sanitize.sh [pytest args]`.
# The build goes to build/sanitize (~4 minutes on 2 cores), the instrumented package to a temporary
# folder; the tests take ~3x their usual time. `.ci/run` runs it after the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
cxx=${CXX:-c++}
asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
if [[ "$asan" != /* || "$ubsan" != /* ]]; then
  echo "sanitize: $cxx has no AddressSanitizer/UndefinedBehaviorSanitizer runtime (libasan.so, libubsan.so); skipped"
  exit 0
fi
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
pip install --quiet --no-deps --target "$target" \
  -C cmake.build-type=RelWithDebInfo -C build-dir=build/sanitize \
  -C "cmake.define.CMAKE_CXX_FLAGS=$flags" -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=$flags" .
# CPython keeps objects alive at exit by design, so leak reports would all be its own.
LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONPATH="$target" \
  python -m pytest -q -p no:cacheprovider "$@"
