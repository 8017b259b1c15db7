"""Fit one column chunk (or every chunk of a linear) to a block type: the quantizer entry point.

`fit_chunk(w, action, method, h, protected)` returns a `blocks.ChunkData` ready for `blocks.pack_chunk`;
`dequantize_chunk` gives exactly what `blocks.unpack_chunk` reads back from the packed bytes.

Parameters are fitted in float, then stored as fp16 and the codes recomputed from the *stored* values, so
the file holds the best codes for its own parameters. Weighted fits use h = diag(X^T X) of the chunk's
columns, damped by 1% of its mean (NeUQI/GPTQ) and normalised per row; protected columns get weight 0
(they are carried by fp16 residuals, so fitting them would waste range).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import blocks
from ..blocks import ChunkData
from . import affine
from .lowbit import fit_binary, fit_ternary
from .neuqi import damp, neuqi_params, row_weights

from ..plan import METHODS  # noqa: F401  (re-exported: the quantizer methods a plan may name)
FP16_MAX = 65504.0


# ---------------------------------------------------------------- checks

def _check_finite(w: torch.Tensor, what: str = "weights", col_offset: int = 0) -> None:
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        val = float(w[r, c])
        kind = "NaN" if val != val else ("+Inf" if val > 0 else "-Inf")
        raise ValueError(f"{what} contain {kind} at row {r}, column {c + col_offset} "
                         f"({int(bad.sum())} non-finite value(s)); cannot quantize")
    big = w.abs() > FP16_MAX
    if bool(big.any()):
        r, c = (int(v) for v in big.nonzero()[0])
        raise ValueError(f"{what} exceed the fp16 range at row {r}, column {c + col_offset} "
                         f"(|w| = {float(w[r, c].abs()):.6g} > {FP16_MAX}); the format stores fp16 parameters")


def _as_weight(w) -> torch.Tensor:
    w = torch.as_tensor(w)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight chunk [N, g], got shape {tuple(w.shape)}")
    return w.float()


def _check_h(h, g: int, device) -> torch.Tensor | None:
    if h is None:
        return None
    h = torch.as_tensor(h, dtype=torch.float32, device=device).reshape(-1)
    if h.numel() != g:
        raise ValueError(f"h has {h.numel()} entries, the chunk has {g} columns")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("h (diag of X^T X) must be finite and non-negative")
    return h


def _check_protected(protected, g: int) -> np.ndarray | None:
    if protected is None:
        return None
    p = np.unique(np.asarray(protected, dtype=np.int64).reshape(-1))
    if p.size == 0:
        return None
    if p[0] < 0 or p[-1] >= g:
        raise ValueError(f"protected column indices must lie in 0..{g - 1}, got {p.min()}..{p.max()}")
    return p


# ---------------------------------------------------------------- the row fitter shared by fit_chunk and fit_linear

def _fit_rows(w: torch.Tensor, action: str, method: str, hw: torch.Tensor | None, grid=None):
    """w [R, g], hw None or [R, g] (>= 0, already damped and with protected columns zeroed).

    Returns (codes uint8 [R, g] torch, d fp16 [R] torch, m fp16 [R] torch or None, sub) for quantized actions;
    sub is None, or (sc, mn) uint8 [R, n_sub] for subscale kinds (m is then dmin; _fit_subscale).
    """
    bt = blocks.block_type(action)
    R, g = w.shape
    if bt.has_subscales:
        return _fit_subscale(w, bt, method, hw, grid)
    if not bt.has_offset:           # symmetric grid {-a, 0, a}: the exact ternary fit
        alpha, _ = fit_ternary(w, hw)
        a16 = alpha.half()
        return affine.block_codes(bt, w, a16.float()), a16, None, None
    if bt.bits == 1:                # two levels: the exact weighted 2-means fit
        d, m, _ = fit_binary(w, hw, offset=True)
    else:
        if method == "neuqi":
            s, z = neuqi_params(w, bt.bits, hw, grid=grid)
        elif method == "minmax":
            s, z = affine.minmax_params(w, bt.bits, None if hw is None else hw > 0)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        d, m = s, -s * z
    # constant rows (over the fitted entries) store d = 0, m = the value
    mask = None if hw is None else (hw > 0)
    if mask is None:
        const = w.amax(1) == w.amin(1)
        cval = w[:, 0]
    else:
        big = torch.finfo(torch.float32).max
        hi = torch.where(mask, w, -big).amax(1)
        lo = torch.where(mask, w, big).amin(1)
        const = (hi == lo) | ~mask.any(1)
        cval = torch.where(mask.any(1), lo, w[:, 0])
    d = torch.where(const, 0.0, d)
    m = torch.where(const, cval, m)
    d16, m16 = d.half(), m.half()
    if not (bool(torch.isfinite(d16).all()) and bool(torch.isfinite(m16).all())):
        raise ValueError(f"{bt.name}: fitted scale/offset overflow fp16 (weight range too large for the format)")
    return affine.block_codes(bt, w, d16.float(), m16.float()), d16, m16, None


def _fit_subscale(w: torch.Tensor, bt, method: str, hw: torch.Tensor | None, grid=None):
    """Two-level fit: each 32-column sub-block of each row fitted as its own row (NeUQI or min-max, the same
    fitters as one-scale kinds, offsets clamped to <= 0 as k-quants do), then its scale and offset rounded onto
    6-bit codes under fp16 row scales (affine.subscale_codes); codes recomputed on the stored grid."""
    R, g = w.shape
    k = blocks.n_sub(blocks.padded(g))
    pad = k * blocks.SUBBLOCK - g
    mask = torch.ones_like(w, dtype=torch.bool) if hw is None else hw > 0
    ws = torch.nn.functional.pad(w, (0, pad)).reshape(R * k, blocks.SUBBLOCK)
    ms = torch.nn.functional.pad(mask, (0, pad)).reshape(R * k, blocks.SUBBLOCK)
    hs = torch.nn.functional.pad(torch.ones_like(w) if hw is None else hw, (0, pad)).reshape(R * k, blocks.SUBBLOCK)
    hs = torch.where(ms, hs, 0.0)
    tot = hs.sum(1, keepdim=True)
    hs = torch.where(tot > 0, hs / tot.clamp_min(1e-30), 0.0)
    if method == "neuqi":
        s, z = neuqi_params(ws, bt.bits, hs, grid=grid)
    elif method == "minmax":
        s, z = affine.minmax_params(ws, bt.bits, ms)
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    lo = -s * z
    big = torch.finfo(torch.float32).max
    hi_v = torch.where(ms, ws, -big).amax(1)
    lo_v = torch.where(ms, ws, big).amin(1)
    const = (hi_v <= lo_v) | ~ms.any(1)               # one value (or none) to fit: D = 0 (or d for a c > 0)
    c = torch.where(ms.any(1), lo_v, 0.0)
    s = torch.where(const, c.clamp_min(0), s)
    lo = torch.where(const, c.clamp_max(0), lo).clamp_max(0)
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(lo).all())):
        raise ValueError(f"{bt.name}: fitted sub-block scales are not finite")
    d16, dmin16, sc, mn = affine.subscale_codes(w, s.reshape(R, k), lo.reshape(R, k), bt.bits,
                                                None if hw is None else hw)
    # rows constant over their fitted entries are stored exactly: c > 0 as d = c, s_j = 1, q = 1; c <= 0 as dmin = -c
    hi_r = torch.where(mask, w, -big).amax(1)
    lo_r = torch.where(mask, w, big).amin(1)
    crow = (hi_r <= lo_r) | ~mask.any(1)
    if bool(crow.any()):
        cv = torch.where(mask.any(1), lo_r, 0.0)
        d16 = torch.where(crow, cv.clamp_min(0).half(), d16)
        dmin16 = torch.where(crow, (-cv).clamp_min(0).half(), dmin16)
        sc = torch.where(crow[:, None], (cv > 0).to(torch.uint8)[:, None].expand_as(sc), sc)
        mn = torch.where(crow[:, None], (cv <= 0).to(torch.uint8)[:, None].expand_as(mn), mn)
    if not (bool(torch.isfinite(d16).all()) and bool(torch.isfinite(dmin16).all())):
        raise ValueError(f"{bt.name}: fitted scale/min overflow fp16 (weight range too large for the format)")
    D, M = affine.subscale_grid(d16, dmin16, sc, mn, g)
    return affine.block_codes(bt, w, D, M), d16, dmin16, (sc, mn)


def _prepare_h(h: torch.Tensor | None, damp_mean, protected: np.ndarray | None, g: int, device) -> torch.Tensor | None:
    if h is None and protected is None:
        return None
    hd = torch.ones(g, device=device) if h is None else damp(h, damp_mean).to(device)
    if protected is not None:
        hd = hd.clone()
        hd[torch.as_tensor(protected, device=device)] = 0.0
    return hd


def _compact_grid(bt, w, d16, m16, hw):
    """(base, d, m, codes) of a compact chunk from its fitted fp16 d, m: d and m moved onto the header's grid, then,
    for kinds with an offset, each row's offset re-solved for the moved scale (the weighted mean residual, moved
    onto the grid again) where that lowers the row's weighted error; codes rounded on the result."""
    base, dn, mn = blocks.compact_snap(bt, d16.float().cpu().numpy(), None if m16 is None else m16.float().cpu().numpy())
    d = torch.from_numpy(dn).to(w.device)
    m = None if mn is None else torch.from_numpy(mn).to(w.device)
    codes = affine.block_codes(bt, w, d.float(), None if m is None else m.float())
    if m is not None:
        wt = torch.ones_like(w) if hw is None else hw
        q = codes.float() - bt.zero_code
        tot = wt.sum(1)
        m_ls = torch.where(tot > 0, (wt * (w - d.float()[:, None] * q)).sum(1) / tot.clamp_min(1e-30), m.float())
        _, _, m2 = blocks.compact_snap(bt, dn, m_ls.cpu().numpy(), base=base)
        m2 = torch.from_numpy(m2).to(w.device)
        codes2 = affine.block_codes(bt, w, d.float(), m2.float())
        err = lambda c, mm: (wt * (affine.block_dequantize(bt, c, d.float(), mm.float()) - w).square()).sum(1)
        better = err(codes2, m2) < err(codes, m)
        m = torch.where(better, m2, m)
        codes = torch.where(better[:, None], codes2, codes)
    return base, d, m, codes


