"""The unit x action table: exact stored bits and predicted damage of every action on every column chunk.

Damage is the predicted increase of the LM loss (nats per token) when one chunk alone is quantized by
one action, from a second-order (Kronecker-factored Fisher) expansion of the loss:

    damage(u, a) = ½ Σ_i G_i · Δw_i H_cc Δw_iᵀ

where Δw_i is row i of (ŵ − w) on the chunk's columns c, H_cc = E[x_c x_cᵀ] the chunk's block of the
layer-input second moment (wqedge.calib.layerwise_stats) and G_i = E_t[(dℓ_t/dy_i)²] the mean squared
gradient of the per-token loss at output channel i (wqedge.calib.gradient_stats). With G ≡ 1 this is the
plain per-layer proxy Σ diag(XᵀX)(ŵ − w)² (kind="proxy", the full-block form when XᵀX is at hand),
which measured worse than uniform allocation on llama-s: it does not see how errors reach the loss.

feedback=True prices a chunk as error-feedback conversion (wqedge.quant.gptq) will quantize it: each
column's squared rounding error times its conditional precision 1/U_jj² (the part of x_j the columns
quantized after it cannot compensate) instead of Δw H Δwᵀ, which ignores that compensation.
protect=(k, ...) adds saliency-protected variants of the low-bit actions ("q3+p2", wqedge.saliency), each
with its exact extra bits, so the allocator can buy protection where it pays.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import blocks
from .saliency import PROTECTABLE, column_saliency, protected_action, salient_columns, split_action
from .units import Linear, Unit, enumerate_units

ACTIONS = blocks.ALLOCATOR_ACTIONS   # fp16, q8, q4, q3, q2, ternary, q1 (the traits table's offered actions)

# fitter(w_chunk float32 [N, g], action, h_chunk float32 [g] or None, protected or None) -> ŵ float32 [N, g]
Fitter = Callable[[torch.Tensor, str, torch.Tensor | None, list[int] | None], torch.Tensor]


def default_fitter(method: str = "neuqi") -> Fitter:
    """ŵ from the project's per-chunk fitter (wqedge.quant.fit)."""
    from .quant.fit import dequantize_chunk, fit_chunk

    def fit(w, action, h, protected=None):
        return dequantize_chunk(fit_chunk(w, action, method, h, protected)).to(w.device, torch.float32)
    return fit


@dataclass
class DamageTable:
    """bits[u, a] (exact stored bits of unit u under action a) and damage[u, a] (predicted loss increase)."""
    units: list[Unit]
    actions: tuple[str, ...]
    bits: np.ndarray            # int64 [U, A]
    damage: np.ndarray          # float64 [U, A]
    group_size: int
    kind: str = "kfac"
    features: np.ndarray | None = None   # float32 [U, F]: per-unit weight/activation statistics (for RL state)
    feature_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    # hf_name -> k -> chunk-local protected columns per chunk, for the "<action>+p<k>" actions
    protected: dict[str, dict[int, list[list[int]]]] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return int(sum(u.n_weights for u in self.units))

    def budget_cap(self, budget_bits: float) -> int:
        """Largest total of stored bits whose effective bits meet the budget."""
        n = self.n_weights
        cap = int(np.floor(budget_bits * n))
        while cap / n > budget_bits:   # float guard
            cap -= 1
        return cap

    def plan_bits(self, choice: np.ndarray) -> int:
        return int(self.bits[np.arange(len(self.units)), choice].sum())

    def plan_damage(self, choice: np.ndarray) -> float:
        return float(self.damage[np.arange(len(self.units)), choice].sum())

    def action_index(self, name: str) -> int:
        return self.actions.index(name)

    def restrict(self, actions: tuple[str, ...]) -> "DamageTable":
        idx = [self.actions.index(a) for a in actions]
        return DamageTable(self.units, tuple(actions), self.bits[:, idx], self.damage[:, idx], self.group_size,
                           self.kind, self.features, self.feature_names, dict(self.meta), self.protected)

    def plan_actions(self, choice: np.ndarray) -> tuple[dict[str, list[str]], dict[str, list[list[int]]]]:
        """The plan's per-linear (actions, protected columns) for one action index per unit."""
        acts: dict[str, list[str]] = {}
        prot: dict[str, list[list[int]]] = {}
        for u, c in zip(self.units, choice):
            base, k = split_action(self.actions[int(c)])
            name = u.linear.hf_name
            acts.setdefault(name, []).append(base)
            prot.setdefault(name, []).append(list(self.protected[name][k][u.chunk]) if k else [])
        return acts, prot


def unit_bits(units: list[Unit], actions=ACTIONS) -> np.ndarray:
    """Stored bits [U, A]; a protected action "<a>+p<k>" counts min(k, width) protected columns."""
    def bits(u, name):
        base, k = split_action(name)
        return blocks.chunk_bits(base, u.linear.out_features, u.width, min(k, u.width))
    return np.array([[bits(u, a) for a in actions] for u in units], dtype=np.int64)


