#!/usr/bin/env python3
"""Our runtime vs llama.cpp on the fixture llama-s — now a thin wrapper over `wqedge bench` (wqedge/bench/).

    python bench/llamacpp_bench.py [--threads 2] [--prefill 128] [--decode 64] [--reps 3] [--rounds 2]
                                   [--ppl-windows 4] [--calib] [--workdir DIR] [--out PATH] [--only LABELS]

keeps this script's options and its rows on llama-s (no speed model), and runs `wqedge bench`; the mixed
rows are now the greedy 3.25-bit plan (wq-3.25 / lcp-plan-3.25). --workdir is the file cache, --only takes
the old labels ("wqedge q4", "llama.cpp Q4_0", ...) or row names. Everything else: `wqedge bench --help`.
"""
from __future__ import annotations

import argparse

LABELS = {"wqedge q4": "wq-q4", "wqedge mixed": "wq-3.25", "llama.cpp Q4_0": "lcp-Q4_0",
          "llama.cpp Q4_K_M": "lcp-Q4_K_M", "llama.cpp Q3_K_M": "lcp-Q3_K_M", "llama.cpp Q2_K": "lcp-Q2_K",
          "llama.cpp plan": "lcp-plan-3.25"}


def bench_args(argv=None) -> list[str]:
    """This script's options as `wqedge bench` arguments."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for opt, default in (("--threads", 2), ("--prefill", 128), ("--decode", 64), ("--reps", 3), ("--rounds", 2),
                         ("--ppl-windows", 4)):
        ap.add_argument(opt, type=int, default=default)
    ap.add_argument("--calib", action="store_true", help="calibration text for plans, fits and llama.cpp's imatrix")
    ap.add_argument("--workdir", help="file cache (default: wqedge bench's)")
    ap.add_argument("--out", help="report path without suffix (default bench/results/llamacpp[_calib])")
    ap.add_argument("--only", help="comma-separated labels or row names")
    a = ap.parse_args(argv)
    rows = [LABELS.get(x.strip(), x.strip()) for x in a.only.split(",")] if a.only else list(LABELS.values())
    out = a.out or ("bench/results/llamacpp_calib" if a.calib else "bench/results/llamacpp")
    args = ["bench", "--speed-model", "none", "--rows", ",".join(rows), "--out", out,
            "--calib" if a.calib else "--no-calib"]
    for k in ("threads", "prefill", "decode", "reps", "rounds", "ppl_windows"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    return args + (["--cache-dir", a.workdir] if a.workdir else [])


if __name__ == "__main__":
    from wqedge.cli import main
    main(bench_args())
