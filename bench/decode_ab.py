#!/usr/bin/env python3
"""Interleaved decode or prefill speed of our runtime and llama.cpp in one session (issue 12): for a quick same-run
ratio on a shared machine without the full `wqedge bench`.

    python bench/decode_ab.py --wq A.gguf [--wq B.gguf ...] --lcp Q4_0.gguf [--threads 2] [--rounds 3] [--decode 32]
        [--env WQEDGE_REPACK=0] [--prefill 256 [--wq-f32]] [--exe before=/path/to/older/wqedge-bench] [--cpu]
        [--variant pf:WQEDGE_TILE_PREFETCH=1] [--context 2000] [--kv-bits 8]

Ours: `wqedge-bench` (cpp/build/ or $WQEDGE_BENCH) decode tok/s (median of its reps); llama.cpp: llama-cpp-python,
a --context-token prompt (default 64) then --decode single-token evals, tok/s: decode at that depth of the KV cache
(attention reads every cached position per token). --kv-bits: our KV cache (f32, f16, 8, 4; default the file's). --prefill N measures prompt processing instead: ours the
N-token batch of wqedge-bench, llama.cpp one eval of N tokens (n_batch = N) from an empty cache; --wq-f32 adds each of
our files again with WQEDGE_ACT=f32 (the float prefill, for before/after). Each round runs every file once, in turn;
prints every sample and the best per file (outside load only slows a run), and the ratios of ours to the first --lcp.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CPU = False  # --cpu: tok/s from process CPU time (robust to other jobs taking the core at 1 thread)


CONTEXT = 64   # --context: prompt tokens before the decode steps
KV_BITS = ""   # --kv-bits: our KV cache


def ours(path: str, threads: int, n: int, env: dict, prefill: int = 0, exe: str | None = None) -> float:
    exe = exe or os.environ.get("WQEDGE_BENCH", str(ROOT / "cpp" / "build" / "wqedge-bench"))
    args = ["-p", str(prefill), "-n", "0", "-r", "3"] if prefill else ["-p", str(CONTEXT), "-n", str(n), "-r", "2"]
    if KV_BITS:
        args += ["--kv-bits", KV_BITS]
    out = subprocess.run([exe, "-m", path, *args, "-t", str(threads)], capture_output=True,
                         text=True, check=True, env={**os.environ, **env}).stdout
    what = "prefill" if prefill else "decode"
    if CPU and not prefill:
        return 1000.0 / float(re.search(r"CPU ([\d.]+) ms/token", out).group(1))
    return float(re.search(what + r"\s+\d+ tokens: ([\d.]+) tok/s", out).group(1))


def llamacpp(path: str, threads: int, n: int, prefill: int = 0) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                n_ctx=max(256, prefill + 8, CONTEXT + n + 8), n_batch=max(512, prefill), n_ubatch=max(512, prefill),
                verbose=False)
    if prefill:  # median of 3 prompt evals from an empty cache, as wqedge-bench -r 3 (after a short warm-up)
        toks = [1 + (7919 * i) % (llm.n_vocab() - 1) for i in range(prefill)]
        llm.eval(toks[:8])
        rates = []
        for _ in range(3):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks)
            rates.append(prefill / (time.perf_counter() - t0))
        del llm
        return sorted(rates)[1]
    llm.eval([1 + (7919 * i) % (llm.n_vocab() - 1) for i in range(CONTEXT)])
    clock = time.process_time if CPU else time.perf_counter
    t0 = clock()
    for i in range(n):
        llm.eval([100 + i])
    dt = clock() - t0
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
    ap.add_argument("--prefill", type=int, default=0, help="measure an N-token prompt instead of decode")
    ap.add_argument("--wq-f32", action="store_true", help="also run our files with WQEDGE_ACT=f32")
    ap.add_argument("--exe", action="append", default=[],
                    help="NAME=PATH: also run our files with this wqedge-bench (e.g. a build of an earlier commit), "
                         "in the same rounds; rows named NAME:file")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE: also run our files with this extra environment, in the same rounds; rows "
                         "named NAME:file")
    ap.add_argument("--cpu", action="store_true",
                    help="decode tok/s from process CPU time (ours: wqedge-bench's best CPU ms/token; llama.cpp: "
                         "time.process_time over the decode loop): meaningful at 1 thread on a shared machine")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the decode steps")
    ap.add_argument("--kv-bits", default="", help="our KV cache: f32, f16, 8 or 4 (default: the file's)")
    a = ap.parse_args()
    global CPU, CONTEXT, KV_BITS
    CPU, CONTEXT, KV_BITS = a.cpu, a.context, a.kv_bits
    env = dict(e.split("=", 1) for e in a.env)
    runs = [("wq", f, env) for f in a.wq]
    exes = dict(e.split("=", 1) for e in a.exe)
    for name in exes:
        runs += [(name, f, env) for f in a.wq]
    for v in a.variant:
        name, kv = v.split(":", 1)
        runs += [(name, f, {**env, **dict([kv.split("=", 1)])}) for f in a.wq]
    if a.wq_f32:
        runs += [("wq-f32", f, {**env, "WQEDGE_ACT": "f32"}) for f in a.wq]
    runs += [("lcp", f, {}) for f in a.lcp]
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for kind, f, e in runs:
            v = (llamacpp(f, a.threads, a.decode, a.prefill) if kind == "lcp"
                 else ours(f, a.threads, a.decode, e, a.prefill, exes.get(kind)))
            name = f"{kind}:{Path(f).stem}"
            best[name] = max(best.get(name, 0.0), v)
            print(f"round {r + 1} {name}: {v:.1f} tok/s", flush=True)
    what = 'prefill %d tokens' % a.prefill if a.prefill else f'decode after {a.context} tokens'
    print(f"best ({what}{', CPU time' if CPU else ''}, {a.threads} threads):",
          ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    ref = next((k for k in best if k.startswith("lcp:")), None)
    if ref:
        print(f"ratio to {ref}:", ", ".join(f"{k} {v / best[ref]:.2f}" for k, v in best.items() if not k.startswith("lcp:")))


if __name__ == "__main__":
    main()