def table_actions(actions=ACTIONS, protect: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The base actions followed by their protected variants, k by k."""
    return tuple(actions) + tuple(protected_action(b, k) for k in protect for b in PROTECTABLE if b in actions)


FEATURE_NAMES = ("log_w_rms", "w_kurtosis", "log_h_mean", "log_h_max_over_mean", "log_absx_max", "log_g_mean",
                 "log_g_max_over_mean", "rows_log2")


def _features(w: torch.Tensor, hc: torch.Tensor, xmax: torch.Tensor | None, g: torch.Tensor | None) -> list[float]:
    w = w.double()
    rms = float(w.pow(2).mean().sqrt()) + 1e-12
    kurt = float((w.pow(4).mean() / (w.pow(2).mean() ** 2 + 1e-30))) + 1e-12   # (+: a chunk zeroed by pruning, wqedge.masked)
    hm = float(hc.mean()) + 1e-30
    gm = float(g.mean()) + 1e-30 if g is not None else 1.0
    return [np.log(rms), np.log(kurt), np.log(hm), np.log(float(hc.max()) / hm + 1e-12),
            np.log(float(xmax.max()) + 1e-12) if xmax is not None else 0.0, np.log(gm),
            np.log(float(g.max()) / gm + 1e-12) if g is not None else 0.0, np.log2(w.shape[0])]


def sample_rows(n: int, max_rows: int | None, g: torch.Tensor | None = None) -> torch.Tensor:
    """Rows used to estimate a linear's damage: all of them, or max_rows spread evenly over the rows
    sorted by output sensitivity g (systematic sampling; each stands for n / max_rows rows)."""
    if not max_rows or n <= max_rows:
        return torch.arange(n)
    order = torch.argsort(g.cpu(), stable=True) if g is not None else torch.arange(n)
    pos = ((torch.arange(max_rows, dtype=torch.float64) + 0.5) * n / max_rows).long().clamp_(max=n - 1)
    return order[pos].sort().values


TABLE_THREADS = 2   # linears fitted at once on CPU (build_damage_table); the table does not depend on it


def build_damage_table(linears: list[Linear], weight_fn: Callable[[Linear], torch.Tensor], group_size: int,
                       input_stats: dict | None = None, grad_stats: dict | None = None,
                       fitter: Fitter | None = None, method: str = "neuqi", actions=ACTIONS, kind: str = "kfac",
                       device=None, progress: Callable[[str], None] | None = None,
                       keep: dict | None = None, max_rows: int | None = 256, g_power: float = 1.0,
                       feedback: bool = False, protect: tuple[int, ...] = (), neuqi_grid=None) -> DamageTable:
    """Fit every action on every unit and price its damage.

    weight_fn(linear) -> float32 [N, K]; input_stats[name] is a wqedge.calib.InputStats (full XᵀX used when
    present, else its diagonal); grad_stats[name] a wqedge.calib.GradStats. kind: "kfac" (needs grad_stats),
    "proxy" (G ≡ 1), or "fisher" (empirical Fisher diagonal Σ F_ij Δw_ij², needs grad_stats with fisher).
    With no `fitter`, each action is fitted on all chunks of a linear at once (wqedge.quant.fit.fit_linear;
    q8 by min-max, whose damage is negligible either way), on at most `max_rows` rows per linear sampled
    evenly by output sensitivity (the damage is a sum over rows; None = every row).
    keep: when given, receives ŵ [rows, g] per (hf_name, chunk, action) (only with every row).
    feedback: price rounding errors by their conditional precision under error feedback (needs full XᵀX).
    protect: numbers of protected columns k for which "<action>+p<k>" variants are added.
    neuqi_grid: NeUQI's scale search for these fits; None = wqedge.quant.neuqi.TABLE_GRID (the table only ranks
    actions; error feedback fits the file's chunks again).
    """
    if kind in ("kfac", "fisher") and not grad_stats:
        raise ValueError(f"damage kind {kind!r} needs gradient statistics")
    if kind not in ("kfac", "fisher", "proxy"):
        raise ValueError(f"unknown damage kind {kind!r} (kfac, fisher or proxy)")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    units = enumerate_units(linears, group_size)
    base_actions = tuple(actions)
    actions = table_actions(base_actions, tuple(protect))
    bits = unit_bits(units, actions)
    prot_map: dict[str, dict[int, list[list[int]]]] = {}
    dmg = np.zeros((len(units), len(actions)), dtype=np.float64)
    feats = np.zeros((len(units), len(FEATURE_NAMES)), dtype=np.float32)
    by_lin: dict[str, list[Unit]] = {}
    for u in units:
        by_lin.setdefault(u.linear.hf_name, []).append(u)
    if fitter is None:
        from .quant.fit import dequantize_chunk, fit_linear
        from .quant import neuqi
        neuqi_grid = neuqi.TABLE_GRID if neuqi_grid is None else neuqi_grid
    t0 = time.time()
    # --distributed: each linear's rows of the table computed by its owner rank, then summed (the others hold zeros)
    from . import distributed
    owner = distributed.owners([lin.out_features * lin.in_features for lin in linears]) if keep is None else None

    def one(li: int, lin: Linear) -> None:
        """Rows of dmg/feats (and prot_map, keep) of linear li: each linear's are its own, so two run at once."""
        w = weight_fn(lin).to(dev, torch.float32)
        N, K = w.shape
        st = (input_stats or {}).get(lin.hf_name)
        gs = (grad_stats or {}).get(lin.hf_name)
        g = gs.g2.to(dev, torch.float64) ** g_power if (gs is not None and kind == "kfac") else None
        rows = sample_rows(N, None if (keep is not None or fitter is not None) else max_rows,
                           g if g is not None else None).to(dev)
        rw = N / len(rows)
        ws = w[rows]
        gsub = g[rows] if g is not None else None
        hdiag_all = st.diag.to(dev, torch.float64) if st is not None else torch.ones(K, dtype=torch.float64, device=dev)
        lus = by_lin[lin.hf_name]
        has_xtx = st is not None and st.has_xtx
        if feedback and (not has_xtx or st.xtx_block):
            raise ValueError(f"feedback-aware damage needs full XᵀX statistics ({lin.hf_name} has none)")
        if has_xtx and st.xtx_block and st.xtx_block % group_size:
            raise ValueError(f"XᵀX of {lin.hf_name} holds only its {st.xtx_block}-column diagonal blocks, which do "
                             f"not cover chunks of {group_size} columns")
        if feedback:
            from .quant.gptq import conditional_precision
            price = conditional_precision(st.xtx, group_size, device=dev)
        else:
            price = hdiag_all
        cols = {}
        if protect:
            sal = column_saliency(w, price, g)
            cols = {k: salient_columns(sal, group_size, k) for k in protect}
            prot_map[lin.hf_name] = cols
        deqs = {}
        if fitter is None:
            for a in actions:
                base, k = split_action(a)
                if blocks.block_type(base).is_float:
                    deqs[a] = ws.half().float()
                else:
                    m = "minmax" if a == "q8" else method
                    chunks = fit_linear(ws, [base] * len(lus), group_size, m, hdiag_all.float(),
                                        protected=cols[k] if k else None,
                                        neuqi_grid=neuqi_grid)
                    deqs[a] = torch.cat([dequantize_chunk(c) for c in chunks], 1).to(dev)
        for u in lus:
            s, e = u.start, u.end
            wc = ws[:, s:e]
            hdiag = hdiag_all[s:e]
            hfull = st.block(s, e).to(dev, torch.float64) if (has_xtx and not feedback) else None
            for ai, a in enumerate(actions):
                base, k = split_action(a)
                if fitter is None:
                    wh = deqs[a][:, s:e]
                elif blocks.block_type(base).is_float:
                    wh = wc.half().float()
                else:
                    wh = fitter(wc, base, hdiag.float(), cols[k][u.chunk] if k else None)
                if keep is not None:
                    keep[(lin.hf_name, u.chunk, a)] = wh
                d = (wh - wc).double()
                if kind == "fisher":
                    dmg[u.index, ai] = 0.5 * rw * float((gs.fisher[:, s:e].to(dev, torch.float64)[rows] * d * d).sum())
                    continue
                if feedback:
                    q = (d * d * price[s:e]).sum(1)
                else:
                    q = (d @ hfull * d).sum(1) if hfull is not None else (d * d * hdiag).sum(1)   # [rows]
                dmg[u.index, ai] = 0.5 * rw * float((q * gsub).sum() if gsub is not None else q.sum())
            feats[u.index] = _features(w[:, s:e], hdiag, None if st is None else st.max_abs[s:e], g)
    mine = [li for li in range(len(linears)) if owner is None or owner[li] == distributed.rank()]
    # on CPU two linears at a time keep both cores busy through each one's single-threaded steps (NeUQI's kernel
    # already uses both; the torch work between its calls mostly does not); on a GPU, or with a caller's fitter,
    # one after the other
    with ThreadPoolExecutor(TABLE_THREADS if dev.type == "cpu" and fitter is None else 1) as ex:
        for li, _ in zip(mine, ex.map(lambda li: one(li, linears[li]), mine)):
            if progress:
                progress(f"damage table: {li + 1}/{len(linears)} linears ({time.time() - t0:.1f} s)")
    if owner is not None:
        distributed.reduce_sum_(torch.from_numpy(dmg))
        distributed.reduce_sum_(torch.from_numpy(feats))
        prot_map = distributed.merge_dicts(prot_map)
    return DamageTable(units, tuple(actions), bits, dmg, group_size, kind, feats, FEATURE_NAMES,
                       {"seconds": time.time() - t0, "method": method, "max_rows": max_rows, "feedback": feedback,
                        "protect": list(protect)}, prot_map)
