#!/usr/bin/env bash
# Cross-compile libwqedge for AArch64 (Debian's g++-aarch64-linux-gnu) and run its C++ tests under
# qemu-user; optionally install it and build/run examples/ against the installed package.
#
#   cpp/scripts/aarch64.sh [BUILD_DIR] [--example]      (default BUILD_DIR: cpp/build/aarch64, git-ignored)
#
# Installs the toolchain and qemu with apt-get when missing (needs root); exit status 3 when they
# are missing and cannot be installed. -O2 Release build of the library and the tests only.
# With --example: `cmake --install` into BUILD_DIR/prefix, then examples/ is configured with
# find_package(wqedge) (shared -> BUILD_DIR/example-shared, static -> BUILD_DIR/example-static).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$ROOT/cpp/build/aarch64"
EXAMPLE=0
for a in "$@"; do
  case "$a" in
    --example) EXAMPLE=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) BUILD="$(mkdir -p "$a" && cd "$a" && pwd)" ;;
  esac
done
TOOLCHAIN="$ROOT/cpp/cmake/aarch64-linux-gnu.cmake"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "aarch64.sh: missing ${need[*]} and cannot install them (needs root and apt-get)" >&2
    exit 3
  fi
  echo "aarch64.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cmake -S "$ROOT/cpp" -B "$BUILD" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" -DWQEDGE_BUILD_TESTS=ON -DWQEDGE_BUILD_TOOLS=OFF \
  -DCMAKE_INSTALL_PREFIX="$BUILD/prefix" >/dev/null
cmake --build "$BUILD" -j "$JOBS"
# ctest runs every test through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 -L /usr/aarch64-linux-gnu).
ctest --test-dir "$BUILD" --output-on-failure
# Both builds of the int8-activation NEON kernels (row layout and row tiles): SDOT (QEMU_CPU=max has the
# dot-product extension) and plain NEON (Cortex-A53, ARMv8.0, has not); the kernels pick one at run time. The
# prefill test also with ternary chunks in their own tiles (WQEDGE_TERNARY_TILES=1: the NEON ternary tile kernel).
for cpu in max cortex-a53; do
  echo "== test_prefill under qemu (QEMU_CPU=$cpu, WQEDGE_TERNARY_TILES=1):"
  WQEDGE_TERNARY_TILES=1 QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$BUILD/test_prefill"
  echo "== test_kernels under qemu (QEMU_CPU=$cpu):"
  QEMU_CPU=$cpu qemu-aarch64 -L /usr/aarch64-linux-gnu "$BUILD/test_kernels"
done

if ((EXAMPLE)); then
  cmake --install "$BUILD" >/dev/null
  for kind in shared static; do
    flag=OFF; [[ $kind == static ]] && flag=ON
    cmake -S "$ROOT/examples" -B "$BUILD/example-$kind" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$BUILD/prefix" -DWQEDGE_EXAMPLE_STATIC=$flag >/dev/null
    cmake --build "$BUILD/example-$kind" -j "$JOBS"
  done
  echo "== examples built: $BUILD/example-shared/generate $BUILD/example-static/generate"
fi