def _make_chunk(action, w, codes, d16, m16, protected, sub=None, hw=None) -> ChunkData:
    g = w.shape[1]
    bt = blocks.block_type(action)
    if bt.is_float:
        vals = w.half()
        c = ChunkData(bt.name, g, values=vals.cpu().numpy())
        deq = vals.float()
    else:
        base = None
        if bt.compact:   # the fitted d, m moved onto the header's grid, and the codes rounded again on it
            base, d16, m16, codes = _compact_grid(bt, w, d16, m16, hw)
        c = ChunkData(bt.name, g, codes=codes.cpu().numpy(), d=d16.cpu().numpy(),
                      m=None if m16 is None else m16.cpu().numpy(), base=base)
        if sub is not None:
            c.sc, c.mn = (x.cpu().numpy() for x in sub)
        d, m = affine.chunk_grid(bt, c, w.device)
        deq = affine.block_dequantize(bt, codes, d, m)
    if protected is not None:
        p = torch.as_tensor(protected, device=w.device)
        c.protected = np.asarray(protected, dtype=np.int64)
        c.residuals = (w[:, p] - deq[:, p]).half().cpu().numpy()
    return c


# ---------------------------------------------------------------- public API

def fit_chunk(w: torch.Tensor, action: str, method: str = "neuqi", h: torch.Tensor | None = None,
              protected=None, *, damp_mean: float | None = None, neuqi_grid=None) -> ChunkData:
    """Quantize one chunk w [N, g] (float) with `action` (blocks.ACTION_NAMES).

    method: 'neuqi' (weighted, near-optimal float-zero-point fit) or 'minmax' (plain min-max round to nearest,
    m = min: the baseline); ignored for fp16, ternary and q1, which have their own exact fits.
    h: diag(X^T X) of the chunk's g columns, or None (uniform weights). It is damped by 1% of its mean
    (`damp_mean` overrides that mean, e.g. with the whole linear's, as fit_linear does).
    neuqi_grid: the NeUQI scale search (wqedge.quant.neuqi.FULL_GRID when None).
    protected: chunk-local column indices kept exactly: weight 0 in the fit, fp16 residual r = w - dequant.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    bt = blocks.block_type(action)
    w = _as_weight(w)
    _check_finite(w)
    N, g = w.shape
    h = _check_h(h, g, w.device)
    p = _check_protected(protected, g)
    if bt.is_float:
        return _make_chunk(bt.name, w, None, None, None, p)
    hd = _prepare_h(h, damp_mean, p, g, w.device)
    hw = None if hd is None else row_weights(hd, N, g, device=w.device)
    codes, d16, m16, sub = _fit_rows(w, bt.name, method, hw, neuqi_grid)
    return _make_chunk(bt.name, w, codes, d16, m16, p, sub, hw)


def dequantize_chunk(c: ChunkData) -> torch.Tensor:
    """float32 [N, g] reconstruction of a chunk (blocks.dequantize_chunk as a tensor), bit-identical to
    blocks.unpack_chunk(blocks.pack_chunk(c))."""
    return torch.from_numpy(blocks.dequantize_chunk(c))


def chunk_error(w: torch.Tensor, c: ChunkData, h: torch.Tensor | None = None) -> float:
    """sum_j h_j sum_i (w_hat - w)^2 (h None: plain squared error): the proxy the allocator prices."""
    e = (dequantize_chunk(c) - w.float().cpu()).square()
    if h is not None:
        e = e * torch.as_tensor(h, dtype=torch.float32).reshape(1, -1)
    return float(e.sum())


def _split_protected(protected, bounds):
    """Global column indices, or one sequence (or None) per chunk -> list of chunk-local arrays/None."""
    n = len(bounds)
    if protected is None:
        return [None] * n
    if isinstance(protected, (list, tuple)) and len(protected) == n and all(
            p is None or not np.isscalar(p) for p in protected):
        return [None if p is None else np.asarray(p, dtype=np.int64) for p in protected]
    gl = np.unique(np.asarray(protected, dtype=np.int64).reshape(-1))
    K = bounds[-1][1]
    if gl.size and (gl[0] < 0 or gl[-1] >= K):
        raise ValueError(f"protected columns must lie in 0..{K - 1}, got {gl[0]}..{gl[-1]}")
    out = []
    for s, e in bounds:
        loc = gl[(gl >= s) & (gl < e)] - s
        out.append(loc if loc.size else None)
    return out


def fit_linear(w: torch.Tensor, actions: Sequence[str], group_size: int, method: str = "neuqi",
               h: torch.Tensor | None = None, protected=None, neuqi_grid=None) -> list[ChunkData]:
    """Fit every chunk of one linear w [N, K]; actions[c] is chunk c's action (left to right along K).

    h: diag(X^T X) [K] or None; damped by 1% of its mean over the whole linear (as NeUQI does), then each
    chunk's slice is normalised. protected: global column indices, or one list of chunk-local indices
    (or None) per chunk. Chunks that share an action and width are fitted together as one batch of rows.
    neuqi_grid: the NeUQI scale search (wqedge.quant.neuqi.FULL_GRID when None; the damage table passes TABLE_GRID).
    """
    from ..units import chunk_bounds

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    w = _as_weight(w)
    N, K = w.shape
    bounds = chunk_bounds(K, group_size)
    if len(actions) != len(bounds):
        raise ValueError(f"{len(actions)} actions for {len(bounds)} chunks (K={K}, G={group_size})")
    names = [blocks.block_type(a).name for a in actions]
    _check_finite(w)
    if h is not None:
        h = _check_h(h, K, w.device)
    prot = [_check_protected(p, e - s) for p, (s, e) in zip(_split_protected(protected, bounds), bounds)]
    dmean = None if h is None else h.mean()

    out: list[ChunkData | None] = [None] * len(bounds)
    groups: dict[tuple[str, int], list[int]] = {}
    for c, (name, (s, e)) in enumerate(zip(names, bounds)):
        if blocks.block_type(name).is_float:
            out[c] = _make_chunk(name, w[:, s:e], None, None, None, prot[c])
        else:
            groups.setdefault((name, e - s), []).append(c)
    for (name, g), cs in groups.items():
        ws = torch.cat([w[:, bounds[c][0] : bounds[c][1]] for c in cs], 0)
        hs = [_prepare_h(None if h is None else h[bounds[c][0] : bounds[c][1]], dmean, prot[c], g, w.device) for c in cs]
        hw = None if all(x is None for x in hs) else torch.cat(
            [row_weights(x, N, g, device=w.device) for x in hs], 0)
        codes, d16, m16, sub = _fit_rows(ws, name, method, hw, neuqi_grid)
        for i, c in enumerate(cs):
            r = slice(i * N, (i + 1) * N)
            out[c] = _make_chunk(name, w[:, bounds[c][0] : bounds[c][1]], codes[r], d16[r],
                                 None if m16 is None else m16[r], prot[c], None if sub is None else (sub[0][r], sub[1][r]),
                                 None if hw is None else hw[r])
    return out
