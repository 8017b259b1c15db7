#!/bin/bash
# Issue 17's open measurement on a GPU machine: the compact row headers (the default kinds q4c .. q1c) under the GPU
# default pipeline (bench/distill.py --configs default: error feedback on 256 windows, distillation on 512 with codes
# trained and an end-to-end stage), against the fp16-header rows of bench/results/distill_codes.md.
#
#   bench/device_compact_ab.sh prepare           here: .devcarry/ with the gguf wheel and the fixture as archives
#                                                (the device machine has no internet and no ../shared)
#   bench/device_compact_ab.sh llama [SEEDS] [BUDGETS] [LIMIT]
#                                                on the device (`run` with carry [".devcarry"]): llama-s, one
#                                                bench/distill.py process per seed sharing the GPU (default seeds
#                                                0 1 2, budgets 2.5,3.25, each process stopped after LIMIT s, 400)
#   bench/device_compact_ab.sh smol [BUDGETS]    on the device: trains smol-s (bench/train_checkpoint.py, 4 min) and
#                                                runs compact and --no-compact side by side on it (default 2.5,3.25,2.0)
#
# Rows and logs go to $OUT (the device's result folder). Issue 17's targets for the default pipeline on llama-s are
# judged on the 3-seed means: <= 6.60 at 2.5 b and <= 6.36 at 3.25 b (fp16 headers: 6.638 +- 0.032, 6.367 +- 0.021).
set -u
CARRY=.devcarry
MODE=${1:-}
case "$MODE" in
  prepare)
    set -e
    FIX=${FIXTURES:-$(cd "$(dirname "$0")/../.." && pwd)/shared/fixtures}
    mkdir -p $CARRY/whl
    python3 -m pip download -q --no-deps -d $CARRY/whl "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    tar -C "$FIX" -cJf $CARRY/llama-s.tar.xz llama-s
    tar -C "$FIX" -cJf $CARRY/text.tar.xz text
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude   # never committed
    du -sh $CARRY
    exit 0 ;;
  llama|smol) ;;
  *) echo "usage: $0 prepare | llama [SEEDS] [BUDGETS] [LIMIT] | smol [BUDGETS]" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1
: "${OUT:?OUT (the result folder) is not set: run this on the device machine}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $CARRY/whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
ln -sfn "$PWD/converters" wqedge/converters; ln -sfn "$PWD/runtime" wqedge/runtime   # the source tree as the package
exec > >(tee "$OUT/log_$MODE.txt") 2>&1
date; nvidia-smi -L; git log --oneline -1 2>/dev/null
T0=$SECONDS
PIDS=()   # the processes to wait for: a bare `wait` also waits for the tee above, which never ends

distill() {  # name model calib eval limit args...: one bench/distill.py process, its rows in $OUT/name.md
  local name=$1 m=$2 c=$3 e=$4 limit=$5; shift 5
  timeout "$limit" python3 bench/distill.py --model "$m" --calib "$c" --eval "$e" --device cuda --configs default \
    --time-limit $((limit - 70)) --out "$OUT/$name.md" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $? at $((SECONDS - T0)) s"
}

if [ "$MODE" = llama ]; then
  SEEDS=${2:-"0 1 2"}; BUDGETS=${3:-2.5,3.25}; LIMIT=${4:-400}
  mkdir -p /tmp/fx && tar -C /tmp/fx -xJf $CARRY/llama-s.tar.xz && tar -C /tmp/fx -xJf $CARRY/text.tar.xz || exit 1
  for s in $SEEDS; do
    distill "s$s" /tmp/fx/llama-s /tmp/fx/text/calib.txt /tmp/fx/text/eval.txt "$LIMIT" --budgets "$BUDGETS" --seed "$s" &
    PIDS+=($!)
  done
  wait "${PIDS[@]}"
else
  BUDGETS=${2:-2.5,3.25,2.0}
  timeout 330 python3 bench/train_checkpoint.py --out /tmp/smol --minutes 4 > "$OUT/train.log" 2>&1
  echo "train exit $? at $((SECONDS - T0)) s"; cp /tmp/smol/smol-s/TRAINING.md "$OUT/" 2>/dev/null
  LEFT=$((570 - SECONDS + T0))
  S=/tmp/smol
  distill compact $S/smol-s $S/text/calib.txt $S/text/eval.txt $LEFT --budgets "$BUDGETS" &
  PIDS+=($!)
  distill fp16hdr $S/smol-s $S/text/calib.txt $S/text/eval.txt $LEFT --budgets "$BUDGETS" --no-compact &
  PIDS+=($!)
  wait "${PIDS[@]}"
fi
for f in "$OUT"/*.md; do echo "== $(basename "$f")"; grep "|" "$f" | grep -v "^| bits\|---"; done
echo "all done at $((SECONDS - T0)) s"
