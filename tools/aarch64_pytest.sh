#!/usr/bin/env bash
# The Python test suite on AArch64, emulated: an AArch64 CPython 3.11 (Debian bookworm's packages,
# unpacked into a folder, not installed), the dependencies' AArch64 wheels from PyPI, and the
# extension cross-built with aarch64-linux-gnu-g++, all run by qemu-aarch64 (user mode).
# Needs Debian or Ubuntu with g++-aarch64-linux-gnu and qemu-user installed, and apt able to
# download arm64 packages (`dpkg --add-architecture arm64 && apt-get update`, as root).
# Not part of CI: the emulated suite takes ~30 minutes on 2 cores (plus ~5 to set up the first time).
#   tools/aarch64_pytest.sh [pytest args]      e.g. tools/aarch64_pytest.sh -q tests/test_kernels.py
# Work folder: build/aarch64-pytest (root/ the unpacked CPython, site/ the wheels, pkg/ llamas).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$PWD/build/aarch64-pytest
root=$work/root
for tool in aarch64-linux-gnu-g++ qemu-aarch64 apt-get dpkg; do
  command -v "$tool" > /dev/null || { echo "aarch64_pytest: $tool not found (see the header of $0)" >&2; exit 1; }
done
mkdir -p "$work/debs"
if [[ ! -x "$root/usr/bin/python3.11" ]]; then
  (cd "$work/debs" && for p in python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev \
      libpython3.11 python3.11 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 \
      libstdc++6 libgcc-s1 libncursesw6 libtinfo6 libreadline8 libcrypt1 libdb5.3 libgdbm6 libc6; do
    apt-get download "$p:arm64" > /dev/null
  done)
  mkdir -p "$root"
  for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$root"; done
fi
if [[ ! -d "$work/site/numpy" ]]; then
  python -m pip install --quiet --target "$work/site" --implementation cp --python-version 3.11 --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    numpy tokenizers fastapi uvicorn httptools uvloop prometheus-client jinja2 pytest openai httpx jsonschema
fi
# The extension, cross-built against the AArch64 CPython's headers.
python -c "import pybind11" 2> /dev/null || python -m pip install --quiet pybind11
cmake -S . -B "$work/build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$PWD/tools/aarch64-linux-gnu.cmake" -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" \
  -DPython_INCLUDE_DIR="$root/usr/include/python3.11" -DCMAKE_CXX_FLAGS="-I$root/usr/include" > /dev/null
cmake --build "$work/build" -j "$(nproc 2> /dev/null || echo 2)"
rm -rf "$work/pkg" && mkdir -p "$work/pkg" && cp -r python/llamas "$work/pkg/"
rm -f "$work"/pkg/llamas/_C*.so
cp "$work"/build/_C*.so "$work/pkg/llamas/_C.cpython-311-aarch64-linux-gnu.so"
# A launcher whose path is sys.executable (qemu's -0), so tests that start `python -m llamas ...`
# subprocesses start them under qemu too.
cat > "$work/python" <<EOF
#!/bin/sh
export PYTHONHOME=$root/usr PYTHONPATH=$work/pkg:$work/site\${PYTHONPATH:+:\$PYTHONPATH}
exec qemu-aarch64 -L $root -0 $work/python $root/usr/bin/python3.11 "\$@"
EOF
chmod +x "$work/python"
"$work/python" -c "import llamas, platform; print('aarch64_pytest:', platform.machine(), llamas.info()['kernel_variant'])"
exec "$work/python" -m pytest -p no:cacheprovider "$@"
