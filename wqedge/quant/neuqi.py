"""NeUQI: near-optimal initialisation of a uniform quantizer (arXiv 2505.17595), vectorised over rows.

Per row of a chunk w [N, g] with weights h (>= 0, normalised to sum 1) it minimises
    L(s, z) = sum_i h_i (s * (clamp(round(w_i / s + z), 0, 2^k - 1) - z) - w_i)^2
over a *float* zero point z and a scale s, as the paper does (docs: METHODS.md section 2):
  * s on a coarse grid s_mm * i / 64, i = 1..64, then a fine grid s_best + s_mm * j / 2048, 0 < |j| <= 16
    (96 zero-point solves); the scale with the least s^2 * L (normalised units) wins. (`grid` picks other
    step counts: TABLE_GRID for the damage table, FAST_GRID for error feedback.)
  * for a fixed s, L is piecewise quadratic in z. First the surrogate in which every unclamped term costs
    h_i / 4 (two breakpoints per element) is minimised exactly; it is convex (each term is), so with the row
    sorted once its minimiser is the first kink where the derivative turns non-negative, or the root of the
    linear piece before it: found by binary search (torch) or a merge walk (C) over the two sorted kink
    lists with prefix sums, no per-scale sort. Then the exact L is minimised on [z* - 1, z* + 1] by
    sorting its breakpoints (at most two per element, one sort of g event times) and sweeping the
    quadratic coefficients piece by piece.
Two backends compute the same thing. 'torch' (any device; the reference and the GPU path) vectorises over
rows and scales. 'c' (CPU) is the same algorithm as a small C kernel (cpp/planning/neuqi_kernel.c, built by
CMake with the runtime as libwqedge_neuqi) called through ctypes on row blocks from several threads: per row and
scale the work is a sort of g event times and a sweep, which torch's eager ops run ~3x slower per core
(many passes over [rows, scales, g] arrays). backend='auto' takes 'c' for CPU tensors when the library loads, and
falls back to 'torch' (with a warning) when it does not. WQEDGE_NEUQI_BACKEND=torch|c overrides 'auto';
WQEDGE_NEUQI_LIB points at a specific build of the library.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

COARSE_STEPS = 64     # s_mm * i / 64, i = 1..64
FINE_STEPS = 2048     # s_best + s_mm * j / 2048
FINE_RADIUS = 16      # |j| <= 16
FULL_GRID = (COARSE_STEPS, FINE_STEPS, FINE_RADIUS)   # the paper's search: fits without calibration text use it
# Error feedback (which moves the weights after the fit) searches a coarser grid, the damage table an even coarser
# one (TABLE_GRID, below): on llama-s chunks (16, 256, 8) costs +0.04% (q2) .. +0.14% (q4) weighted fit loss for
# 2.5x less time (bench/results/convert_cost.md: plans and files unchanged within noise).
FAST_GRID = (16, 256, 8)
# The damage table's grid, for every kind (it only ranks actions; error feedback fits the file's chunks again with
# FAST_GRID). For the two-level kinds' 32-column sub-blocks, on llama-s's first layer +1.5% (q4s), +1.4% (q3s),
# +0.2% (q2s) weighted fit loss against FAST_GRID for 1.6-1.9x less time (bench/results/two_level_default.md); for
# the one-scale kinds see bench/results/table_grid.md.
TABLE_GRID = (8, 128, 4)
# Error feedback's grid for the two-level kinds' 32-column sub-blocks. Their scales are rounded onto 6-bit codes under
# the row's scale afterwards, yet TABLE_GRID here cost +0.02% (llama-s) and +0.22% (smol-s) perplexity at 4.25 b for
# ~10% of the fitting time (bench/results/table_grid.md): they keep FAST_GRID.
SUB_GRID = FAST_GRID
DAMP = 0.01           # h = diag(X^T X / N) + 1% of its mean (weights of one chunk's fit; gptq.DAMP = 0.1
#                       damps the full XᵀX of error feedback: another matrix, tuned separately, docs/architecture.md)


def damp(h: torch.Tensor, damp_mean: float | torch.Tensor | None = None, percdamp: float = DAMP) -> torch.Tensor:
    """GPTQ/NeUQI damping: h + percdamp * mean(h). `damp_mean` is the mean to use (the whole linear's diagonal
    in the paper); by default the mean of h itself."""
    h = torch.as_tensor(h, dtype=torch.float32)
    mean = h.mean() if damp_mean is None else torch.as_tensor(damp_mean, dtype=torch.float32, device=h.device)
    return h + percdamp * mean


def row_weights(h: torch.Tensor | None, n: int, g: int, device=None) -> torch.Tensor:
    """Weights [n, g] normalised to sum 1 per row; uniform when h is None or a row's weights are all zero."""
    if h is None:
        return torch.full((n, g), 1.0 / g, device=device)
    h = torch.as_tensor(h, dtype=torch.float32, device=device)
    h = h.expand(n, g) if h.dim() == 1 else h
    if h.shape != (n, g):
        raise ValueError(f"weights of shape {tuple(h.shape)} do not match the chunk ({n}, {g})")
    tot = h.sum(dim=1, keepdim=True)
    return torch.where(tot > 0, h / torch.where(tot > 0, tot, 1.0), 1.0 / g)


