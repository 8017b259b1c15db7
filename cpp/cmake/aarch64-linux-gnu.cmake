# CMake toolchain file: cross-compile libwqedge for AArch64 Linux with Debian's
# g++-aarch64-linux-gnu, and run its executables (ctest) under qemu-user.
#   cmake -S cpp -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=cpp/cmake/aarch64-linux-gnu.cmake
# Overridable: WQEDGE_AARCH64_PREFIX (compiler prefix), WQEDGE_AARCH64_SYSROOT (qemu -L root).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED WQEDGE_AARCH64_PREFIX)
  set(WQEDGE_AARCH64_PREFIX aarch64-linux-gnu-)
endif()
if(NOT DEFINED WQEDGE_AARCH64_SYSROOT)
  set(WQEDGE_AARCH64_SYSROOT /usr/aarch64-linux-gnu)
endif()
set(CMAKE_C_COMPILER ${WQEDGE_AARCH64_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${WQEDGE_AARCH64_PREFIX}g++)

set(CMAKE_FIND_ROOT_PATH ${WQEDGE_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# BOTH: find_package(wqedge) must also find a prefix installed outside the sysroot (examples/).
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# ctest (and add_test commands) run the target binaries through qemu-user.
find_program(WQEDGE_QEMU_AARCH64 qemu-aarch64)
if(WQEDGE_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${WQEDGE_QEMU_AARCH64} -L ${WQEDGE_AARCH64_SYSROOT})
endif()
