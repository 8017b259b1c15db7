#!/usr/bin/env bash
# Executed AArch64 instructions of one decode step and one 16-token prefill step, row tiles vs the file's row layout
# (issue 12's NEON tile kernels; no ARM hardware here, so instruction counts under qemu-user, not timings):
#   bench/neon_tiles_insn.sh [BUILD_DIR]     (BUILD_DIR: an AArch64 build of cpp/scripts/aarch64.sh; default cpp/build/aarch64)
# bench/matvec_bench.cpp is cross-built against BUILD_DIR/libwqedge.a and run under
# `qemu-aarch64 -singlestep -d exec,nochain` (every executed guest instruction logged once, as
# cpp/scripts/neon_insn_count.sh counts): count(-r 1) - count(-r 0) of
#   matvec_bench -t 1 -l 1 -d 256,64,512 -a q8 -p {0|1} [-n 16] KIND
# i.e. one layer's seven linears (q/k/v, o, gate/up, down at hidden 256, k/v 64, feed-forward 512), 1 thread, int8
# activations; -p 0 = row layout (dot8_rows, gemm4), -p 1 = row tiles (tile8 / tile8_mix, tile8_gemm).
# QEMU_CPU=max has the dot-product extension (SDOT build), cortex-a53 not (plain NEON build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/cpp/build/aarch64}"
[[ -f "$BUILD/libwqedge.a" ]] || "$ROOT/cpp/scripts/aarch64.sh" "$BUILD" >/dev/null
EXE="$BUILD/matvec_bench"
aarch64-linux-gnu-g++ -O2 -std=c++17 -I"$ROOT/cpp/src" "$ROOT/bench/matvec_bench.cpp" "$BUILD/libwqedge.a" -static -pthread -o "$EXE"
cnt() {  # cpu args... -> executed instructions
  QEMU_CPU=$1 qemu-aarch64 -L /usr/aarch64-linux-gnu -singlestep -d exec,nochain -D /dev/stderr "$EXE" "${@:2}" 2>&1 >/dev/null \
    | grep -c '^Trace'
}
step() {  # cpu layout kind [-n N] -> instructions of one step
  local a b
  a=$(cnt "$1" -t 1 -l 1 -d 256,64,512 -a q8 -p "$2" -r 0 "${@:4}" "$3")
  b=$(cnt "$1" -t 1 -l 1 -d 256,64,512 -a q8 -p "$2" -r 1 "${@:4}" "$3")
  echo $((b - a))
}
echo "| step | kind | SDOT rows | SDOT tiles | rows / tiles | plain rows | plain tiles | rows / tiles |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for mode in decode prefill16; do
  extra=(); [[ $mode == prefill16 ]] && extra=(-n 16)
  for kind in q4 q3 q2 q1 ternary mix:q4,q3,q2,ternary; do
    row="| $mode | $kind"
    for cpu in max cortex-a53; do
      r=$(step $cpu 0 "$kind" "${extra[@]}"); t=$(step $cpu 1 "$kind" "${extra[@]}")
      row+=" | $r | $t | $(awk -v r="$r" -v t="$t" 'BEGIN { printf "%.2fx", r / t }')"
    done
    echo "$row |"
  done
done
