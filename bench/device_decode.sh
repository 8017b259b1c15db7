#!/bin/bash
# End-to-end decode on a machine with more cores (issue 12: "once at 8 threads on a machine with more cores"):
# our runtime against llama.cpp (llama-cpp-python) on the TinyLlama-1.1B-shaped random checkpoint, at 1, 2, 8 and
# all threads, with bench/decode_ab.py (interleaved rounds, best tok/s). Files are made as `wqedge bench` makes its
# speed-model rows (wqedge.bench.files: uniform q4 and the llama-s greedy plans resampled onto the shape, min-max
# fits, q8 head; llama.cpp Q4_0 / Q2_K / Q3_K_M by its own quantizer), in $CACHE (default ~/.cache/wqedge/bench).
# PLANS=<folder of the llama-s plan-greedy-<bits>.json made by `wqedge bench`> to skip the fixture and planning.
# Usage: [PLANS=dir] [PREFETCH=1] [KEYS="wq-q4 lcp-Q4_0 ..."] bench/device_decode.sh [threads...]   (needs llama-cpp-python importable)
set -e
THREADS=${*:-"1 2 8 $(nproc)"}
CACHE=${CACHE:-$HOME/.cache/wqedge/bench}
ROUNDS=${ROUNDS:-2}
KEYS=${KEYS:-"wq-q4 wq-2.5 wq-3.25 lcp-Q4_0 lcp-Q2_K lcp-Q3_K_M"}  # rows of wqedge bench's speed model
nproc; lscpu | grep -E "Model name|Thread|L3" | head -3
python3 - "$CACHE" "${PLANS:-}" "$KEYS" > /tmp/decode_files.txt <<'PY'
import sys
from pathlib import Path
from wqedge.bench.files import ModelFiles, speed_checkpoint
cache, plans = Path(sys.argv[1]), sys.argv[2]
say = lambda m: print(m, file=sys.stderr, flush=True)
if plans:  # llama-s greedy plans already made (plan-greedy-<bits>.json): no fixture, no planning here
    from wqedge.plan import Plan
    class Plans:
        def plan(self, bits, two_level=False):  # the names wqedge.bench.files.ModelFiles.plan caches them under
            return Plan.load(Path(plans) / f"plan-greedy{'-2l' if two_level else ''}-{bits:g}.json")
    qual = Plans()
else:
    from wqedge.cli import _default_fixture
    qual = ModelFiles(_default_fixture("llama-s"), cache, Path(_default_fixture("text", "calib.txt")).read_text(), say)
sp = ModelFiles(speed_checkpoint("tinyllama-1.1b", cache, say), cache, None, say, plan_source=qual, speed_only=True)
for key in sys.argv[3].split():
    print(key, sp.file(key))
PY
cat /tmp/decode_files.txt
f() { grep "^$1 " /tmp/decode_files.txt | cut -d' ' -f2; }
ARGS=""
for k in $KEYS; do case $k in wq-*) ARGS="$ARGS --wq $(f $k)";; lcp-*) ARGS="$ARGS --lcp $(f $k)";; esac; done
for t in $THREADS; do
    python3 bench/decode_ab.py $ARGS --threads $t --rounds $ROUNDS --decode 64
done
if [ -n "$PREFETCH" ]; then  # the tile kernels' software prefetch (default: on for Intel CPUs only), A/B on our files
    for t in $THREADS; do
        python3 bench/decode_ab.py --wq "$(f wq-q4)" --wq "$(f wq-2.5)" --variant pf1:WQEDGE_TILE_PREFETCH=1 --variant pf0:WQEDGE_TILE_PREFETCH=0 \
            --lcp "$(f lcp-Q4_0)" --threads $t --rounds $ROUNDS --decode 64 || true
    done
fi
