# CMake toolchain for Debian/Ubuntu's AArch64 cross compiler (g++-aarch64-linux-gnu), whose
# libraries and headers live under /usr/aarch64-linux-gnu. Used by tools/aarch64_check.sh and
# tools/aarch64_pytest.sh. Packages (pybind11's config) may come from the host.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
