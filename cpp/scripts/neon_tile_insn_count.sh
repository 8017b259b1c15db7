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

# Static view (objdump of the library's kernels_neon_tiles object): per copy of the block body in each decode chunk
# routine (GCC unrolls the block pair, plus the odd block: copies = int8 multiplies / 16 for SDOT, / 32 for plain),
# the vector instructions of the block and the stack accesses (register spills) around them.
OBJ="$(find "$BUILD" -name 'kernels_neon_tiles.cpp.o' | head -1)"
echo
echo "objdump of $(basename "$OBJ"): per block copy in tile_chunk<kind> / tile_chunk_ternary (ternary: per plane and block)"
python3 - "$OBJ" <<'PY'
import re, subprocess, sys
dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "-C", "--no-show-raw-insn", sys.argv[1]],
                     capture_output=True, text=True, check=True).stdout
funcs, cur = {}, None
for ln in dis.splitlines():
    m = re.match(r"^[0-9a-f]+ <(.*)>:$", ln)
    if m:
        cur = funcs.setdefault(m.group(1), [])
        continue
    m = re.match(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", ln)
    if m and cur is not None:
        cur.append((m.group(1), m.group(2)))
print("| build | kind | instructions | int8 multiplies | code decode (and/ushr/sli/orr/cmtst/cmhi/mul/shl/add) | stack accesses |")
print("|---|---|---:|---:|---:|---:|")
for build, mul, per in (("tiles_sdot", ("sdot",), 16), ("tiles_plain", ("smull", "smull2", "smlal", "smlal2"), 32)):
    for kind, sig in (("q4", "tile_chunk<2, 16, 1>"), ("q3", "tile_chunk<3, 12, 1>"), ("q2", "tile_chunk<4, 8, 1>"),
                      ("q1", "tile_chunk<6, 4, 1>"), ("ternary", "tile_chunk_ternary(")):
        name = next((f for f in funcs if build in f and sig in f), None)
        if name is None:
            print(f"| {build[6:]} | {kind} | (inlined) | | | |")
            continue
        ins = funcs[name]
        n_mul = sum(op in mul for op, _ in ins)
        copies = max(1, round(n_mul / per))
        dec = sum(op in ("and", "ushr", "sli", "orr", "cmtst", "cmhi", "cmhs", "mul", "shl", "add") and ".16b" in a for op, a in ins)
        sp = sum("[sp" in a for _, a in ins)
        print(f"| {build[6:]} | {kind} | {len(ins) / copies:.0f} | {n_mul / copies:.0f} | {dec / copies:.0f} | {sp / copies:.1f} |")
PY
