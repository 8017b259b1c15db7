"""GPTQ/LDLQ-style error feedback inside one linear, for mixed per-chunk actions.

`gptq_linear(w, xtx, actions, group_size, method)` quantizes one linear W[N, K] chunk by chunk, left to
right: each chunk's quantizer parameters are fitted (wqedge.quant.fit.fit_chunk, NeUQI by default) on the
chunk's *current* weights, i.e. after the error of the earlier chunks was fed forward; then its columns are
rounded one at a time onto that grid and each column's error is spread over the not-yet-quantized columns
through the Cholesky factor of (XᵀX + damp)⁻¹ (Frantar et al., GPTQ). fp16 chunks and protected columns
are exact (their error, fp16 rounding only, is fed forward too). The result is a list of
blocks.ChunkData, exactly what the converter packs.

`feedback_order` and `conditional_precision` expose the same column order and Cholesky factor, so the
damage table (wqedge.damage) can price a chunk as error feedback will quantize it: with feedback, column
j's rounding error e_j costs e_j² / U_jj² (U the upper Cholesky factor of the permuted inverse), the
precision of x_j given the columns quantized after it, instead of e H eᵀ.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import blocks
from ..blocks import ChunkData
from ..units import chunk_bounds
from .affine import block_codes, block_dequantize, chunk_grid, expand_sub

DAMP = 0.1          # of mean diag(XᵀX); measured on llama-s: 0.1 beat 0.01 and 0.3 (ppl 6.43 vs 6.46 at 3.25 bits)
#                     (neuqi.DAMP = 0.01 weights a single chunk's fit: a different matrix, kept apart on purpose)
ACT_ORDERS = ("chunk", "global", None)


def feedback_order(diag: torch.Tensor, bounds, act_order: str | None = "chunk") -> torch.Tensor:
    """The order in which gptq_linear quantizes columns: None (left to right), "chunk" (chunks left to
    right, columns inside a chunk by decreasing diag(XᵀX)) or "global" (all by decreasing diag(XᵀX))."""
    diag = diag.cpu()
    if act_order == "global":
        return torch.argsort(-diag, stable=True)
    if act_order == "chunk":
        return torch.cat([s + torch.argsort(-diag[s:e], stable=True) for s, e in bounds])
    if act_order in (None, "none"):
        return torch.arange(len(diag))
    raise ValueError(f"act_order must be None, 'chunk' or 'global', got {act_order!r}")


def damped_hessian(xtx: torch.Tensor, damp: float = DAMP, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, dead): XᵀX in float64 with dead (never active) columns set to 1 on the diagonal, plus damp x
    mean diagonal; dead marks the columns whose weights do not matter."""
    H = xtx.to(device or xtx.device, torch.float64).clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(torch.diag(H).mean()))   # (no K x K identity: 1 GB in float64 at K = 11008)
    return H, dead


