#!/usr/bin/env bash
# Executed AArch64 instructions per 32-column block of 8 rows: the NEON row-tile kernels (BlockTraits::tile8, issue 12)
# against the row layout's dot8_rows kernels, each with SDOT (qemu -cpu max) and without (-cpu cortex-a53).
#   cpp/scripts/neon_tile_insn_count.sh [BUILD_DIR] [ITERS]
# BUILD_DIR: an AArch64 build from cpp/scripts/aarch64.sh (default cpp/build/aarch64; built when missing). Counts
# come from cpp/scripts/insn_count.cpp under `qemu-aarch64 -singlestep -d exec,nochain` (one logged translation block
# per executed guest instruction), as cpp/scripts/neon_insn_count.sh does: per call = (lines(ITERS) - lines(0)) / ITERS.
# Per block = the marginal cost: (per call at G = 512 - per call at G = 256) / 8 blocks / 2 (both kernels are called
# for 16 rows: two tiles, or dot8_rows over 16 rows), so call overhead, headers and the final d/m scaling drop out
# (they are listed separately as "per call at G = 256"). Deterministic: same binary, same counts. No timing: qemu
# says nothing about the speed of a real core.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${1:-$ROOT/cpp/build/aarch64}"
ITERS="${2:-10}"
[[ -f "$BUILD/libwqedge.a" ]] || "$ROOT/cpp/scripts/aarch64.sh" "$BUILD" >/dev/null
EXE="$BUILD/insn_count"
aarch64-linux-gnu-g++ -O2 -std=c++17 -I"$ROOT/cpp/include" -I"$ROOT/cpp/src" "$ROOT/cpp/scripts/insn_count.cpp" \
  "$BUILD/libwqedge.a" -static -pthread -o "$EXE"

count() {  # cpu type iters G -> executed guest instructions
  qemu-aarch64 -cpu "$1" -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D /dev/stderr "$EXE" 3 "$2" "$3" "$4" \
    2>&1 >/dev/null | grep -c '^Trace'
}
per_call() {  # cpu type G -> instructions per call (x100, for two decimals)
  local a b
  a=$(count "$1" "$2" 0 "$3"); b=$(count "$1" "$2" "$ITERS" "$3")
  echo $(( (b - a) * 100 / ITERS ))
}
per_block() {  # cpu type -> "per block of 8 rows | per call at G = 256" (16 rows per call)
  local c1 c2
  c1=$(per_call "$1" "$2" 256); c2=$(per_call "$1" "$2" 512)
  awk -v a="$c1" -v b="$c2" 'BEGIN { printf "%.1f | %.0f", (b - a) / 100 / 8 / 2, a / 100 }'
}
names=([2]=q4 [3]=q3 [4]=q2 [5]=ternary [6]=q1)
echo "AArch64 instructions per 32-column block of 8 rows (marginal, G = 256 -> 512); in brackets per call at G = 256 for 16 rows"
echo "| kind | tile8 SDOT | dot8_rows SDOT | rows / tiles | tile8 plain | dot8_rows plain | rows / tiles |"
echo "|---|---:|---:|---:|---:|---:|---:|"
cell() { echo "${1% | *} (${1#* | })"; }
for t in 2 3 4 5 6; do
  ts=$(per_block max $((t + 40))); rs=$(per_block max $((t + 30)))
  tp=$(per_block cortex-a53 $((t + 40))); rp=$(per_block cortex-a53 $((t + 30)))
  r1=$(awk -v a="${rs%% *}" -v b="${ts%% *}" 'BEGIN { printf "%.2fx", a / b }')
  r2=$(awk -v a="${rp%% *}" -v b="${tp%% *}" 'BEGIN { printf "%.2fx", a / b }')
  echo "| ${names[$t]} | $(cell "$ts") | $(cell "$rs") | $r1 | $(cell "$tp") | $(cell "$rp") | $r2 |"
done
