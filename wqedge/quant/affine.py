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

Subscale kinds (q4s, q3s, q2s: blocks.py) are the same grid with per-column parameters: d and m may be [N, g]
instead of [N], D = d * s_j and M = -dmin * n_j of each column's 32-column sub-block (`chunk_grid`); the second
level, rounding float per-sub-block scales and mins onto 6-bit codes under fp16 row scales, is `subscale_codes`.
"""
from __future__ import annotations

import torch

from ..blocks import SUB_LEVELS, SUBBLOCK


def levels(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"affine bit width must be an int in 1..8, got {bits!r}")
    return 1 << bits


def _col(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-row parameter [N] (or scalar) as a [N, 1] column broadcastable against [N, g]; per-column
    parameters [N, g] pass unchanged."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.reshape(-1, 1) if t.dim() == 1 else t


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


# ---------------------------------------------------------------- two-level (subscale) grids

def expand_sub(p: torch.Tensor, g: int) -> torch.Tensor:
    """Per-sub-block values [N, n_sub] -> per-column [N, g] (each repeated over its 32 columns)."""
    return p.repeat_interleave(SUBBLOCK, dim=1)[:, :g]


def subscale_grid(d, dmin, sc, mn, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (D, M) [N, g] of a subscale chunk, D = d * s_j, M = -(dmin * n_j): torch twin of
    blocks.subscale_grid (both products exact in fp32)."""
    d = torch.as_tensor(d, dtype=torch.float32).reshape(-1, 1)
    dmin = torch.as_tensor(dmin, dtype=torch.float32, device=d.device).reshape(-1, 1)
    sc = torch.as_tensor(sc, device=d.device).float()
    mn = torch.as_tensor(mn, device=d.device).float()
    return expand_sub(d * sc, g), expand_sub(-(dmin * mn), g)


def chunk_grid(bt, c, device=None, col0: int = 0, width: int | None = None):
    """(d, m) tensors of chunk c (blocks.ChunkData of block type bt) for its columns col0 .. col0 + width:
    per row [N] for one-scale kinds (m None without an offset), per column [N, width] for subscale kinds."""
    d = torch.as_tensor(c.d, device=device).float()
    if not bt.has_subscales:
        return d, (torch.as_tensor(c.m, device=device).float() if bt.has_offset else None)
    width = c.g - col0 if width is None else width
    j0, j1 = col0 // SUBBLOCK, (col0 + width - 1) // SUBBLOCK + 1
    D, M = subscale_grid(d, torch.as_tensor(c.m, device=device), torch.as_tensor(c.sc[:, j0:j1], device=device),
                         torch.as_tensor(c.mn[:, j0:j1], device=device), SUBBLOCK * (j1 - j0))
    o = col0 - SUBBLOCK * j0
    return D[:, o:o + width], M[:, o:o + width]


def subscale_codes(w: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, bits: int, hw: torch.Tensor | None = None):
    """Second level of a two-level grid: per-sub-block float scales s [N, k] (>= 0) and offsets lo [N, k] (<= 0)
    -> fp16 row scale d and min dmin [N] and 6-bit codes sc, mn [N, k] (uint8), so D = d * sc ~ s, M = -dmin * mn ~ lo.

    d = max_j s_j / 63 and dmin = max_j (-lo_j) / 63 (stored fp16); each sub-block then takes, of the floor/ceil
    neighbours of s_j / d and -lo_j / dmin, the pair whose grid gives the least (hw-weighted) squared error on
    its own 32 columns w [N, g] (hw [N, g] or None). A sub-block with s_j > 0 keeps sc >= 1."""
    N, k = s.shape
    g = w.shape[1]
    top = SUB_LEVELS - 1
    d16 = (s.amax(1) / top).half()
    dmin16 = ((-lo).amax(1).clamp_min(0) / top).half()
    d, dmin = d16.float().reshape(-1, 1), dmin16.float().reshape(-1, 1)
    rs = torch.where(d > 0, s / torch.where(d > 0, d, 1.0), 0.0)
    rm = torch.where(dmin > 0, -lo / torch.where(dmin > 0, dmin, 1.0), 0.0)
    live = s > 0
    cands = []
    for a in (torch.floor(rs), torch.ceil(rs)):
        a = torch.where(live, a.clamp(1, top), 0.0)
        for b in (torch.floor(rm), torch.ceil(rm)):
            cands.append((a, b.clamp(0, top)))
    pad = k * SUBBLOCK - g
    wp = torch.nn.functional.pad(w.float(), (0, pad)).reshape(N, k, SUBBLOCK)
    hp = None if hw is None else torch.nn.functional.pad(hw.float(), (0, pad)).reshape(N, k, SUBBLOCK)
    if hp is None:
        hp = torch.nn.functional.pad(torch.ones_like(w, dtype=torch.float32), (0, pad)).reshape(N, k, SUBBLOCK)
    best_err = best_a = best_b = None
    for a, b in cands:
        D = (d * a).unsqueeze(2)
        M = (-(dmin * b)).unsqueeze(2)
        q = torch.round((wp - M) / torch.where(D > 0, D, 1.0)).clamp_(0, (1 << bits) - 1)
        q = torch.where(D > 0, q, 0.0)
        err = (hp * (D * q + M - wp).square()).sum(2)
        if best_err is None:
            best_err, best_a, best_b = err, a, b
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
    sc, mn = best_a.to(torch.uint8), best_b.to(torch.uint8)
    return _refit_rows(w, hw, d16, dmin16, sc, mn, bits)


def _refit_rows(w, hw, d16, dmin16, sc, mn, bits: int, rounds: int = 2):
    """With the sub-block codes fixed, the row's d and dmin that minimise the (hw-weighted) squared error are a 2x2
    least-squares solve (w ~ d * (s_j q) - dmin * n_j); codes are re-rounded on the new grid, and a row keeps the
    new fp16 pair only where its error drops."""
    g = w.shape[1]
    h = torch.ones_like(w, dtype=torch.float32) if hw is None else hw.float()
    sce, mne = expand_sub(sc.float(), g), expand_sub(mn.float(), g)

    def codes_err(d, dmin):
        D, M = d.float().reshape(-1, 1) * sce, -(dmin.float().reshape(-1, 1) * mne)
        q = grid_codes(w, D, M, 1 << bits).float()
        return q, (h * (D * q + M - w).square()).sum(1)

    q, err = codes_err(d16, dmin16)
    for _ in range(rounds):
        A, B = (sce * q).double(), (-mne).double()
        hd, wd = h.double(), w.double()
        a11, a12, a22 = (hd * A * A).sum(1), (hd * A * B).sum(1), (hd * B * B).sum(1)
        b1, b2 = (hd * A * wd).sum(1), (hd * B * wd).sum(1)
        det = a11 * a22 - a12 * a12
        ok = det > 1e-12 * (a11 * a22).clamp_min(1e-300)
        nd = torch.where(ok, (a22 * b1 - a12 * b2) / torch.where(ok, det, 1.0), d16.double()).clamp_min(0).half()
        nm = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1.0), dmin16.double()).clamp_min(0).half()
        nq, nerr = codes_err(nd, nm)
        better = (nerr < err) & torch.isfinite(nd.float()) & torch.isfinite(nm.float())
        d16, dmin16 = torch.where(better, nd, d16), torch.where(better, nm, dmin16)
        q = torch.where(better[:, None], nq, q)
        err = torch.where(better, nerr, err)
    return d16, dmin16, sc, mn