# ---------------------------------------------------------------- surrogate: exact minimiser, no per-scale sort

class _SortedRows:
    """A row block sorted once: the prefix sums every scale's surrogate needs."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor):
        self.ws, order = torch.sort(w, dim=1)
        hs = torch.gather(h, 1, order)
        zero = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        self.Hc = torch.cat([zero, torch.cumsum(hs, 1)], 1)          # [R, g+1]: sum of h over the k smallest w
        self.Pc = torch.cat([zero, torch.cumsum(hs * self.ws, 1)], 1)  # [R, g+1]: sum of h*w likewise
        self.H = self.Hc[:, -1:]
        self.P = self.Pc[:, -1:]
        self.rank = torch.searchsorted(self.ws, self.ws, right=True)  # #{w <= w_j}
        self.lrank = torch.searchsorted(self.ws, self.ws)              # #{w < w_j}

    def grad(self, m, s, a, b, n):
        """Half-derivative of the surrogate (weight units) at offset m with a lower-clamped (the a smallest)
        and g - b upper-clamped elements: sum_lower h (m - w) + sum_upper h (m + (n-1) s - w)."""
        Ha, Hb = torch.gather(self.Hc, 1, a), torch.gather(self.Hc, 1, b)
        Pa, Pb = torch.gather(self.Pc, 1, a), torch.gather(self.Pc, 1, b)
        return m * Ha - Pa + (m + (n - 1) * s) * (self.H - Hb) - (self.P - Pb), (Ha, Hb, Pa, Pb)


def _surrogate_offset(sr: _SortedRows, s: torch.Tensor, n: int) -> torch.Tensor:
    """Exact minimiser m* (offset, w_hat = s*q + m) of the surrogate for every scale s [R, S].

    With m the offset, element i is lower-clamped (q = 0, cost (w - m)^2) when m > w_i + s/2, upper-clamped
    (cost (w - m - (n-1)s)^2) when m < w_i - (n - 1/2)s, and costs s^2/4 in between. Each term is convex,
    so the sum is; its subgradient is monotone. Kinks: A_j = w_j + s/2 and B_j = w_j - (n - 1/2)s, each list
    sorted with w. Binary-search each list for its first kink whose right derivative is >= 0; the smaller
    of the two is the first such kink c overall; the minimiser is c, or the root of the linear piece left of c.
    """
    ws, rank = sr.ws, sr.rank
    R, g = ws.shape
    steps = max(1, math.ceil(math.log2(g + 1)))

    def first_nonneg(kind):
        lo = torch.zeros_like(s, dtype=torch.long)
        hi = torch.full_like(lo, g)
        for _ in range(steps):
            mid = torch.minimum((lo + hi) // 2, torch.full_like(lo, g - 1))
            wj = torch.gather(ws, 1, mid)
            rj = torch.gather(rank, 1, mid)
            if kind == "A":
                m = wj + 0.5 * s
                a, b = rj, torch.searchsorted(ws, wj + n * s, right=True)
            else:
                m = wj - (n - 0.5) * s
                a, b = torch.searchsorted(ws, wj - n * s, right=True), rj
            ok = (sr.grad(m, s, a, b, n)[0] >= 0) & (lo < hi)
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok | (lo >= hi), lo, mid + 1)
        return lo

    inf = torch.tensor(float("inf"), device=ws.device)
    jA, jB = first_nonneg("A"), first_nonneg("B")
    cA = torch.where(jA < g, torch.gather(ws, 1, jA.clamp(max=g - 1)) + 0.5 * s, inf)
    cB = torch.where(jB < g, torch.gather(ws, 1, jB.clamp(max=g - 1)) - (n - 0.5) * s, inf)
    c = torch.minimum(cA, cB)
    c = torch.where(torch.isfinite(c), c, ws[:, -1:] + 0.5 * s)  # unreachable with positive weights
    # the piece just left of c: counts are the left limits at c, taken from the kink's own element
    # (recomputing them from c in floating point could misplace that element)
    fromA, fromB = cA <= cB, cB <= cA
    jA, jB = jA.clamp(max=g - 1), jB.clamp(max=g - 1)
    wA, wB = torch.gather(ws, 1, jA), torch.gather(ws, 1, jB)
    aL = torch.where(fromA, torch.gather(sr.lrank, 1, jA), torch.searchsorted(ws, wB - n * s))
    bL = torch.where(fromB, torch.gather(sr.lrank, 1, jB), torch.searchsorted(ws, wA + n * s))
    gl, (Ha, Hb, Pa, Pb) = sr.grad(c, s, aL, bL, n)
    denom = Ha + sr.H - Hb
    root = (Pa + sr.P - Pb - (n - 1) * s * (sr.H - Hb)) / torch.where(denom > 0, denom, 1.0)
    return torch.where((gl > 0) & (denom > 0), torch.minimum(root, c), c)


# ---------------------------------------------------------------- exact solve on a window of width 2

def _sort_keys_cpu(tau: torch.Tensor) -> torch.Tensor:
    """Permutation sorting the last dim of tau (values in (0, 1]) ascending: numpy sorts packed integer keys
    (quantised tau | column index) with SIMD, several times faster than torch.sort on CPU. Ties closer than the key
    resolution (2^-24 for g <= 128) may come out swapped; the sweep is then still exact up to that."""
    g = tau.shape[-1]
    ib = max(1, (g - 1).bit_length())
    idx = torch.arange(g, dtype=torch.int32)
    if ib <= 8:
        tb = min(24, 31 - ib)  # float32 holds 24-bit integers exactly: tau * (2^tb - 1) <= 2^tb - 1
        key = (tau * float((1 << tb) - 1)).to(torch.int32)
        key.bitwise_left_shift_(ib).bitwise_or_(idx)
        out = torch.from_numpy(np.sort(key.numpy(), axis=-1))
    else:
        key = tau.view(torch.int32).to(torch.int64)  # positive floats order as their bit patterns
        key.bitwise_left_shift_(32).bitwise_or_(idx.long())
        out = torch.from_numpy(np.sort(key.numpy(), axis=-1))
    return out.bitwise_and_((1 << ib) - 1).long()


def _argsort(tau: torch.Tensor) -> torch.Tensor:
    if tau.device.type == "cpu":
        return _sort_keys_cpu(tau.contiguous())
    return torch.argsort(tau, dim=-1)


def _exact_window(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, zl: torch.Tensor, n: int):
    """Exact argmin over z in [zl, zl + 2] of L(z) = sum_i h_i (clamp(round(w_i/s + z), 0, n-1) - w_i/s - z)^2.

    w, h [R, g] (h normalised: sum 1 per row); s, zl [R, S]. Returns (z, L) [R, S] in normalised units
    (L times s^2 is the weighted squared error).
    With t = z - zl and v_i = w_i/s + zl + 1/2, f_i = floor(v_i): the code of element i steps up at
    t = tau_i = f_i + 1 - v_i in (0, 1] (when 0 <= f_i <= n-2) and at tau_i + 1 (when -1 <= f_i <= n-3).
    L(t) = A2 - 2 t A1 + t^2 with A1 = sum h c, A2 = sum h c^2, c_i = q_i - w_i/s - zl; a step adds h_i to A1
    and 2 h_i t_step to A2. Sorting the tau once orders both halves of the window.
    """
    R, g = w.shape
    S = s.shape[1]
    v = w[:, None, :] * (1.0 / s)[:, :, None]
    v += (zl + 0.5)[:, :, None]
    f = torch.floor(v)
    tau = torch.sub(f, v).add_(1.0)
    c = f.clamp(0, n - 1).sub_(v).add_(0.5)                     # c_i at t = 0
    hb = h[:, None, :]
    A1 = torch.matmul(c, h[:, :, None]).squeeze(-1)              # [R, S]
    A2 = torch.matmul(c.square_(), h[:, :, None]).squeeze(-1)
    del c
    hv1 = (f.clamp(0, n - 2) == f) * hb                          # weight of the step at tau
    hv2 = (f.clamp(-1, n - 3) == f) * hb                         # weight of the step at tau + 1
    del f, v
    perm = _argsort(tau)
    tau = torch.gather(tau, 2, perm)
    hv1 = torch.gather(hv1, 2, perm)
    hv2 = torch.gather(hv2, 2, perm)
    del perm
    D1 = torch.empty(R, S, 2 * g + 1, dtype=w.dtype, device=w.device)
    D1[:, :, 0] = A1
    D1[:, :, 1 : g + 1] = hv1
    D1[:, :, g + 1 :] = hv2
    D2 = torch.empty_like(D1)
    D2[:, :, 0] = A2
    torch.mul(hv1, tau, out=D2[:, :, 1 : g + 1])
    torch.addcmul(hv2, hv2, tau, out=D2[:, :, g + 1 :])
    del hv1, hv2
    D2[:, :, 1:] *= 2.0
    S1 = torch.cumsum(D1, 2, out=D1)
    S2 = torch.cumsum(D2, 2, out=D2)
    E = torch.empty(R, S, 2 * g + 2, dtype=w.dtype, device=w.device)
    E[:, :, 0] = 0.0
    E[:, :, 1 : g + 1] = tau
    torch.add(tau, 1.0, out=E[:, :, g + 1 : 2 * g + 1])
    E[:, :, -1] = 2.0
    del tau
    t = torch.clamp(S1, E[:, :, :-1], E[:, :, 1:])              # best t inside each piece
    del E
    obj = torch.add(t, S1, alpha=-2.0).mul_(t).add_(S2)          # L(t) = A2 + t (t - 2 A1)
    best, k = obj.min(dim=2, keepdim=True)
    tb = torch.gather(t, 2, k)
    return (zl + tb.squeeze(2)), best.squeeze(2).clamp_(min=0.0)


def _solve_scales(w, h, sr, s, n):
    """(z, s^2 L) for every scale s [R, S]."""
    m = _surrogate_offset(sr, s, n)
    zl = -m / s - 1.0
    z, L = _exact_window(w, h, s, zl, n)
    return z, L * s * s


def _neuqi_block(w: torch.Tensor, h: torch.Tensor, n: int, scale_batch: int, grid=FULL_GRID):
    coarse, fine, radius = grid
    R, g = w.shape
    pos = h > 0
    big = torch.finfo(torch.float32).max
    lo = torch.where(pos, w, big).amin(dim=1, keepdim=True)
    hi = torch.where(pos, w, -big).amax(dim=1, keepdim=True)
    smm = (hi - lo) / (n - 1)
    const = smm <= 0
    smm = torch.where(const, 1.0, smm)
    sr = _SortedRows(w, h)

    def search(scales):
        zs, ls = [], []
        for k in range(0, scales.shape[1], scale_batch):
            z, L = _solve_scales(w, h, sr, scales[:, k : k + scale_batch], n)
            zs.append(z)
            ls.append(L)
        return torch.cat(zs, 1), torch.cat(ls, 1)

    i = torch.arange(1, coarse + 1, device=w.device, dtype=torch.float32) / coarse
    s_c = smm * i
    z_c, L_c = search(s_c)
    L_best, k = L_c.min(dim=1, keepdim=True)
    s_best = torch.gather(s_c, 1, k)
    z_best = torch.gather(z_c, 1, k)
    j = torch.arange(-radius, radius + 1, device=w.device, dtype=torch.float32)
    j = j[j != 0] / fine
    s_f = s_best + smm * j
    z_f, L_f = search(s_f)
    Lf_best, kf = L_f.min(dim=1, keepdim=True)
    better = Lf_best < L_best
    s_best = torch.where(better, torch.gather(s_f, 1, kf), s_best)
    z_best = torch.where(better, torch.gather(z_f, 1, kf), z_best)
    # constant rows (over the weighted entries): s = |c| (1 for c = 0), z = -c / s, as minmax_params does
    cs = torch.where(lo == 0, 1.0, lo.abs())
    s_best = torch.where(const, cs, s_best)
    z_best = torch.where(const, -lo / cs, z_best)
    return s_best.squeeze(1), z_best.squeeze(1)


# ---------------------------------------------------------------- the C kernel (CPU backend)

_LIBNAME = {"darwin": "libwqedge_neuqi.dylib", "win32": "wqedge_neuqi.dll"}.get(sys.platform, "libwqedge_neuqi.so")

_LIB = None
_LIB_ERROR: str | None = None
_LIB_LOCK = threading.Lock()


def _kernel_candidates() -> list[Path]:
    """Where the CMake-built kernel may be, first found wins: $WQEDGE_NEUQI_LIB; a development build in the
    source tree (cpp/build/, so an editable install uses what `cmake --build cpp/build` just built); the copy
    `pip install .` put next to this module."""
    out = []
    if os.environ.get("WQEDGE_NEUQI_LIB"):
        return [Path(os.environ["WQEDGE_NEUQI_LIB"])]
    here = Path(__file__).resolve().parent
    out.append(here.parents[1] / "cpp" / "build" / _LIBNAME)
    out.append(here / _LIBNAME)
    return out


def _load_kernel() -> ctypes.CDLL:
    found = [p for p in _kernel_candidates() if p.is_file()]
    if not found:
        raise RuntimeError("libwqedge_neuqi not found (looked in " + ", ".join(map(str, _kernel_candidates())) + ")")
    so = found[0]
    lib = ctypes.CDLL(str(so))
    f = lib.wq_neuqi_rows
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_int
    f = lib.wq_solve_scale
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_double,
                  ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
    f.restype = ctypes.c_double
    if hasattr(lib, "wq_feedback_run"):    # error feedback's column loop (quant/gptq.py; absent from older builds)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        f = lib.wq_feedback_run
        f.argtypes = [p, i64, p, i64, i64, i64, i64, i64, p, p, p, i64, p, p, p, p, p, p]
        f.restype = None
    return lib


def c_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be loaded (the reason is in `c_kernel_error()`)."""
    global _LIB, _LIB_ERROR
    if _LIB is None and _LIB_ERROR is None:
        with _LIB_LOCK:
            if _LIB is None and _LIB_ERROR is None:
                try:
                    _LIB = _load_kernel()
                except Exception as e:  # not built (e.g. WQEDGE_BUILD_PLANNING=OFF): the torch backend still works
                    _LIB_ERROR = f"{type(e).__name__}: {e}"
    return _LIB


