"""Perplexity exactly as llama.cpp's perplexity tool defines it, for every backend.

The whole text is tokenized once with a leading BOS; it is cut into non-overlapping windows
of n_ctx tokens; each window's first token is replaced by BOS; only the second half of each
window is scored: the logits at positions n_ctx/2 .. n_ctx-2 predicting the next token, n_ctx/2 - 1
predictions a window (255 for 512), as llama.cpp's `first = n_ctx/2` loop does. Backends supply `logits_fn(windows) -> logits`
(numpy in, numpy out), so PyTorch, our runtime and llama.cpp share this one definition.
This module needs numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]  # int32[B, n_ctx] -> float[B, n_ctx, vocab]


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    n_scored: int
    n_windows: int
    perplexity_all: float  # every position of the same windows scored (for comparison with other tools)
    window_nll: np.ndarray = field(default=None, repr=False)  # float64[W]: each window's mean scored NLL

    @property
    def uncertainty(self) -> float | None:
        """Standard error of the perplexity over windows (perplexity × SE of the windows' mean NLL), as llama.cpp's
        perplexity tool prints "PPL = x +/- y"; None with fewer than 2 windows. It says how far another text of
        the same kind could move the figure, not how far two models on this text differ (change_vs says that)."""
        return uncertainty_of(self.perplexity, self.window_nll)

    def change_vs(self, base: "PerplexityResult") -> tuple[float, float]:
        """(relative change of perplexity against `base` in %, its paired standard error in %) on the same windows:
        `paired_change` of the two results' per-window mean NLLs."""
        if self.window_nll is None or base.window_nll is None:
            raise ValueError("both results need their per-window NLLs (results of wqedge.perplexity.perplexity)")
        return paired_change(self.window_nll, base.window_nll)

    def __str__(self) -> str:
        return f"{self.perplexity:.4f} ({self.n_windows} windows, {self.n_scored} tokens scored)"


def uncertainty_of(perplexity: float, window_nll) -> float | None:
    """Standard error of a perplexity over its windows (perplexity × SE of the windows' mean NLL); None with fewer
    than 2 windows. PerplexityResult.uncertainty, and the bench report's rows, which keep only the numbers."""
    if window_nll is None or len(window_nll) < 2:
        return None
    return perplexity * float(np.std(np.asarray(window_nll, dtype=np.float64), ddof=1) / math.sqrt(len(window_nll)))


def paired_change(window_nll, base_window_nll) -> tuple[float, float]:
    """(relative change of perplexity in %, its paired standard error in %) of a model against a base, from their
    per-window mean NLLs over the same windows (each window scores the same number of positions, so the mean of the
    window means is the mean NLL). Why paired: two quantized models of one checkpoint err on the same hard windows, so
    the window-to-window spread of the text cancels and what is left is the noise of the difference itself (e.g.
    activation codes that flip under another summation order). The SE is that of the mean per-window NLL
    difference, in nats, i.e. a relative change of perplexity."""
    a, b = np.asarray(window_nll, dtype=np.float64), np.asarray(base_window_nll, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired comparison needs the same windows (at least 2), got {a.shape} and {b.shape}")
    d = a - b
    return 100.0 * math.expm1(float(d.mean())), 100.0 * float(d.std(ddof=1) / math.sqrt(len(d)))


def make_windows(tokens: Iterable[int], bos_id: int, n_ctx: int = 512, n_windows: int | None = 32) -> np.ndarray:
    """Non-overlapping windows of n_ctx tokens with the first replaced by BOS: int32[W, n_ctx].

    `tokens` is the whole text's tokenization *including* its leading BOS.
    """
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"context must be an even number >= 4, got {n_ctx}")
    t = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, dtype=np.int32)
    available = len(t) // n_ctx
    if available == 0:
        raise ValueError(f"text has {len(t)} tokens, fewer than one window of {n_ctx}")
    n = available if n_windows is None else min(n_windows, available)
    w = t[: n * n_ctx].reshape(n, n_ctx).copy()
    w[:, 0] = bos_id
    return w


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of targets under logits (float64 log-softmax)."""
    x = logits.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    lse = mx[..., 0] + np.log(np.exp(x - mx).sum(axis=-1))
    return lse - np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]


def scored_positions(n_ctx: int) -> slice:
    """The positions of a window whose logits are scored: n_ctx/2 .. n_ctx-2 (predicting tokens n_ctx/2+1 ..
    n_ctx-1), as llama.cpp's `first = n_ctx/2` loop. wqedge.kl compares models on the same positions."""
    return slice(n_ctx // 2, n_ctx - 1)


def perplexity(logits_fn: LogitsFn, tokens, bos_id: int, n_ctx: int = 512, n_windows: int | None = 32,
               batch_size: int = 1, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Score windows through `logits_fn`, batch_size windows per call."""
    windows = make_windows(tokens, bos_id, n_ctx, n_windows)
    half = scored_positions(n_ctx)
    nll_half = 0.0
    nll_all = 0.0
    n_half = n_all = 0
    per_window: list[np.ndarray] = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size]
        logits = np.asarray(logits_fn(batch))
        if logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned shape {logits.shape} for windows {batch.shape}")
        nll = _nll(logits[:, :-1], batch[:, 1:].astype(np.int64))  # prediction of token j+1 from position j
        nll_half += float(nll[:, half].sum())   # nll[:, j]: the logits at position j
        per_window.append(nll[:, half].mean(axis=1))
        n_half += nll[:, half].size
        nll_all += float(nll.sum())
        n_all += nll.size
        if progress:
            progress(len(batch))
    return PerplexityResult(math.exp(nll_half / n_half), nll_half, n_half, len(windows), math.exp(nll_all / n_all),
                            np.concatenate(per_window))
