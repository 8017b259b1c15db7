"""The one uniform-grid quantize/dequantize primitive (torch), for every block kind.

Two equivalent parametrisations, both per row of a chunk [N, g]:
  fitting form:  q = clamp(round(w / s + z), 0, 2^b - 1),  w_hat = s * (q - z)   (float s > 0, float z)
  file form:     w_hat = d * (q - q0) + m                                        (fp16 d >= 0, m; see blocks.py)
with d = s and m = -s * z. Affine kinds have q0 = 0; ternary has q0 = 1 and no stored m (affine with
m = -d, rounded symmetrically). Fitters search (s, z); the converter stores (d, m) and recomputes the codes
from the stored values with `grid_codes`, so that the file holds the best codes for what it stores; error
feedback (wqedge.quant.gptq) rounds onto the same grid with the same function. `dequantize_file` is the
torch twin of blocks.dequantize. Every bit width and kind goes through these functions; there is no
per-width or per-kind copy (`block_codes`, `block_dequantize` take a kind's q0 and offset from the traits
table).
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


def grid_codes(w: torch.Tensor, d, m, n_levels: int, zero_code: int = 0) -> torch.Tensor:
    """File-form codes: the nearest level of d * (q - q0) + m, q = clamp(round((w - m) / d) + q0, 0, n - 1)
    (m None: no offset); rows with d = 0 get q = q0."""
    d = _col(d, w)
    safe = torch.where(d > 0, d, 1.0)
    x = w.float() if m is None else w.float() - _col(m, w)
    q = torch.round(x / safe)
    if zero_code:
        q = q + zero_code
    q = q.clamp_(0, n_levels - 1)
    return torch.where(d > 0, q, float(zero_code)).to(torch.uint8)


def dequantize_file(codes: torch.Tensor, d, m=None, zero_code: int = 0) -> torch.Tensor:
    """File-form dequantization d * (q - q0) + m in float32 (the arithmetic of blocks.dequantize)."""
    q = codes.float()
    if zero_code:
        q = q - float(zero_code)
    w = _col(d, codes) * q
    return w if m is None else w + _col(m, codes)


def codes_for(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """Affine file-form codes at `bits` bits (grid_codes with q0 = 0)."""
    return grid_codes(w, d, m, levels(bits))


def block_codes(bt, w: torch.Tensor, d, m=None) -> torch.Tensor:
    """grid_codes on the grid of block type `bt` (blocks.BlockType of a quantized kind): its levels, q0, offset."""
    return grid_codes(w, d, m if bt.has_offset else None, bt.levels, bt.zero_code)


def block_dequantize(bt, codes: torch.Tensor, d, m=None) -> torch.Tensor:
    """dequantize_file with block type `bt`'s q0 and offset."""
    return dequantize_file(codes, d, m if bt.has_offset else None, bt.zero_code)
