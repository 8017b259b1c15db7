"""Measurement helpers shared by the benchmark scripts (each backend runs in its own process)."""
from __future__ import annotations

import resource
import time

import numpy as np


def _status_mib(field: str) -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def rss_mib() -> float:
    """Current resident memory of this process."""
    v = _status_mib("VmRSS")
    return float("nan") if v is None else v


def peak_mib() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited from the parent across exec)."""
    v = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if v is None else v


def time_prefill_decode(reset, evaluate, n_vocab: int, prefill: int, decode: int, reps: int,
                        seed: int = 0) -> tuple[list[float], list[float]]:
    """Prefill and decode tokens/s, `reps` times: one batch of `prefill` random tokens, then `decode` single tokens.

    reset() empties the backend's cache; evaluate(list_of_ids) runs tokens through it. The first 8 prompt tokens
    are run once before timing, to page the weights in.
    """
    rng = np.random.default_rng(seed)
    prompt = [int(x) for x in rng.integers(0, n_vocab, prefill)]
    evaluate(prompt[:8])
    pre, dec = [], []
    for _ in range(reps):
        reset()
        t = time.perf_counter()
        evaluate(prompt)
        pre.append(prefill / (time.perf_counter() - t))
        toks = rng.integers(0, n_vocab, decode)
        t = time.perf_counter()
        for tok in toks:
            evaluate([int(tok)])
        dec.append(decode / (time.perf_counter() - t))
    return pre, dec


def time_native(model_path: str, prefill: int, decode: int, reps: int, threads: int):
    """Open a model in our C++ runtime and time it: (model, context, load seconds, prefill tok/s, decode tok/s)."""
    from wqedge.runtime import native
    t = time.perf_counter()
    model = native.Model(model_path)
    ctx = native.Context(model, n_ctx=prefill + decode + 8, n_threads=threads)
    load = time.perf_counter() - t
    pre, dec = time_prefill_decode(ctx.reset, ctx.eval, model.n_vocab, prefill, decode, reps)
    return model, ctx, load, pre, dec
