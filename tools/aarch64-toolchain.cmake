# CMake toolchain for cross-building onebit for 64-bit ARM Linux on another host (make wheel-aarch64):
# Debian's aarch64-linux-gnu cross compiler and C library; programs (python, nanobind's helpers)
# are the host's; the Python headers are the host's too (same CPython version: nanobind needs
# only its headers, and the extension's suffix and wheel tag come from the environment).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
