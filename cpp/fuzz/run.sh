#!/usr/bin/env bash
# Build the libFuzzer harnesses (clang, ASan + UBSan, UB is fatal) and run each for a bounded time.
#
#   cpp/fuzz/run.sh [HARNESS...]          # default: gguf_file gguf_header tokenizer
#
# Environment: FUZZ_SECONDS (per harness, default 60), FUZZ_OUT (work folder, default cpp/build-fuzz/out:
# seeds, grown corpora, crash artifacts), FUZZ_BUILD (default cpp/build-fuzz), CXX (default clang++),
# FUZZ_JOBS (parallel libFuzzer jobs per harness, default 1). Seeds come from tiny models written by
# make_seeds.py (needs the wqedge Python package). Prints executions, coverage (cov/ft from libFuzzer's
# final status line) and findings per harness; exits 1 when any harness found something (artifacts
# are kept under $FUZZ_OUT/artifacts), 2 when the harnesses cannot be built.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CPP="$(dirname "$HERE")"
SECONDS_EACH="${FUZZ_SECONDS:-60}"
BUILD="${FUZZ_BUILD:-$CPP/build-fuzz}"
OUT="${FUZZ_OUT:-$BUILD/out}"
JOBS="${FUZZ_JOBS:-1}"
HARNESSES=("$@")
[ ${#HARNESSES[@]} -eq 0 ] && HARNESSES=(gguf_file gguf_header tokenizer)

mkdir -p "$BUILD" "$OUT"
if ! CXX="${CXX:-clang++}" cmake -S "$CPP" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWQEDGE_FUZZ=ON \
        -DWQEDGE_BUILD_TOOLS=OFF -DWQEDGE_BUILD_ORT_OPS=OFF >"$BUILD/fuzz-configure.log" 2>&1 \
   || ! cmake --build "$BUILD" -j "$(nproc)" --target $(printf 'fuzz_%s ' "${HARNESSES[@]}") >"$BUILD/fuzz-build.log" 2>&1; then
    echo "fuzz: cannot build the harnesses (clang++ with libFuzzer needed); see $BUILD/fuzz-{configure,build}.log" >&2
    tail -5 "$BUILD/fuzz-build.log" "$BUILD/fuzz-configure.log" 2>/dev/null >&2 || true
    exit 2
fi
if [ ! -f "$OUT/base.data" ]; then
    python3 "$HERE/make_seeds.py" "$OUT" >"$OUT/seeds.log" 2>&1 || { cat "$OUT/seeds.log" >&2; exit 2; }
fi
mkdir -p "$OUT/artifacts"
VOCABS="$(ls "$OUT"/vocab_*.gguf | tr '\n' ':')"
export WQEDGE_FUZZ_DATA="$OUT/base.data" WQEDGE_FUZZ_VOCABS="${VOCABS%:}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

status=0
summary=()
for h in "${HARNESSES[@]}"; do
    work="$OUT/work/$h"
    mkdir -p "$work"
    case "$h" in
        gguf_file) seeds="$OUT/corpus/gguf_file"; dict="$HERE/gguf.dict"; maxlen=262144 ;;
        gguf_header) seeds="$OUT/corpus/gguf_header"; dict="$HERE/gguf.dict"; maxlen=65536 ;;
        tokenizer) seeds=""; dict="$HERE/tokenizer.dict"; maxlen=4096 ;;
        *) echo "fuzz: unknown harness $h" >&2; exit 2 ;;
    esac
    log="$OUT/$h.log"
    before=$(ls "$OUT/artifacts" | grep -c "^$h-" || true)
    t0=$(date +%s)
    set +e
    "$BUILD/fuzz/fuzz_$h" "$work" $seeds -dict="$dict" -max_len=$maxlen -max_total_time="$SECONDS_EACH" \
        -timeout=20 -rss_limit_mb=2560 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$h-" \
        $( [ "$JOBS" -gt 1 ] && echo "-fork=$JOBS" ) >"$log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s)
    after=$(ls "$OUT/artifacts" | grep -c "^$h-" || true)
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    found=$((after - before))
    [ $rc -ne 0 ] && [ $found -eq 0 ] && found=1
    line="fuzz_$h: ${execs} executions, cov ${cov:-?}, ft ${ft:-?}, corpus $(ls "$work" | wc -l) units, $((t1 - t0)) s, findings ${found}"
    summary+=("$line")
    if [ $found -ne 0 ]; then
        status=1
        echo "== fuzz_$h FOUND something (exit $rc); log $log, artifacts:" >&2
        ls "$OUT/artifacts" | grep "^$h-" | sed "s|^|  $OUT/artifacts/|" >&2 || true
        grep -E 'ERROR|runtime error|invariant|SUMMARY' "$log" | head -20 >&2 || true
    fi
done
printf '%s\n' "${summary[@]}"
exit $status
