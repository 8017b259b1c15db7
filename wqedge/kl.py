"""KL divergence of a model's next-token distributions to a base model's, on the positions perplexity scores.

Perplexity alone can mislead about a quantized model: a model softer than an over-confident base scores *lower*
perplexity than the base it imitates (smol-s in bench/results/distill_smol.md). How faithful a quantized model is,
is the KL divergence KL(base || model) per scored token, as llama.cpp's perplexity tool reports it: one run writes
the base model's log-probabilities (`wqedge eval BASE --kl-base FILE`), later runs compare against them (`wqedge eval
MODEL --kl FILE`), on the same text, window length and windows (checked: the file holds the windows' tokens).

The file is an .npz: `logprobs` float16 [windows, n_ctx/2 - 1, vocab] (32 windows of 512, a 32k vocabulary:
0.5 GB), `top` int32 [windows, n_ctx/2 - 1] (the base's most likely next tokens, taken before rounding), `tokens`
int32 [windows, n_ctx], and `version`. Written atomically. This module needs numpy only, like wqedge.perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .perplexity import LogitsFn, scored_positions

VERSION = 1


class KLError(ValueError):
    """A KL base file that cannot be written, read or compared with this run (the message says why)."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = logits.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    return x - mx - np.log(np.exp(x - mx).sum(axis=-1, keepdims=True))


def token_kl(base_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(base || model) at each position, from both models' log-probabilities over the last axis (nats): the one
    definition `wqedge eval --kl`, the benchmarks and convert's quality check (wqedge.quality) share."""
    return (np.exp(base_logprobs) * (base_logprobs - logprobs)).sum(-1)


def scored(logits: np.ndarray) -> np.ndarray:
    """The logits at the positions wqedge.perplexity scores ([B, n_ctx, V] -> [B, n_ctx/2-1, V])."""
    return logits[:, scored_positions(logits.shape[1])]


@dataclass
class KLResult:
    mean: float          # nats per scored token
    stderr: float        # standard error of the mean over tokens
    median: float
    p99: float
    max: float
    same_top: float      # fraction of scored tokens where both models' most likely next token agree
    n_scored: int

    def __str__(self) -> str:
        return (f"KL divergence to the base: mean {self.mean:.5f} ± {self.stderr:.5f} nats/token, median "
                f"{self.median:.5f}, 99th percentile {self.p99:.4f}, max {self.max:.4f}; same top token "
                f"{100 * self.same_top:.2f}% ({self.n_scored} tokens)")


class KLBaseRecorder:
    """Wraps a logits_fn: keeps the windows and the log-probabilities of their scored positions; `save` writes them."""

    def __init__(self, fn: LogitsFn):
        self.fn = fn
        self.windows: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.top: list[np.ndarray] = []
        self._arrays: tuple | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.fn(batch))
        lp = log_softmax(scored(logits))
        self.windows.append(np.asarray(batch, np.int32))
        self.logprobs.append(lp.astype(np.float16))
        self.top.append(lp.argmax(-1).astype(np.int32))   # before rounding: near-ties stay the base's own
        return logits

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, logprobs, top) of the windows recorded so far, concatenated once."""
        if self._arrays is None or len(self._arrays[0]) != sum(map(len, self.windows)):
            self._arrays = tuple(np.concatenate(x) for x in (self.windows, self.logprobs, self.top))
        return self._arrays

    def save(self, path) -> Path:
        """Write the base file atomically (wqedge.fileio.atomic_output: nothing half-written, usual permissions)."""
        from .fileio import atomic_output
        if not self.windows:
            raise KLError("no windows were scored; nothing to write")
        tokens, logprobs, top = self.arrays()
        try:
            with atomic_output(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, version=np.int32(VERSION), tokens=tokens, logprobs=logprobs, top=top)
        except OSError as e:
            raise KLError(str(e)) from None
        return Path(path)


class KLComparer:
    """Wraps a logits_fn: compares each batch's scored positions with the base file's, window by window."""

    def __init__(self, fn: LogitsFn, path=None, base: KLBaseRecorder | None = None):
        """The base from a file (`path`) or from a recorder of this process (`base`: a benchmark's in-memory fp
        run)."""
        self.fn = fn
        if base is not None:
            (self.tokens, self.base, self.top), self.path = base.arrays(), "the base run"
        else:
            try:
                z = np.load(path)
                version = int(z["version"])
                self.tokens, self.base, self.top = z["tokens"], z["logprobs"], z["top"]
            except (OSError, KeyError, ValueError) as e:
                raise KLError(f"{path}: not a KL base file written by `wqedge eval --kl-base` ({e})") from None
            if version != VERSION:
                raise KLError(f"{path}: KL base file version {version}; this wqedge reads version {VERSION}")
            self.path = path
        self.at = 0
        self.kl: list[np.ndarray] = []
        self.same: list[np.ndarray] = []

    def check(self, windows: np.ndarray) -> None:
        """Refuse before any work when this run's windows are not the base file's (text, tokenizer, --ctx,
        --chunks)."""
        if windows.shape != self.tokens.shape or not np.array_equal(windows, self.tokens):
            raise KLError(f"{self.path} was written for {self.tokens.shape[0]} windows of {self.tokens.shape[1]} "
                          f"tokens, this run scores {windows.shape[0]} of {windows.shape[1]}"
                          + ("" if windows.shape != self.tokens.shape else " with other tokens")
                          + ": use the same text, tokenizer, --ctx and --chunks as the base run")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.fn(batch))
        b = len(batch)
        base = log_softmax(self.base[self.at:self.at + b])   # renormalized after the float16 rounding: KL >= 0
        lp = log_softmax(scored(logits))
        if lp.shape != base.shape:
            raise KLError(f"this model's scored log-probabilities have shape {lp.shape[1:]} per window, the base "
                          f"file's {base.shape[1:]} (another vocabulary?)")
        self.kl.append(token_kl(base, lp).ravel())
        self.same.append((self.top[self.at:self.at + b] == lp.argmax(-1)).ravel())
        self.at += b
        return logits

    def result(self) -> KLResult:
        kl = np.concatenate(self.kl)
        return KLResult(float(kl.mean()), float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0,
                        float(np.median(kl)), float(np.percentile(kl, 99)), float(kl.max()),
                        float(np.concatenate(self.same).mean()), int(len(kl)))