def inverse_cholesky(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of (H permuted by perm)⁻¹, the factor GPTQ spreads errors with (float32)."""
    L = torch.linalg.cholesky(H[perm[:, None], perm])      # one permuted copy, not two
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()


def conditional_precision(xtx: torch.Tensor, group_size: int, damp: float = DAMP, act_order: str | None = "chunk",
                          device=None) -> torch.Tensor:
    """Per column j (in column order), 1 / U_jj²: what a unit of squared rounding error in column j costs
    once error feedback has compensated it with the columns quantized after it (float64 [K])."""
    K = xtx.shape[0]
    H, _ = damped_hessian(xtx, damp, device)
    perm = feedback_order(torch.diag(H), chunk_bounds(K, group_size), act_order).to(H.device)
    u = torch.diag(inverse_cholesky(H, perm)).double()
    out = torch.empty(K, dtype=torch.float64, device=H.device)
    out[perm] = 1.0 / (u * u)
    return out


def _column_loop(dev):
    """The C column loop (cpp/planning/feedback_kernel.c, in the planning library NeUQI loads) for CPU tensors, or
    None: on GPUs, when the library is missing or older than this function, or with WQEDGE_FEEDBACK_BACKEND=torch
    (the torch loop below, its reference)."""
    import os
    from .neuqi import c_kernel
    if torch.device(dev).type != "cpu" or os.environ.get("WQEDGE_FEEDBACK_BACKEND", "auto") == "torch":
        return None
    lib = c_kernel()          # (its loader declares the function's argument types)
    return getattr(lib, "wq_feedback_run", None) if lib is not None else None


class _ColumnGrid:
    """Chunk c's stored grid, expanded once (chunk_grid), so that error feedback rounds one column at a time with
    affine.block_codes / block_dequantize on that column's parameters instead of rebuilding the grid per column."""

    def __init__(self, c: ChunkData, dev):
        self.bt = blocks.block_type(c.action)
        if self.bt.is_float:
            return
        d, m = chunk_grid(self.bt, c, dev)
        self.per_col = d.dim() == 2            # subscale kinds: D, M per column
        self.d = d if self.per_col else d.reshape(-1, 1)
        self.m = None if m is None else (m if self.per_col else m.reshape(-1, 1))

    def _at(self, t, j):
        return None if t is None else (t[:, j:j + 1] if self.per_col else t)

    def codes(self, x: torch.Tensor, j: int) -> torch.Tensor | None:
        """Codes uint8 [N] of column x [N], chunk-local column j (None for a float kind)."""
        if self.bt.is_float:
            return None
        return block_codes(self.bt, x[:, None], self._at(self.d, j), self._at(self.m, j))[:, 0]

    def round(self, x: torch.Tensor, j: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(codes uint8 [N], dequantized float32 [N]) of column x [N], chunk-local column j."""
        if self.bt.is_float:
            return None, x.half().float()
        d, m = self._at(self.d, j), self._at(self.m, j)
        q = block_codes(self.bt, x[:, None], d, m)
        return q[:, 0], block_dequantize(self.bt, q, d, m)[:, 0]


def gptq_linear(w: torch.Tensor, xtx: torch.Tensor, actions: list[str], group_size: int, method="neuqi",
                protected: list[list[int]] | None = None, damp: float = DAMP, hdiag: torch.Tensor | None = None,
                block: int = 128, act_order: str | None = "chunk", refit: bool = True,
                neuqi_grid=None) -> list[ChunkData]:
    """Error-feedback quantization of w [N, K] (float) with XᵀX [K, K]; one action per chunk.

    refit: afterwards re-solve each chunk's d (and m) with its codes fixed (refit_params).
    act_order: None (left to right), "chunk" (chunks left to right, columns inside a chunk by decreasing
    diag(XᵀX); each chunk's quantizer is fitted on its weights as updated by the earlier chunks' errors) or
    "global" (all columns by decreasing diag(XᵀX); every chunk's quantizer fitted up front on the original
    weights, GPTQ's static groups).
    neuqi_grid: NeUQI's scale search for the chunk fits; None = neuqi.FAST_GRID (neuqi.SUB_GRID for the two-level
    kinds' sub-blocks). Error feedback moves the weights
    after the fit and refits <= 2-bit grids, so the finer search buys nothing here (llama-s, eval.txt 32 windows:
    6.4557 vs 6.4604 at 3.25 bits and 6.8512 vs 6.8648 at 2.5 with the full grid) and costs ~10% of conversion.
    """
    return gptq_linears([w], xtx, [actions], group_size, [method], [protected], damp, hdiag, block, act_order,
                        refit, neuqi_grid)[0]


class _StackedGrid:
    """Chunk c's grids of every linear of a shared-input group, for one column step over their stacked rows: one
    rounding when all of them are one block type (their expanded parameters concatenated over rows), else one per
    linear's rows."""

    def __init__(self, chunks: list[ChunkData], rows: list[tuple[int, int]], dev):
        self.grids = [_ColumnGrid(c, dev) for c in chunks]
        self.rows = rows
        self.one = None
        self._flat = None
        names = {g.bt.name for g in self.grids}
        if len(self.grids) == 1:
            self.one = self.grids[0]
        elif len(names) == 1:
            g0 = self.grids[0]
            one = object.__new__(_ColumnGrid)
            one.bt = g0.bt
            if not g0.bt.is_float:
                one.per_col = g0.per_col
                one.d = torch.cat([g.d for g in self.grids])
                one.m = None if g0.m is None else torch.cat([g.m for g in self.grids])
            self.one = one

    def flat(self, g: int):
        """(D, M [N, g], hi, q0 [N]) float32 of every stacked row, for the C column loop (feedback_kernel.c), or
        None when a row is of a float kind (those columns take the torch path)."""
        if self._flat is None:
            if any(gr.bt.is_float for gr in self.grids):
                self._flat = False
            else:
                parts = []
                for gr, (r0, r1) in zip(self.grids, self.rows):
                    n = r1 - r0
                    d = gr.d.float().expand(n, g)
                    m = torch.zeros(n, g, device=d.device) if gr.m is None else gr.m.float().expand(n, g)
                    parts.append((d, m, torch.full((n,), gr.bt.levels - 1.0), torch.full((n,), float(gr.bt.zero_code))))
                self._flat = tuple(torch.cat([p[k] for p in parts]).contiguous() for k in range(4))
        return self._flat or None

    def round(self, x: torch.Tensor, j: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(codes uint8 [N] or None when no row has codes, dequantized float32 [N]) of stacked column x."""
        if self.one is not None:
            return self.one.round(x, j)
        q = torch.zeros(x.shape[0], dtype=torch.uint8, device=x.device)
        deq = torch.empty_like(x)
        for g, (r0, r1) in zip(self.grids, self.rows):
            qi, deq[r0:r1] = g.round(x[r0:r1], j)
            if qi is not None:
                q[r0:r1] = qi
        return q, deq


def gptq_linears(ws: list[torch.Tensor], xtx: torch.Tensor, actions: list[list[str]], group_size: int,
                 methods=None, protected=None, damp: float = DAMP, hdiag: torch.Tensor | None = None,
                 block: int = 128, act_order: str | None = "chunk", refit: bool = True,
                 neuqi_grid=None) -> list[list[ChunkData]]:
    """gptq_linear for linears that read the same input (q/k/v; gate/up): their weights ws[l] [N_l, K] share XᵀX,
    hence the column order and the Cholesky factor, so one column loop runs over their rows stacked (a GPU's
    column steps are launch-bound: 3 linears cost about what one does). Each row's arithmetic is the one
    gptq_linear does for its linear alone (equal up to float summation order in the block updates); chunk fits,
    protected columns and refits stay per linear. methods[l]: a method or one per chunk (None: "neuqi");
    protected[l]: per chunk, chunk-local column indices (None: none)."""
    from ..quant import neuqi
    from ..quant.fit import fit_chunk
    grid_of = ((lambda bt: neuqi.SUB_GRID if bt.has_subscales else neuqi.FAST_GRID) if neuqi_grid is None
               else (lambda bt: neuqi_grid))

    n_lin = len(ws)
    dev = ws[0].device
    K = ws[0].shape[1]
    if any(w.shape[1] != K for w in ws) or len(actions) != n_lin:
        raise ValueError("gptq_linears: every linear needs K input columns and its own action list")
    rows, r = [], 0
    for w in ws:
        rows.append((r, r + w.shape[0]))
        r += w.shape[0]
    W = torch.cat([w.detach().to(dev).float() for w in ws])
    N = W.shape[0]
    hd = (torch.diag(xtx).to(dev, torch.float64) if hdiag is None else hdiag.to(dev, torch.float64)).float()
    H, dead = damped_hessian(xtx, damp, dev)
    W[:, dead] = 0.0
    bounds = chunk_bounds(K, group_size)
    methods = [None] * n_lin if methods is None else list(methods)
    methods = [["neuqi" if m is None else m] * len(bounds) if m is None or isinstance(m, str) else list(m)
               for m in methods]
    protected = [None] * n_lin if protected is None else list(protected)
    prot = [[sorted(int(i) for i in (p or [])) for p in (pl or [[] for _ in bounds])] for pl in protected]
    chunk_of = torch.empty(K, dtype=torch.long)
    for c, (s, e) in enumerate(bounds):
        chunk_of[s:e] = c
    exact_rows: dict[int, list[int]] = {}       # column -> the linears that keep it exact
    for li in range(n_lin):
        for c, (s, e) in enumerate(bounds):
            for i in prot[li][c]:
                exact_rows.setdefault(s + i, []).append(li)
    perm = feedback_order(torch.diag(H), bounds, act_order)
    U = inverse_cholesky(H, perm.to(dev))
    params: list[list[ChunkData | None]] = [[None] * len(bounds) for _ in range(n_lin)]

    def fit(c):
        s, e = bounds[c]
        for li, (r0, r1) in enumerate(rows):
            params[li][c] = fit_chunk(W[r0:r1, s:e], actions[li][c], methods[li][c], hd[s:e], prot[li][c] or None,
                                      neuqi_grid=grid_of(blocks.block_type(actions[li][c])))

    if act_order == "global":
        for c in range(len(bounds)):
            fit(c)
    # columns as rows (K x N, in feedback order): each step reads, rounds and writes contiguous memory, and the
    # in-block error spread is one fused rank-1 update (addr_) instead of an outer product and a subtraction
    WpT = W[:, perm].T.contiguous()
    QT = torch.zeros_like(WpT)
    codesT = torch.zeros(K, N, dtype=torch.uint8, device=dev)
    perm_l = perm.tolist()
    chunk_l = chunk_of.tolist()
    udiag = torch.diagonal(U).tolist()      # float32 values held exactly as Python floats
    grids: list[_StackedGrid | None] = [None] * len(bounds)
    run_c = _column_loop(dev)
    if run_c is not None:
        Uc = U.contiguous()
        ud_t = torch.diagonal(Uc).contiguous()
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        ErrT = torch.zeros(b1 - b0, N, device=dev)
        i = b0
        while i < b1:
            j = perm_l[i]
            c = chunk_l[j]
            if grids[c] is None:
                if params[0][c] is None:   # "chunk"/None order: fit when the chunk's first column comes up
                    s, e = bounds[c]
                    W[:, perm[i:i + (e - s)]] = WpT[i:i + (e - s)].T
                    fit(c)
                grids[c] = _StackedGrid([params[li][c] for li in range(n_lin)], rows, dev)
            flat = None if run_c is None or j in exact_rows else grids[c].flat(bounds[c][1] - bounds[c][0])
            if flat is not None:           # the run of this chunk's columns up to the block's end or an exact column
                i1 = i + 1
                while i1 < b1 and chunk_l[perm_l[i1]] == c and perm_l[i1] not in exact_rows:
                    i1 += 1
                jl = torch.tensor([perm_l[k] - bounds[c][0] for k in range(i, i1)], dtype=torch.int32)
                qbuf = torch.empty(i1 - i, N, dtype=torch.uint8)
                run_c(WpT.data_ptr(), N, Uc.data_ptr(), K, i, i1, b0, b1, jl.data_ptr(), flat[0].data_ptr(),
                      flat[1].data_ptr(), flat[0].shape[1], flat[2].data_ptr(), flat[3].data_ptr(),
                      ud_t.data_ptr(), QT.data_ptr(), qbuf.data_ptr(), ErrT.data_ptr())
                codesT[perm[i:i1]] = qbuf
                i = i1
                continue
            col = WpT[i]
            qc, deq = grids[c].round(col, j - bounds[c][0])
            if j in exact_rows:                   # exact up to the fp16 residual (codes still on the grid)
                for li in exact_rows[j]:
                    r0, r1 = rows[li]
                    deq[r0:r1] = col[r0:r1].half().float()
            if qc is not None:
                codesT[j] = qc
            QT[i] = deq
            err = (col - deq) / udiag[i]
            if i + 1 < b1:
                WpT[i + 1:b1].addr_(U[i, i + 1:b1], err, alpha=-1.0)
            ErrT[i - b0] = err
            i += 1
        if b1 < K:
            WpT[b1:].addmm_(U[b0:b1, b1:].T, ErrT, alpha=-1.0)
    inv = torch.argsort(perm)
    Wall = QT[inv].T                   # dequantized weights [N, K] (protected columns exact)
    codes_all = codesT.T
    result = []
    for li, (r0, r1) in enumerate(rows):
        Wfinal, codes = Wall[r0:r1], codes_all[r0:r1]
        out: list[ChunkData] = []
        for c, (s, e) in enumerate(bounds):
            ch = params[li][c]
            p = prot[li][c]
            if blocks.block_type(actions[li][c]).is_float:
                ch = ChunkData(blocks.block_type(actions[li][c]).name, e - s,
                               values=Wfinal[:, s:e].half().cpu().numpy())
                if p:
                    ch.protected = np.asarray(p, dtype=np.int64)
                    ch.residuals = np.zeros((r1 - r0, len(p)), dtype=np.float16)
            else:
                ch.codes = codes[:, s:e].contiguous().cpu().numpy()
                if p:
                    deqc = _dequant_codes(ch, dev)
                    pi = torch.as_tensor(p, device=dev)
                    ch.residuals = (Wfinal[:, s:e][:, pi] - deqc[:, pi]).half().cpu().numpy()
            out.append(ch)
        if refit:
            refit_params(ws[li].to(dev), xtx, out, bounds)
        result.append(out)
    return result


REFIT_MAX_BITS = 2   # llama-s, greedy plans: refit of <= 2-bit chunks gave ppl 7.09 vs 7.19 at 2.25 bits and 6.86 vs
#                      6.90 at 2.5; refitting every chunk cost 6.473 vs 6.456 at 3.25 (q3/q4 grids gain nothing)


def refit_params(w: torch.Tensor, xtx: torch.Tensor, chunks: list[ChunkData], bounds, rounds: int = 2,
                 max_bits: float = REFIT_MAX_BITS) -> None:
    """Least-squares d and m per row and chunk, codes fixed, in place: minimise ½ (W − Ŵ) XᵀX (W − Ŵ)ᵀ.

    Error feedback picks codes against weights it keeps changing, and the grid it rounds onto was fitted
    before that; with the codes known, the best scale and offset of each row of each chunk solve a 2x2
    linear system (1x1 for ternary; subscale kinds: the row's d and dmin, sub-block codes fixed too). Chunks
    are swept left to right `rounds` times, each against the current error of all the others; protected columns keep their values (residuals follow the new grid).
    A row's new parameters are kept only if, rounded to fp16, they lower its loss. Only chunks of at most
    `max_bits` bits per code (the table's nominal_bits: ternary 1.5) are refitted.
    """
    dev = w.device
    H = xtx.to(dev, torch.float64)
    W = w.to(torch.float64)
    What = dequantize(chunks).to(dev, torch.float64)
    R = W - What                                             # current error [N, K]
    for _ in range(rounds):
        for c, (s, e) in zip(chunks, bounds):
            bt = blocks.block_type(c.action)
            if bt.is_float or bt.nominal_bits > max_bits:
                continue
            q = torch.as_tensor(c.codes, device=dev).double() - bt.zero_code
            keep = torch.ones(e - s, dtype=torch.float64, device=dev)
            if c.n_protected:
                keep[torch.as_tensor(c.protected, device=dev)] = 0.0
            B = keep                 # w = d * q + m * B per column
            if bt.has_subscales:     # w = d * (s_j q) + dmin * (-n_j): the same 2x2 system in (d, dmin)
                q = q * expand_sub(torch.as_tensor(c.sc, device=dev).double(), e - s)
                B = -expand_sub(torch.as_tensor(c.mn, device=dev).double(), e - s) * keep
            q = q * keep
            Hcc = H[s:e, s:e]
            RH = R @ H[:, s:e]                                   # [N, g]
            qH = q @ Hcc
            a11, b1 = (qH * q).sum(1), (RH * q).sum(1)
            d0 = torch.as_tensor(c.d, device=dev).double()
            m0 = torch.as_tensor(c.m, device=dev).double() if bt.has_offset else None
            if bt.has_subscales:
                a12 = (qH * B).sum(1)
                a22 = ((B @ Hcc) * B).sum(1)
                b2 = (RH * B).sum(1)
            elif bt.has_offset:
                a12 = qH @ keep
                a22 = (keep @ Hcc @ keep).expand_as(a11)
                b2 = RH @ keep
            if bt.has_offset:
                det = a11 * a22 - a12 * a12
                ok = det > 1e-12 * (a11 * a22).clamp_min(1e-300)
                dd = torch.where(ok, (a22 * b1 - a12 * b2) / torch.where(ok, det, 1.0), 0.0)
                dm = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1.0), 0.0)
                d1, m1 = _stored(bt, c, d0 + dd, m0 + dm)
                dd, dm = d1 - d0, m1 - m0
                gain = 2 * (dd * b1 + dm * b2) - (dd * dd * a11 + 2 * dd * dm * a12 + dm * dm * a22)
            else:
                dd = torch.where(a11 > 0, b1 / a11.clamp_min(1e-300), 0.0)
                d1 = _stored(bt, c, (d0 + dd).abs(), None)[0]
                dd = d1 - d0
                dm = torch.zeros_like(dd)
                gain = 2 * dd * b1 - dd * dd * a11
            take = gain > 0                                      # loss decrease of each row
            if not bool(take.any()):
                continue
            dd, dm = torch.where(take, dd, 0.0), torch.where(take, dm, 0.0)
            R[:, s:e] -= dd[:, None] * q + dm[:, None] * B
            c.d = (d0 + dd).cpu().numpy().astype(np.float16)
            if bt.has_offset:
                c.m = (m0 + dm).cpu().numpy().astype(np.float16)
            if c.n_protected:       # protected columns keep their values: residual = old value - new grid
                pi = torch.as_tensor(c.protected, device=dev)
                target = (W - R)[:, s:e][:, pi]
                c.residuals = (target - _dequant_codes(c, dev).double()[:, pi]).half().cpu().numpy()


def _stored(bt, c: ChunkData, d: torch.Tensor, m: torch.Tensor | None):
    """d and m as the file will hold them (float64): fp16, or on a compact chunk's header grid under its base."""
    if not bt.compact:
        return d.half().double(), None if m is None else m.half().double()
    _, dn, mn = blocks.compact_snap(bt, d.float().cpu().numpy(), None if m is None else m.float().cpu().numpy(),
                                    base=c.base)
    as_t = lambda a: torch.from_numpy(a.astype(np.float64)).to(d.device)
    return as_t(dn), None if mn is None else as_t(mn)


def _dequant_codes(c: ChunkData, dev) -> torch.Tensor:
    bt = blocks.block_type(c.action)
    d, m = chunk_grid(bt, c, dev)
    return block_dequantize(bt, torch.as_tensor(c.codes, device=dev), d, m)


def dequantize(chunks: list[ChunkData]) -> torch.Tensor:
    from ..quant.fit import dequantize_chunk
    return torch.cat([dequantize_chunk(c) for c in chunks], 1)
