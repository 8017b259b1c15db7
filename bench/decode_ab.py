#!/usr/bin/env python3
"""Interleaved decode speed of our runtime and llama.cpp in one session (issue 12): for a quick same-run ratio on a
shared machine without the full `wqedge bench`.

    python bench/decode_ab.py --wq A.gguf [--wq B.gguf ...] --lcp Q4_0.gguf [--threads 2] [--rounds 3] [--decode 32]
        [--env WQEDGE_REPACK=0]

Ours: `wqedge-bench` (cpp/build/ or $WQEDGE_BENCH) decode tok/s (median of its reps); llama.cpp: llama-cpp-python,
64-token prompt then --decode single-token evals, tok/s. Each round runs every file once, in turn; prints every
sample and the best per file (outside load only slows a run).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours(path: str, threads: int, n: int, env: dict) -> float:
    exe = os.environ.get("WQEDGE_BENCH", str(ROOT / "cpp" / "build" / "wqedge-bench"))
    out = subprocess.run([exe, "-m", path, "-p", "64", "-n", str(n), "-r", "2", "-t", str(threads)], capture_output=True,
                         text=True, check=True, env={**os.environ, **env}).stdout
    return float(re.search(r"decode\s+\d+ tokens: ([\d.]+) tok/s", out).group(1))


def llamacpp(path: str, threads: int, n: int) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False)
    llm.eval(list(range(1, 65)))
    t0 = time.perf_counter()
    for i in range(n):
        llm.eval([100 + i])
    dt = time.perf_counter() - t0
    del llm
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wq", action="append", default=[])
    ap.add_argument("--lcp", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for our runs")
    a = ap.parse_args()
    env = dict(e.split("=", 1) for e in a.env)
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for kind, files in (("wq", a.wq), ("lcp", a.lcp)):
            for f in files:
                v = ours(f, a.threads, a.decode, env) if kind == "wq" else llamacpp(f, a.threads, a.decode)
                name = f"{kind}:{Path(f).stem}"
                best[name] = max(best.get(name, 0.0), v)
                print(f"round {r + 1} {name}: {v:.1f} tok/s", flush=True)
    print("best:", ", ".join(f"{k} {v:.1f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
