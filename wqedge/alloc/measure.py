"""PlanMeasurer: the measured held-out loss of a plan, the reward of the PPO allocator (wqedge.alloc.ppo).

The knapsack (wqedge.alloc.greedy) solves the *predicted*, additive damage exactly, so a learned allocator
can only win on what that prediction misses: interactions between units and the real loss. This measures
the real loss cheaply: every (unit, action) fit is computed once (dequantized, cached on the model's device),
a plan's model is
assembled from the cache (only the units that changed since the last plan are written) and its mean
next-token loss is measured per held-out calibration window on the planning device. Per-window losses give
the paired standard error of the difference between two plans on the same windows: the noise the
allocator's ranking has to beat. The quantization core is not involved: it is handed the chosen plan later.

Two fits (`fit`): "feedback" (the default) is error feedback inside each chunk (wqedge.quant.gptq.gptq_linear
with the block-diagonal XᵀX of the statistics: each chunk's errors are spread over its own columns only, so a
chunk's fit does not depend on the other chunks' actions and can be cached), the part of the pipeline's
conversion that changes what each action is worth (a q1 or ternary chunk gains most); "rtn" is NeUQI per chunk
weighted by diag(XᵀX), as `wqedge convert` without feedback fits. Measured on llama-s (bench/results/
allocation.md): plans better on the "rtn" reward were worse once converted with error feedback.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..blocks import block_type
from ..damage import DamageTable
from ..saliency import split_action


FITS = ("feedback", "rtn")


def block_diagonal(xtx: torch.Tensor, bounds) -> torch.Tensor:
    """XᵀX with everything outside the chunks' diagonal blocks zeroed (statistics gathered whole or in blocks)."""
    out = torch.zeros_like(xtx)
    for s, e in bounds:
        out[s:e, s:e] = xtx[s:e, s:e]
    return out


@torch.no_grad()
def window_losses(model, tokens: torch.Tensor, device, batch_size: int = 16) -> np.ndarray:
    """Mean next-token NLL of `model` on each window of `tokens` [n, T] (float64 [n])."""
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        x = tokens[i:i + batch_size].to(device)
        lp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
        out.append((-lp.gather(-1, x[:, 1:, None])[..., 0]).double().mean(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) for per-window losses of two plans on the same windows."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")


