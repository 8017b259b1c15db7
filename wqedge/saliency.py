"""Activation-aware saliency protection: which input columns of a chunk to keep exact, and how that is
spelled as an allocator action.

A protected column is stored as an fp16 residual next to the chunk's codes (docs/format.md), costs
16 bits per row plus a 16-bit index, is left out of the quantizer's range fit (so the other columns get a
finer grid) and carries no rounding error of its own. The allocator prices protection like any other
action: "q3+p2" is q3 with the chunk's 2 most salient columns protected, in the same damage table, so
the knapsack buys protection only where it beats spending those bits on a wider code.

Saliency of column j = c_j · Σ_i g_i w_ij²: its loss-weighted weight energy (g_i: output sensitivity,
wqedge.calib.gradient_stats) times the price of an error in it (c_j: diag(XᵀX), or the conditional
precision under error feedback, wqedge.quant.gptq.conditional_precision). Large-activation columns
(AWQ's observation) and the columns that set a row's range both score high.
"""
from __future__ import annotations

import torch

from . import blocks
from .units import chunk_bounds

SEP = "+p"
# the quantized actions below 8 bits (fp16 needs no protection; q8's grid is already fine)
PROTECTABLE = tuple(b.name for b in blocks.BLOCK_TYPES if not b.is_float and b.nominal_bits < 8)


def protected_action(base: str, k: int) -> str:
    """The allocator's name for `base` with k protected columns ("q3+p2"); k = 0 gives base itself."""
    return base if k == 0 else f"{base}{SEP}{k}"


def split_action(name: str) -> tuple[str, int]:
    """("q3", 2) from "q3+p2"; (name, 0) for a plain action. Raises ValueError on a malformed name."""
    if SEP not in name:
        return name, 0
    base, k = name.split(SEP, 1)
    if base not in blocks.BY_NAME or not k.isdigit() or int(k) <= 0:
        raise ValueError(f"malformed protected action {name!r} (expected e.g. 'q3{SEP}2')")
    return base, int(k)


def column_saliency(w: torch.Tensor, price: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency [K] of the columns of w [N, K]: price_j · Σ_i g_i w_ij² (g ≡ 1 when None)."""
    w2 = w.double().pow(2)
    energy = (g.double().reshape(-1, 1).to(w.device) * w2).sum(0) if g is not None else w2.sum(0)
    return price.double().to(w.device) * energy


def salient_columns(saliency: torch.Tensor, group_size: int, k: int) -> list[list[int]]:
    """Per chunk, the chunk-local indices of its k most salient columns (ascending); ties by column order."""
    out = []
    for s, e in chunk_bounds(saliency.numel(), group_size):
        kk = min(k, e - s)
        top = torch.argsort(-saliency[s:e].cpu(), stable=True)[:kk]
        out.append(sorted(int(i) for i in top))
    return out
