#!/bin/bash
# Kernel throughput on a many-core machine (issue 12): bench/matvec_bench.cpp built from this tree and,
# when cpp/build-basesrc/src holds an older copy of cpp/src, from that one too; DRAM triad and decode
# matvec GB/s per block kind at 1, 2, 8 and all threads. Usage: bench/device_matvec.sh [layers]
# (12 TinyLlama layers: 281 MB at q4; take more where the last-level cache is larger than that.)
# KINDS and THREADS (environment) replace the default lists; ROW_LAYOUT=1 adds this tree without the repack (-p 0),
# PREFETCH=1 the tile prefetch on/off comparison. PREFILL=N measures prefill instead (matmul of N tokens through the same
# linears: the int8 tile GEMM against the float prefill, -a f32, interleaved; then the GEMM with VNNI off), and exits.
# SRC (default cpp/src) is the source tree to build, e.g. a snapshot of a commit carried to the device.
set -e
L=${1:-12}
SRC=${SRC:-cpp/src}
nproc; lscpu | grep -E "Model name|L3|Flags" | sed 's/Flags:.*\(avx2\).*\(avx512f\|\).*/Flags: avx2 \2/' | head -4
CXX="g++ -O3 -std=c++17 -ffp-contract=off -DWQE_HAVE_TOKENIZER=1"
build() {  # src include out
    # every source of the library but the ONNX Runtime custom op (an older snapshot may have fewer files)
    $CXX -I"$1" -I"$2" bench/matvec_bench.cpp $(ls "$1"/*.cpp | grep -v ort_ops) -lpthread -o "$3"
}
build $SRC cpp/include /tmp/mv_new &
[ -d cpp/build-basesrc/src ] && build cpp/build-basesrc/src cpp/build-basesrc/include /tmp/mv_base &
wait
KINDS=${KINDS:-"q4 q3 q2 ternary q1 mix:q4,q3,q2,ternary"}
THREADS=${THREADS:-"1 2 8 $(nproc)"}
if [ -n "$PREFILL" ]; then
    for t in $THREADS; do
        for round in 1 2; do
            echo "== prefill $PREFILL tokens, int8 tile GEMM (after), round $round"; /tmp/mv_new -t $t -l $L -r 3 -n $PREFILL $KINDS
            echo "== prefill $PREFILL tokens, float (before; WQEDGE_ACT=f32), round $round"; /tmp/mv_new -t $t -l $L -r 3 -n $PREFILL -a f32 $KINDS
        done
        echo "== prefill, VNNI off (WQEDGE_NO_VNNI=1: the AVX2 GEMM)"; WQEDGE_NO_VNNI=1 /tmp/mv_new -t $t -l $L -r 3 -n $PREFILL $KINDS
    done
    exit 0
fi
for t in $THREADS; do
    /tmp/mv_new -t $t -triad
    for round in 1 2; do  # before/after interleaved twice: run-to-run differences of ~20% were seen
        [ -x /tmp/mv_base ] && { echo "== before (act q8), round $round"; /tmp/mv_base -t $t -l $L -r 6 $KINDS; }
        echo "== after (act q8), round $round"; /tmp/mv_new -t $t -l $L -r 6 $KINDS
    done
    echo "== after, VNNI off (WQEDGE_NO_VNNI=1: the AVX2 tile kernels)"; WQEDGE_NO_VNNI=1 /tmp/mv_new -t $t -l $L -r 6 $KINDS
    if [ -n "$ROW_LAYOUT" ]; then echo "== after, row layout (-p 0: this tree's kernels without the repack)"; /tmp/mv_new -t $t -p 0 -l $L -r 6 $KINDS; fi
done
# software prefetch of the next tile (linear.cpp tiled_task; off by default since 7d76121) on and off, q4 and q2 (PREFETCH=1)
if [ -n "$PREFETCH" ]; then
    for t in 1 2 $(nproc); do
        echo "== after, tile prefetch on / off, $t threads"
        WQEDGE_TILE_PREFETCH=1 /tmp/mv_new -t $t -l $L -r 6 q4 q2; /tmp/mv_new -t $t -l $L -r 6 q4 q2
    done
fi