class PlanMeasurer:
    """measure(choice, windows) -> per-window loss increase over the unquantized model (nats, float64 [n]).

    `windows` is a dict name -> tokens [n, T]; the unquantized model's losses are measured once per set.
    The model is moved to `device` while measuring and back by `close()`; its weights are restored there.
    pruning: a wqedge.pruning.Pruning whose pruned shapes `table` is cut for (and `input_stats` restricted to the
    kept columns): the pruned structures are zeroed in the model, each chunk is fitted on the kept part and written
    to its kept rows and columns, so the losses include what the pruning costs (the base is the unpruned model).
    """

    def __init__(self, table: DamageTable, model, device, input_stats: dict | None, windows: dict[str, torch.Tensor],
                 method: str = "neuqi", batch_size: int | None = None, fit: str = "feedback", pruning=None):
        if fit not in FITS:
            raise ValueError(f"unknown measurer fit {fit!r} (known: {', '.join(FITS)})")
        self.fit = fit
        self.threads = torch.get_num_threads()     # the caller's: PPO's policy runs on one thread meanwhile
        self.t = table
        self.model = model
        self.dev = torch.device(device)
        self.home = next(model.parameters()).device
        self.batch = batch_size or (16 if self.dev.type == "cuda" else 4)
        model.to(self.dev)
        self.stats = input_stats or {}
        self.method = method
        self.windows = {k: v for k, v in windows.items() if len(v)}
        self.params = {}
        for u in table.units:
            n = u.linear.hf_name
            if n not in self.params:
                self.params[n] = model.get_parameter(n)
        self.orig = {n: p.detach().clone() for n, p in self.params.items()}
        self.cache: dict[tuple[str, str], list[torch.Tensor]] = {}   # (linear, base action) -> per chunk
        self.current = np.full(len(table.units), -1, np.int64)       # action index now in the model (-1: original)
        self.base = {k: window_losses(model, v, self.dev, self.batch) for k, v in self.windows.items()}
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> kept (rows, columns), with pruning
        if pruning is not None:
            with torch.no_grad():
                for u in table.units:
                    n = u.linear.hf_name
                    if n in self.kept:
                        continue
                    rows, cols = pruning.kept(u.linear.layer, u.linear.proj)
                    shape = self.orig[n].shape
                    rows = torch.arange(shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
                    cols = torch.arange(shape[1]) if cols is None else torch.as_tensor(cols, dtype=torch.long)
                    self.kept[n] = rows, cols = rows.to(self.dev), cols.to(self.dev)
                    p = self.params[n]
                    p.data.zero_()
                    p.data[rows[:, None], cols[None, :]] = self.orig[n][rows[:, None], cols[None, :]]
        self.n = 0
        self.seconds = 0.0
        self.fit_seconds = 0.0

    def _chunks(self, name: str, action: str) -> list[torch.Tensor]:
        """Every chunk of linear `name` fitted with `action` (one batched fit per linear and action)."""
        key = (name, action)
        if key not in self.cache:
            from ..quant.fit import dequantize_chunk, fit_linear
            from ..units import chunk_bounds
            t0 = time.time()
            w = self.orig[name].float()
            if name in self.kept:
                rows, cols = self.kept[name]
                w = w[rows[:, None], cols[None, :]]
            bounds = chunk_bounds(w.shape[1], self.t.group_size)
            if block_type(action).is_float:
                deq = [w[:, s:e].half().float() for s, e in bounds]
            else:
                st = self.stats.get(name)
                h = None if st is None else st.diag.float().to(w.device)
                if self.fit == "feedback" and st is not None and st.xtx is not None:
                    from ..quant.gptq import DAMP, gptq_linear
                    chunks = gptq_linear(w, block_diagonal(st.xtx, bounds).to(w.device), [action] * len(bounds),
                                         self.t.group_size, self.method, hdiag=st.diag, damp=DAMP)
                else:
                    chunks = fit_linear(w, [action] * len(bounds), self.t.group_size, self.method, h)
                deq = [dequantize_chunk(c).to(self.dev) for c in chunks]
            self.cache[key] = deq
            self.fit_seconds += time.time() - t0
        return self.cache[key]

    def prefit(self) -> None:
        """Fit every (linear, action) of the table now (a one-time cost, kept out of a search's time limit)."""
        inner = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for u in self.t.units:
                for a in self.t.actions:
                    base, k = split_action(a)
                    if not k:
                        self._chunks(u.linear.hf_name, base)
        finally:
            torch.set_num_threads(inner)

    def _assemble(self, choice) -> None:
        choice = np.asarray(choice, np.int64)
        for ui in np.flatnonzero(choice != self.current):
            u = self.t.units[ui]
            base, k = split_action(self.t.actions[int(choice[ui])])
            if k:
                raise ValueError("PlanMeasurer: protected-column actions are not measured (restrict the table)")
            p = self.params[u.linear.hf_name]
            chunk = self._chunks(u.linear.hf_name, base)[u.chunk].to(p.dtype)
            if u.linear.hf_name in self.kept:
                rows, cols = self.kept[u.linear.hf_name]
                p.data[rows[:, None], cols[None, u.start:u.end]] = chunk
            else:
                p.data[:, u.start:u.end] = chunk
        self.current = choice.copy()

    def measure(self, choice, windows: str = "search") -> np.ndarray:
        t0 = time.time()
        inner = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                self._assemble(choice)
                loss = window_losses(self.model, self.windows[windows], self.dev, self.batch)
        finally:
            torch.set_num_threads(inner)
        self.n += 1
        self.seconds += time.time() - t0
        return loss - self.base[windows]

    def close(self) -> None:
        """Restore the original weights and put the model back where it was; drop the cache."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.data.copy_(self.orig[n])
        self.model.to(self.home)
        self.cache.clear()
        self.current[:] = -1


class ConvertedPlanLoss:
    """plan -> per-window held-out loss increase over the unquantized model (nats, float64 [n]) of `plan` converted
    as `convert` converts it: error feedback layer by layer with the quantized earlier layers in the loop
    (wqedge.quant.feedback.quantize_model on `feedback_tokens`), pruned structures zeroed. The joint pruning search
    checks its candidates with it: unlike PlanMeasurer's cached per-chunk fits it handles any pruned shape, at the
    cost of one conversion per plan. The model's decoder linear weights are restored after each plan, from
    `original(name)` (e.g. LlamaCheckpoint.linear_weight: read again from the checkpoint's files, so a 7B model is
    not held twice) wherever that equals the model's weight exactly, else from a copy taken here."""

    def __init__(self, model, feedback_tokens: torch.Tensor, heldout: torch.Tensor, device, batch_size: int | None = None,
                 original=None):
        from ..calib import default_device
        self.model, self.dev = model, default_device(device)
        self.fb, self.heldout = feedback_tokens, heldout
        self.batch = batch_size or (16 if self.dev.type == "cuda" else 4)
        self.original = original
        self.copies: dict[str, torch.Tensor | None] = {}   # name -> a copy, or None: restored from `original`
        for n, p in model.named_parameters():
            if ".layers." in n and n.endswith("proj.weight"):
                exact = original is not None and torch.equal(original(n).to(p.device, p.dtype), p.detach())
                self.copies[n] = None if exact else p.detach().clone()
        self.base = self._losses()
        self.n, self.seconds = 0, 0.0

    def _losses(self) -> np.ndarray:
        home = next(self.model.parameters()).device
        try:
            return window_losses(self.model.to(self.dev), self.heldout, self.dev, self.batch)
        finally:
            self.model.to(home)

    def __call__(self, plan) -> np.ndarray:
        from ..quant.feedback import quantize_model
        t0 = time.time()
        try:
            quantize_model(self.model, plan, self.fb, device=self.dev)
            loss = self._losses() - self.base
        finally:
            with torch.no_grad():
                for n, w in self.copies.items():
                    p = self.model.get_parameter(n)
                    p.data.copy_(w if w is not None else self.original(n).to(p.device, p.dtype))
        self.n += 1
        self.seconds += time.time() - t0
        return loss
