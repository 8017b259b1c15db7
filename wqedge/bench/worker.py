"""One backend timed in its own process, so that its peak resident memory is its own:

    python -m wqedge.bench.worker '{"backend": "wqedge", "model": "m.gguf", "threads": 2, ...}'

prints one JSON line: load seconds, prefill and decode tokens/s (every repetition), base and peak RSS
(peak read before the perplexity run, which needs a larger context), and the perplexity when asked.
Backends: "wqedge" (our C++ runtime), "llamacpp" (llama-cpp-python), "ort" (ONNX Runtime, either variant:
wqedge.runtime.onnx_session.OnnxDecoder, whose session registers our custom ops for a native file). numpy + the
backend only.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from .measure import peak_mib, rss_mib, time_native, time_prefill_decode


def _perplexity(fn, job) -> dict:
    """{"perplexity": ..., "window_nll": [per window]} (the report's paired comparisons use the windows), or None
    values when the job scores no perplexity."""
    p = job.get("ppl")
    if not p:
        return {"perplexity": None, "window_nll": None}
    from wqedge.perplexity import perplexity
    r = perplexity(fn, np.load(p["tokens"]), p["bos"], p["ctx"], p["windows"])
    return {"perplexity": r.perplexity, "window_nll": [float(v) for v in r.window_nll]}


def run_wqedge(job) -> dict:
    from wqedge.runtime import native
    native.set_activations(job.get("act", "f32"))
    base = rss_mib()
    model, ctx, load, pre, dec = time_native(job["model"], job["prefill"], job["decode"], job["reps"], job["threads"])
    peak = peak_mib()
    threads = ctx.n_threads
    ctx.close()
    n_ctx = (job.get("ppl") or {}).get("ctx", 512)
    ppl = _perplexity(native.logits_fn(model, n_ctx=n_ctx, n_threads=job["threads"]), job)
    return {"threads": threads, "load_s": load, "prefill": pre, "decode": dec, "base_mib": base, "peak_mib": peak,
            **ppl, "kernels": native.get_kernels(), "act": native.get_activations()}


def run_llamacpp(job) -> dict:
    import llama_cpp

    from wqedge.runtime.llamacpp_eval import LlamaCppEvaluator
    base = rss_mib()
    n = job["prefill"] + job["decode"] + 8
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=n, n_batch=max(job["prefill"], 8),
                          n_ubatch=max(job["prefill"], 8), n_threads=job["threads"], n_threads_batch=job["threads"],
                          logits_all=False, verbose=False)
    load = time.perf_counter() - t
    pre, dec = time_prefill_decode(llm.reset, llm.eval, llm.n_vocab(), job["prefill"], job["decode"], job["reps"])
    peak = peak_mib()
    llm.close()
    ev = LlamaCppEvaluator(job["model"], n_ctx=job["ppl"]["ctx"], n_threads=job["threads"],
                           n_batch=job["ppl"]["ctx"]) if job.get("ppl") else None
    ppl = _perplexity(ev, job)
    if ev is not None:
        ev.close()
    return {"threads": job["threads"], "load_s": load, "prefill": pre, "decode": dec, "base_mib": base,
            "peak_mib": peak, **ppl, "llama_cpp_version": getattr(llama_cpp, "__version__", "?")}


def run_ort(job) -> dict:
    """Either ONNX variant: make_session registers our custom-op library when the model needs it."""
    import onnxruntime as ort

    from wqedge.runtime.onnx_session import OnnxDecoder
    base = rss_mib()
    t = time.perf_counter()
    dec_ = OnnxDecoder(job["model"], job["threads"])
    load = time.perf_counter() - t
    vocab = int(dec_.sess.get_outputs()[0].shape[-1]) if isinstance(dec_.sess.get_outputs()[0].shape[-1], int) \
        else job["n_vocab"]
    pre, dec = time_prefill_decode(dec_.reset, dec_.evaluate, vocab, job["prefill"], job["decode"], job["reps"])
    peak = peak_mib()
    dec_.reset()
    # one window at a time, as before: ONNX Runtime's batched logits of all windows would be held at once
    ppl = _perplexity(lambda w: np.concatenate([dec_.logits(w[i:i + 1]) for i in range(len(w))]), job)
    return {"threads": job["threads"], "load_s": load, "prefill": pre, "decode": dec, "base_mib": base,
            "peak_mib": peak, **ppl, "onnxruntime_version": ort.__version__}


BACKENDS = {"wqedge": run_wqedge, "llamacpp": run_llamacpp, "ort": run_ort}


def main(argv=None) -> None:
    job = json.loads((argv or sys.argv[1:])[0])
    print(json.dumps(BACKENDS[job["backend"]](job)))


if __name__ == "__main__":
    main()
