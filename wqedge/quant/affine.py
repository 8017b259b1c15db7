"""The one asymmetric uniform (affine) quantizer, parametrised by bit width.

Two equivalent parametrisations, both per row of a chunk [N, g]:
  fitting form:  q = clamp(round(w / s + z), 0, 2^b - 1),  w_hat = s * (q - z)   (float s > 0, float z)
  file form:     w_hat = d * q + m                                               (fp16 d >= 0, m; see blocks.py)
with d = s and m = -s * z. Fitters search (s, z); the converter stores (d, m) and recomputes the codes
from the stored values with `codes_for`, so that the file holds the best codes for what it stores.
Every bit width (8, 4, 3, 2, 1) goes through these functions; there is no per-width copy.
"""
from __future__ import annotations

import torch


def levels(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"affine bit width must be an int in 1..8, got {bits!r}")
    return 1 << bits


def _col(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-row parameter [N] (or scalar) as a [N, 1] column broadcastable against [N, g]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.reshape(-1, 1) if t.dim() >= 1 else t


def quantize(w: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """Codes q = clamp(round(w/s + z), 0, 2^b - 1) as uint8 (s > 0 per row)."""
    hi = levels(bits) - 1
    q = torch.round(w.float() / _col(scale, w) + _col(zero, w)).clamp_(0, hi)
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale, zero) -> torch.Tensor:
    """w_hat = s * (q - z), float32."""
    return _col(scale, codes) * (codes.float() - _col(zero, codes))


def minmax_params(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range per row: s = (max - min) / (2^b - 1), float z = -min / s, so min and max are levels.

    `mask` [N, g] (bool) restricts the range to the marked entries (protected columns are left out).
    A constant row c gets s = |c| (1 for c = 0) and z = -c / s: its one code 0 reconstructs c exactly.
    """
    w = w.float()
    if mask is None:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, big).amin(dim=1)
        hi = torch.where(mask, w, -big).amax(dim=1)
        empty = ~mask.any(dim=1)
        lo = torch.where(empty, 0.0, lo)
        hi = torch.where(empty, 0.0, hi)
    scale = (hi - lo) / (levels(bits) - 1)
    const = scale <= 0
    scale = torch.where(const, torch.where(lo == 0, 1.0, lo.abs()), scale)
    return scale, -lo / scale


def codes_for(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """File-form codes: nearest level of d*q + m, q = clamp(round((w - m) / d)); rows with d = 0 get q = 0."""
    hi = levels(bits) - 1
    d = _col(d, w)
    safe = torch.where(d > 0, d, 1.0)
    q = torch.round((w.float() - _col(m, w)) / safe).clamp_(0, hi)
    return torch.where(d > 0, q, 0.0).to(torch.uint8)


def dequantize_dm(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """File-form dequantization d*q + m in float32 (the arithmetic blocks.unpack_chunk does)."""
    return _col(d, codes) * codes.float() + _col(m, codes)
