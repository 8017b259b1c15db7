"""One backend timed in its own process, so that its peak resident memory is its own:

    python -m wqedge.bench.worker '{"backend": "wqedge", "model": "m.gguf", "threads": 2, ...}'

prints one JSON line: load seconds, prefill and decode tokens/s (every repetition), base and peak RSS
(peak read before the perplexity run, which needs a larger context), and the perplexity when asked.
Backends: "wqedge" (our C++ runtime), "llamacpp" (llama-cpp-python), "ort" (ONNX Runtime; variant
"portable" = stock session, "native" = wqedge.runtime.onnx_session.make_session). numpy + the backend only.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from .measure import peak_mib, rss_mib, time_native, time_prefill_decode


def _perplexity(fn, job) -> float | None:
    p = job.get("ppl")
    if not p:
        return None
    from wqedge.perplexity import perplexity
    return perplexity(fn, np.load(p["tokens"]), p["bos"], p["ctx"], p["windows"]).perplexity


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
            "perplexity": ppl, "kernels": native.get_kernels(), "act": native.get_activations()}


def run_llamacpp(job) -> dict:
    import llama_cpp

    from wqedge.converters.llamacpp import LlamaCppEvaluator
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
    ppl = None
    if job.get("ppl"):
        ev = LlamaCppEvaluator(job["model"], n_ctx=job["ppl"]["ctx"], n_threads=job["threads"],
                               n_batch=job["ppl"]["ctx"])
        ppl = _perplexity(ev, job)
        ev.close()
    return {"threads": job["threads"], "load_s": load, "prefill": pre, "decode": dec, "base_mib": base,
            "peak_mib": peak, "perplexity": ppl, "llama_cpp_version": getattr(llama_cpp, "__version__", "?")}


class OrtDecoder:
    """An exported decoder (converters/onnx_export.py I/O) with its KV cache kept between calls, like a
    runtime context: evaluate(ids) appends tokens; reset() empties the cache."""

    def __init__(self, sess):
        self.sess = sess
        ins = sess.get_inputs()
        self.past_names = [i.name for i in ins if i.name.startswith("past_key_values.")]
        shape = next(i.shape for i in ins if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.out_names = [o.name for o in sess.get_outputs()]
        self.reset()

    def empty(self, batch: int) -> dict:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def reset(self) -> None:
        self.past = self.empty(1)

    def step(self, ids: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        b, s = ids.shape
        p = next(iter(past.values())).shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((b, p + s), np.int64),
                "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1)), **past}
        outs = self.sess.run(None, feed)
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(self.out_names[1:], outs[1:])}
        return outs[0], present

    def evaluate(self, ids) -> np.ndarray:
        logits, self.past = self.step(np.asarray([ids], np.int64), self.past)
        return logits[0, -1]

    def logits(self, windows) -> np.ndarray:
        w = np.asarray(windows, np.int64)
        return np.concatenate([self.step(w[i:i + 1], self.empty(1))[0] for i in range(len(w))])


def ort_session(path: str, variant: str, threads: int):
    """An onnxruntime session for the portable (stock) or native (our custom ops) variant."""
    if variant == "native":
        from wqedge.runtime.onnx_session import make_session
        return make_session(path, threads=threads)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_ort(job) -> dict:
    import onnxruntime as ort
    base = rss_mib()
    t = time.perf_counter()
    dec_ = OrtDecoder(ort_session(job["model"], job.get("variant", "portable"), job["threads"]))
    load = time.perf_counter() - t
    vocab = int(dec_.sess.get_outputs()[0].shape[-1]) if isinstance(dec_.sess.get_outputs()[0].shape[-1], int) \
        else job["n_vocab"]
    pre, dec = time_prefill_decode(dec_.reset, dec_.evaluate, vocab, job["prefill"], job["decode"], job["reps"])
    peak = peak_mib()
    dec_.reset()
    ppl = _perplexity(dec_.logits, job)
    return {"threads": job["threads"], "load_s": load, "prefill": pre, "decode": dec, "base_mib": base,
            "peak_mib": peak, "perplexity": ppl, "onnxruntime_version": ort.__version__}


BACKENDS = {"wqedge": run_wqedge, "llamacpp": run_llamacpp, "ort": run_ort}


def main(argv=None) -> None:
    job = json.loads((argv or sys.argv[1:])[0])
    print(json.dumps(BACKENDS[job["backend"]](job)))


if __name__ == "__main__":
    main()
