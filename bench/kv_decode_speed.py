"""Decode speed with a float vs a 4-bit (and 8-bit) KV cache at long contexts (issue 15), through the C++ runtime only
(numpy + libwqedge; no torch: runs on a machine with just the runtime). For each context length: one prefill of that
many tokens, then --decode single-token steps timed; the cache settings alternate, best of --repeats. Prints one JSON
line per (threads, context) and a Markdown table (bench/kv_cache.py's decode line measures the same at one setting).

    python bench/kv_decode_speed.py MODEL.gguf [--ctx 1024,2048,4096] [--threads 1,4] [--decode 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

from wqedge.runtime import native


def speed(m, n_prompt: int, n_decode: int, threads: int, repeats: int, settings) -> dict[str, float]:
    """Best tokens/s per KV setting ("f32", 8, 4) of n_decode single-token steps after an n_prompt prefill."""
    prompt = [1] + [100 + i % 4000 for i in range(n_prompt - 1)]
    best = {k: 0.0 for k in settings}
    for _ in range(repeats):
        for k in settings:
            c = native.Context(m, n_ctx=n_prompt + n_decode + 1, n_threads=threads, kv_bits=k)
            c.eval(prompt, want_logits=False)
            tok, t0 = 7, time.perf_counter()
            for i in range(n_decode):
                c.eval([tok])
                tok = 200 + i % 500
            best[k] = max(best[k], n_decode / (time.perf_counter() - t0))
            c.close()
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", default="1024,2048,4096")
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--act", default="q8", choices=("q8", "f32"))
    args = ap.parse_args()
    native.set_activations(args.act)
    m = native.Model(args.model)
    settings = ("f32", 8, 4)
    print(f"| threads | context | f32 tok/s | kv8 tok/s | kv4 tok/s | kv8/f32 | kv4/f32 |\n|---|---|---|---|---|---|---|")
    for th in map(int, args.threads.split(",")):
        for n in map(int, args.ctx.split(",")):
            sp = speed(m, n, args.decode, th, args.repeats, settings)
            print(json.dumps({"threads": th, "ctx": n, **{str(k): v for k, v in sp.items()}}), flush=True)
            print(f"| {th} | {n} | {sp['f32']:.1f} | {sp[8]:.1f} | {sp[4]:.1f} | {sp[8] / sp['f32']:.3f} | "
                  f"{sp[4] / sp['f32']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
