#!/usr/bin/env bash
# Executed AArch64 instructions per dot product, scalar reference vs NEON, counted with qemu-user
# (docs/neon.md has the method and the numbers):
#   cpp/scripts/neon_insn_count.sh [BUILD_DIR] [G] [ITERS]
# BUILD_DIR: an AArch64 build from cpp/scripts/aarch64.sh (default cpp/build/aarch64; built when
# missing). Each count runs cpp/scripts/insn_count.cpp under `qemu-aarch64 -singlestep -d exec,nochain`
# (one translation block per guest instruction, every executed block logged), once with 0 and once
# with ITERS timed calls; (lines(ITERS) - lines(0)) / ITERS = instructions per call (call overhead
# of the measuring loop, ~6 instructions, included). Deterministic: same binary, same counts.
# A second table: the int8-activation kernels (dot8 / dot8_rows), NEON with SDOT (qemu -cpu max) and
# without (-cpu cortex-a53), against the float NEON kernels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${1:-$ROOT/cpp/build/aarch64}"
G="${2:-128}"
ITERS="${3:-20}"
[[ -f "$BUILD/libwqedge.a" ]] || "$ROOT/cpp/scripts/aarch64.sh" "$BUILD" >/dev/null
EXE="$BUILD/insn_count"
aarch64-linux-gnu-g++ -O2 -std=c++17 -I"$ROOT/cpp/include" -I"$ROOT/cpp/src" "$ROOT/cpp/scripts/insn_count.cpp" \
  "$BUILD/libwqedge.a" -static -pthread -o "$EXE"

CPU=max
count() {  # kernels type iters -> executed guest instructions (qemu CPU model: $CPU)
  qemu-aarch64 -cpu "$CPU" -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D /dev/stderr "$EXE" "$1" "$2" "$3" \
    2>&1 >/dev/null | grep -c '^Trace'
}
per_call() {  # kernels type -> instructions per call
  local a b
  a=$(count "$1" "$2" 0); b=$(count "$1" "$2" "$ITERS")
  echo $(( (b - a + ITERS / 2) / ITERS ))
}
names=(fp16 q8 q4 q3 q2 ternary q1)
if [[ -z "${ONLY_Q8:-}" ]]; then  # ONLY_Q8=1: just the int8 table
echo "G=$G (g_pad=$(( (G + 31) / 32 * 32 ))), $ITERS calls per count"
echo "| type | scalar dot | NEON dot | ratio | scalar dot_rows / row | NEON dot_rows / row |"
echo "|---|---:|---:|---:|---:|---:|"
for t in 0 1 2 3 4 5 6; do
  s=$(per_call 1 $t); n=$(per_call 3 $t)
  sr=$(per_call 1 $((t + 10))); nr=$(per_call 3 $((t + 10)))
  ratio=$(awk -v s="$s" -v n="$n" 'BEGIN { printf "%.1fx", s / n }')
  echo "| ${names[$t]} | $s | $n | $ratio | $(( (sr + 8) / 16 )) | $(( (nr + 8) / 16 )) |"
done

fi
echo
echo "int8 activations (dot8; dot8_rows per row over 16 rows): NEON+SDOT (-cpu max) and plain NEON (-cpu cortex-a53)"
echo "| type | NEON f32 dot | SDOT dot8 | plain dot8 | NEON f32 dot_rows / row | SDOT dot8_rows / row | plain dot8_rows / row | scalar dot8 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for t in 1 2 3 4 5 6; do
  CPU=max; f=$(per_call 3 $t); fr=$(per_call 3 $((t + 10))); d=$(per_call 3 $((t + 20))); dr=$(per_call 3 $((t + 30))); s8=$(per_call 1 $((t + 20)))
  CPU=cortex-a53; p=$(per_call 3 $((t + 20))); pr=$(per_call 3 $((t + 30)))
  echo "| ${names[$t]} | $f | $d | $p | $(( (fr + 8) / 16 )) | $(( (dr + 8) / 16 )) | $(( (pr + 8) / 16 )) | $s8 |"
done
