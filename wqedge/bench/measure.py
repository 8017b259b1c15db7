"""Measurements that run inside one process: resident memory, prefill/decode timing, memory bandwidth,
and a description of the machine. numpy only (a backend's worker imports nothing heavier than it needs)."""
from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path

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


def triad_bandwidth(threads: int, mib_per_array: float = 64, reps: int = 5) -> float:
    """GB/s of a = b + s·c over `threads` threads (numpy ufuncs release the GIL), best of `reps`. Traffic
    counted as numpy does it: a = s·c (read c, write a) then a += b (read a, read b, write a) = 5 × 8 bytes
    per element. Small arrays are swept repeatedly inside each thread so thread start-up does not count."""
    threads = max(1, threads)
    n = int(mib_per_array * 2**20) // 8
    inner = max(1, int(256 / mib_per_array))
    parts = [(np.zeros(n // threads), np.random.rand(n // threads), np.random.rand(n // threads))
             for _ in range(threads)]

    def run(p):
        a, b, c = p
        for _ in range(inner):
            np.multiply(c, 3.0, out=a)
            np.add(a, b, out=a)

    for p in parts:
        run(p)  # touch the pages
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=run, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        dt = time.perf_counter() - t
        best = max(best, inner * 5 * 8 * sum(len(p[0]) for p in parts) / dt / 1e9)
    return best


def read_bandwidth(threads: int) -> tuple[float | None, float | None]:
    """(DRAM, last-level cache) read GB/s of the runtime's pool (wqedge.runtime.native.read_bandwidth: 512 MiB, and a
    quarter of the last-level cache), or (None, None) without the library. Decode reads every weight once, so this,
    not a read-write triad, is its roof."""
    try:
        from wqedge.runtime import native
        dram = native.read_bandwidth(threads, 512, 3)
        llc = native.read_bandwidth(threads, max(1.0, (llc_mib() or 8.0) / 4), 20)
        return dram, llc
    except Exception:  # noqa: BLE001 — no library (or an older one): the triad stands in
        return None, None


def llc_mib() -> float | None:
    """Size of the largest cache level (MiB) from sysfs, or None."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip()
        except OSError:
            continue
        v = int(txt[:-1]) / 1024 if txt.endswith("K") else int(txt[:-1]) if txt.endswith("M") else None
        if v and (best is None or v > best):
            best = v
    return best


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    """CPU, cores visible to this process, threads used, cache size, memory and OS, for the report header."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu_model(), "arch": platform.machine(), "cores": cores, "cpus_online": os.cpu_count(),
            "threads": threads, "llc_mib": llc_mib(), "memory_gib": mem, "os": platform.platform(),
            "python": platform.python_version()}
