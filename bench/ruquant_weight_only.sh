#!/bin/bash
# Does RUQuant's rotation help weight-only low-bit plans (issue 15: "measure whether rotation also helps weight-only
# 2-3-bit plans (incoherence); make it the default where it does")? For each budget, `wqedge convert` of the model with
# and without --rotate (greedy plan, error feedback, activations at 8 bits: the rotation acts on the weights' fit and
# on the int8 activations only), no distillation (so that the rotation alone differs), then `wqedge eval` perplexity
# through the C++ runtime. Figures only, printed one line per file.
#   BITS="2.0 2.25 2.5 3.25" CHUNKS=16 bench/ruquant_weight_only.sh [model] [calib.txt] [eval.txt]
set -e
FIX="$(cd "$(dirname "$0")/../.." && pwd)/shared/fixtures"
M=${1:-$FIX/llama-s}; C=${2:-$FIX/text/calib.txt}; E=${3:-$FIX/text/eval.txt}
OUT=${OUT:-/tmp/wqedge-ruquant-weight-only}
mkdir -p "$OUT"
for B in ${BITS:-2.0 2.25 2.5 3.25}; do
  for R in plain rot; do
    X=""; [ $R = rot ] && X="--rotate"
    t0=$(date +%s)
    python -m wqedge convert "$M" --bits "$B" --calib "$C" --no-distill --no-check $X -o "$OUT/$B-$R.gguf" > "$OUT/$B-$R.log" 2>&1
    t1=$(date +%s)
    p=$(python -m wqedge eval "$OUT/$B-$R.gguf" --text "$E" --chunks "${CHUNKS:-16}" --backend cpp --threads 2 2>&1 | tail -1)
    echo "bits=$B $R convert_s=$((t1 - t0)) :: $p"
  done
done