def c_kernel_error() -> str | None:
    return _LIB_ERROR


def _c_solve_scale(w: torch.Tensor, h: torch.Tensor, n: int, s: float) -> tuple[float, float, float]:
    """(surrogate offset m*, z, L) of one row [g] for one scale with the C kernel (tests compare it with torch)."""
    lib = c_kernel()
    w = np.ascontiguousarray(w.detach().cpu().numpy(), dtype=np.float32)
    h = np.ascontiguousarray(h.detach().cpu().numpy(), dtype=np.float32)
    m, z = ctypes.c_double(), ctypes.c_double()
    L = lib.wq_solve_scale(w.ctypes.data, h.ctypes.data, w.shape[0], n, float(s), ctypes.byref(m), ctypes.byref(z))
    return m.value, z.value, L


def _neuqi_c(lib, w: torch.Tensor, hw: torch.Tensor, n: int, workers: int, grid=FULL_GRID):
    W = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    Hn = np.ascontiguousarray(hw.numpy(), dtype=np.float32)
    N, g = W.shape
    s = np.empty(N, dtype=np.float32)
    z = np.empty(N, dtype=np.float32)

    def run(r0, r1):
        rc = lib.wq_neuqi_rows(W[r0:].ctypes.data, Hn[r0:].ctypes.data, r1 - r0, g, n,
                               *grid, s[r0:].ctypes.data, z[r0:].ctypes.data)
        if rc:
            raise MemoryError("neuqi kernel: allocation failed")

    step = max(16, -(-N // (4 * workers)))
    spans = [(r, min(r + step, N)) for r in range(0, N, step)]
    if workers <= 1 or len(spans) == 1:
        for a, b in spans:
            run(a, b)
    else:  # ctypes releases the GIL: the row blocks run in parallel
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(lambda ab: run(*ab), spans))
    return torch.from_numpy(s), torch.from_numpy(z)


_WARNED = False


def neuqi_params(w: torch.Tensor, bits: int, h: torch.Tensor | None = None, *, backend: str = "auto",
                 workers: int | None = None, row_batch: int | None = None,
                 scale_batch: int = 32, grid: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI (scale, zero) per row of w [N, g] for q = clamp(round(w/s + z), 0, 2^bits - 1), w_hat = s (q - z).

    h: None (uniform), [g] or [N, g] non-negative weights, used as given (damp them first with `damp`;
    entries of weight 0, e.g. protected columns, are ignored, also for the min-max range).
    backend: 'auto', 'c' (CPU kernel; `workers` threads, default torch.get_num_threads()) or 'torch'
    (rows in blocks of `row_batch` so the [rows, scales, g] work arrays stay cache-sized).
    grid: (coarse steps, fine steps, fine radius) of the scale search; None = FULL_GRID.
    Returns float32 scale [N] (> 0) and zero [N] on w's device.
    """
    global _WARNED
    grid = FULL_GRID if grid is None else tuple(int(x) for x in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"NeUQI grid must be three positive step counts (coarse, fine, radius), got {grid}")
    from .affine import levels

    n = levels(bits)
    w = w.float()
    if w.dim() != 2:
        raise ValueError(f"neuqi_params expects w [N, g], got shape {tuple(w.shape)}")
    N, g = w.shape
    hw = row_weights(h, N, g, device=w.device)
    if backend == "auto":
        backend = os.environ.get("WQEDGE_NEUQI_BACKEND", "auto")
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"unknown NeUQI backend {backend!r} (auto, c, torch)")
    if backend in ("auto", "c") and w.device.type == "cpu":
        lib = c_kernel()
        if lib is not None:
            return _neuqi_c(lib, w, hw, n, workers or torch.get_num_threads(), grid)
        if backend == "c":
            raise RuntimeError(f"NeUQI C kernel unavailable: {_LIB_ERROR}")
        if not _WARNED:
            warnings.warn(f"NeUQI C kernel unavailable ({_LIB_ERROR}); using the slower torch backend")
            _WARNED = True
    if row_batch is None:
        # ~1M elements per [rows, scales, 2g] array on CPU (cache), more on GPU
        budget = (1 << 20) if w.device.type == "cpu" else (1 << 26)
        row_batch = max(1, budget // (scale_batch * 2 * g))
    scales, zeros = [], []
    for r in range(0, N, row_batch):
        s, z = _neuqi_block(w[r : r + row_batch].contiguous(), hw[r : r + row_batch].contiguous(), n, scale_batch,
                            grid)
        scales.append(s)
        zeros.append(z)
    return torch.cat(scales), torch.cat(zeros)
