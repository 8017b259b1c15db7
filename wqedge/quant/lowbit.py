"""Ternary (1.5-bit) and binary (1-bit) fits: jointly optimal level(s) and codes under weighted squared error.

Both are exact, not heuristic: for a fixed level set the best code of each element is its nearest level,
whatever its weight, so the optimal partition is a threshold in |w| (ternary) or in w (binary); trying every
threshold with the closed-form (weighted-mean) levels of each partition gives the joint optimum. One sort
and two prefix sums per row, vectorised over rows.
"""
from __future__ import annotations

import torch

from .neuqi import row_weights


def fit_ternary(w: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, g] -> (alpha [N], codes t uint8 [N, g]) with w_hat = alpha * (t - 1), t in {0, 1, 2}.

    The support {t != 1} is the k largest |w|; for it alpha = sum h|w| / sum h, and the error is
    sum h w^2 - (sum h|w|)^2 / sum h; the best k over 1..g wins (ties: smallest k). h: None, [g] or [N, g].
    """
    w = w.float()
    N, g = w.shape
    hw = row_weights(h, N, g, device=w.device)
    a, order = torch.sort(w.abs(), dim=1, descending=True)
    hs = torch.gather(hw, 1, order)
    S1 = torch.cumsum(hs * a, 1)
    S0 = torch.cumsum(hs, 1)
    gain = torch.where(S0 > 0, S1 * S1 / torch.where(S0 > 0, S0, 1.0), 0.0)
    k = gain.argmax(dim=1, keepdim=True)
    s0 = torch.gather(S0, 1, k)
    alpha = torch.where(s0 > 0, torch.gather(S1, 1, k) / torch.where(s0 > 0, s0, 1.0), 0.0).squeeze(1)
    return alpha, ternary_codes(w, alpha)


def ternary_codes(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Nearest of {-a, 0, a}: t = clamp(round(w / a), -1, 1) + 1; rows with a = 0 get t = 1 (zero)."""
    from .affine import grid_codes
    return grid_codes(w, alpha, None, 3, zero_code=1)


def fit_binary(w: torch.Tensor, h: torch.Tensor | None = None, offset: bool = True):
    """w [N, g] -> (d [N], m [N], codes uint8 [N, g]) with w_hat = d * q + m, q in {0, 1}: sign * alpha + beta
    with d = 2 alpha, m = beta - alpha.

    offset=True: weighted optimal two-level quantizer (weighted 2-means in 1-D: the best split of the sorted
    row, each side at its weighted mean). offset=False: beta = 0, alpha = sum h|w| / sum h (the optimum for
    levels +-alpha). Codes are the nearest level.
    """
    w = w.float()
    N, g = w.shape
    hw = row_weights(h, N, g, device=w.device)
    if not offset:
        alpha = (hw * w.abs()).sum(1) / hw.sum(1)
        d, m = 2 * alpha, -alpha
    else:
        ws, order = torch.sort(w, dim=1)
        hs = torch.gather(hw, 1, order)
        H0 = torch.cumsum(hs, 1)                 # weight of the k+1 smallest
        P0 = torch.cumsum(hs * ws, 1)
        Ht, Pt = H0[:, -1:], P0[:, -1:]
        HL, PL = H0[:, :-1], P0[:, :-1]          # split after position k: low = first k+1
        HH, PH = Ht - HL, Pt - PL
        ok = (HL > 0) & (HH > 0)
        one = torch.where(Ht > 0, Pt * Pt / torch.where(Ht > 0, Ht, 1.0), 0.0)   # single level
        gain = torch.where(ok, PL * PL / torch.where(ok, HL, 1.0) + PH * PH / torch.where(ok, HH, 1.0), -1.0)
        gbest, k = gain.max(dim=1, keepdim=True) if g > 1 else (torch.full_like(one, -1.0), torch.zeros_like(one, dtype=torch.long))
        split = gbest > one
        mean = torch.where(Ht > 0, Pt / torch.where(Ht > 0, Ht, 1.0), 0.0)
        k = k.clamp(max=max(g - 2, 0))
        hl, pl = torch.gather(HL, 1, k) if g > 1 else Ht, torch.gather(PL, 1, k) if g > 1 else Pt
        lo = torch.where(split, pl / torch.where(hl > 0, hl, 1.0), mean)
        hi = torch.where(split, (Pt - pl) / torch.where(Ht - hl > 0, Ht - hl, 1.0), mean)
        d, m = (hi - lo).squeeze(1).clamp_(min=0.0), lo.squeeze(1)
    return d, m, binary_codes(w, d, m)


def binary_codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Nearest of {m, m + d}; rows with d = 0 get q = 0."""
    from .affine import codes_for
    return codes_for(w, d, m, 1)
