"""llama.cpp as an evaluator: the `logits_fn` of wqedge.perplexity for a llama.cpp GGUF (through
llama-cpp-python), and the bits per weight of a llama.cpp GGUF's decoder linears. No torch."""
from __future__ import annotations

import os

import numpy as np

from wqedge.spec import ModelSpec


def measured_linear_bits(path, spec: ModelSpec | None = None) -> float:
    """8 x bytes of the decoder-linear tensors / their weights, read from a llama.cpp GGUF's tensor infos."""
    from wqedge.runtime.gguf_check import open_reader
    r = open_reader(path)
    total_b = total_w = 0
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in (
                "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            total_b += int(t.n_bytes)
            total_w += int(t.n_elements)
    return 8.0 * total_b / total_w


class LlamaCppEvaluator:
    """wqedge.perplexity's logits_fn for llama.cpp: int32[B, T] -> float32[B, T, vocab].

    Each window is evaluated from an empty KV cache with logits for every position (llama_cpp.Llama with
    logits_all=True), exactly what the shared perplexity definition scores.
    """

    def __init__(self, model, n_ctx: int = 512, n_threads: int | None = None, n_batch: int = 512, verbose=False):
        if isinstance(model, (str, os.PathLike)):
            import llama_cpp
            model = llama_cpp.Llama(model_path=os.fspath(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                    n_threads=n_threads, n_threads_batch=n_threads, logits_all=True,
                                    verbose=verbose)
        self.llm = model

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        w = np.asarray(windows, dtype=np.int32)
        if w.ndim == 1:
            w = w[None]
        B, T = w.shape
        if T > self.llm.n_ctx():
            raise ValueError(f"windows of {T} tokens exceed the context of {self.llm.n_ctx()}")
        out = np.empty((B, T, self.llm.n_vocab()), np.float32)
        for b in range(B):
            self.llm.reset()
            self.llm.eval([int(x) for x in w[b]])
            out[b] = self.llm.scores[:T]
        self.llm.reset()
        return out

    def greedy(self, prompt, n_new: int) -> list[int]:
        """Greedy continuation (argmax of llama.cpp's logits), n_new tokens, from an empty cache."""
        llm = self.llm
        llm.reset()
        toks = [int(x) for x in prompt]
        llm.eval(toks)
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        llm.reset()
        return out

    def close(self):
        c = getattr(self.llm, "close", None)
        if c:
            c()


def llamacpp_logits_fn(model, n_ctx: int = 512, n_threads: int | None = None) -> LlamaCppEvaluator:
    """The LogitsFn of wqedge.perplexity for a llama.cpp GGUF (path or llama_cpp.Llama)."""
    return LlamaCppEvaluator(model, n_ctx=n_ctx, n_threads=n_threads)
