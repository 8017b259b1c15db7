"""Column-chunk block formats: the one traits table for every action.

A quantized linear W[N, K] is stored row-major: each of the N rows is the
concatenation, chunk by chunk along K, of one *row-block* per chunk. A row-block
is ``header | codes | protected residuals``; its size depends only on the chunk's
action, its width g and its number of protected columns, so every row has the
same byte length and a thread that owns a range of rows streams them without
gathering. The byte layout is specified in docs/format.md (format version 1);
this module is its executable form, numpy only, shared by the converter (pack)
and the runtime readers (unpack). Adding a block type touches this table alone:
every consumer (fitters, error feedback, damage table, ONNX lowering, readers)
dispatches on a BlockType's `kind` and its fields, never on its name.

Every block type is one of four kinds, with one dequantization each (fp32
arithmetic on fp16-stored parameters); `dequantize` below is the one primitive:
  "affine" (q8, q4, q3, q2, q1):  w = d * q + m        (q in 0 .. levels-1; header d, m)
  "subscale" (q4s, q3s, q2s):     w = (d * s_j) * q - dmin * n_j   (header d, dmin; per 32-column
                                                        sub-block j 6-bit s_j, n_j: affine with a finer grid,
                                                        the k-quant shape: one scale per chunk row is too
                                                        coarse for real weights with outliers)
  "ternary":                      w = d * (q - 1)      (q in {0, 1, 2}; header d): affine with m = -d,
                                                        stored without m, rounded symmetrically
  "fp16":                         w = stored half      (no header, no codes)
  protected column p of the chunk:  w += r_p           (fp16 residual)

Compact-header kinds (q4c, q3c, q2c, ternaryc, q1c; `BlockType.base` names the kind whose grid they share):
the same codes and dequantization, but each row-block's d (and m) are one byte each instead of an fp16 each,
under one fp16 scale base per chunk (stored beside the linear, see `compact_decode`). A row header costs 16 bits
instead of 32 (0.125 bit per weight at G = 128, a twentieth of a 2.5-bit budget), which the allocator spends on
wider codes; the d and m a chunk may take are then a subset of the fp16 values (`compact_snap`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

FORMAT_VERSION = 1
COMPACT_FORMAT_VERSION = 4   # a file with compact-header kinds (with or without format 2/3's transforms)
SCALE_BASE = ".scale_base"   # the tensor beside a linear holding its compact chunks' fp16 scale bases
SUBBLOCK = 32  # every chunk's codes are padded to a multiple of 32 columns


def padded(g: int) -> int:
    """Columns a chunk of width g occupies in codes (zero padding past g)."""
    return -(-g // SUBBLOCK) * SUBBLOCK


# ---------------------------------------------------------------- packers
# Each packer maps codes uint8[N, g_pad] -> bytes uint8[N, code_bytes]; g_pad % 32 == 0.

def _pack_q8(q):
    return q.astype(np.uint8, copy=True)


def _unpack_q8(b, g_pad):
    return b[:, :g_pad].astype(np.uint8, copy=True)


def _pack_q4(q):
    # Per 32 columns, 16 bytes: low nibble = column j, high nibble = column j + 16 (as ggml Q4_0).
    n = q.shape[0]
    v = q.reshape(n, -1, 2, 16)
    return (v[:, :, 0, :] | (v[:, :, 1, :] << 4)).reshape(n, -1).astype(np.uint8)


def _unpack_q4(b, g_pad):
    n = b.shape[0]
    v = b.reshape(n, -1, 16)
    return np.stack([v & 0x0F, v >> 4], axis=2).reshape(n, g_pad)


def _pack_2bit(q):
    # Per 32 columns, 8 bytes: bits 2k..2k+1 of byte j = column 8k + j.
    n = q.shape[0]
    v = q.reshape(n, -1, 4, 8).astype(np.uint8)
    out = v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)
    return out.reshape(n, -1)


def _unpack_2bit(b, g_pad):
    n = b.shape[0]
    v = b.reshape(n, -1, 1, 8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((v >> shifts) & 0x03).reshape(n, g_pad)


def _pack_1bit(q):
    # Per 32 columns, 4 bytes = one little-endian uint32: bit j = column j.
    n = q.shape[0]
    return np.packbits(q.reshape(n, -1, 32).astype(np.uint8), axis=2, bitorder="little").reshape(n, -1)


def _unpack_1bit(b, g_pad):
    n = b.shape[0]
    return np.unpackbits(b.reshape(n, -1, 4), axis=2, bitorder="little").reshape(n, g_pad)


def _pack_q3(q):
    # Per 32 columns, 12 bytes: 8 bytes of the low 2 bits (as _pack_2bit), then 4 bytes of bit 2 (as _pack_1bit).
    n = q.shape[0]
    lo = _pack_2bit(q & 0x03).reshape(n, -1, 8)
    hi = _pack_1bit(q >> 2).reshape(n, -1, 4)
    return np.concatenate([lo, hi], axis=2).reshape(n, -1)


def _unpack_q3(b, g_pad):
    n = b.shape[0]
    v = b.reshape(n, -1, 12)
    lo = _unpack_2bit(np.ascontiguousarray(v[:, :, :8]).reshape(n, -1), g_pad)
    hi = _unpack_1bit(np.ascontiguousarray(v[:, :, 8:]).reshape(n, -1), g_pad)
    return lo | (hi << 2)


def ternary_bytes(g_pad: int) -> int:
    """Bytes of ternary codes: 5 trits a byte, rounded up to an even count."""
    return 2 * -(-g_pad // 10)


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _pack_ternary(t):
    # B bytes; trit i (most significant first) of byte j = column i*B + j; padding trits are 1 (= zero weight).
    # Byte value = ceil(n * 256 / 243) with n = sum_i t_i 3^(4-i), so trit i = ((byte * 3^i) mod 256) * 3 >> 8.
    n_rows, g_pad = t.shape
    nb = ternary_bytes(g_pad)
    full = np.ones((n_rows, 5 * nb), dtype=np.int32)
    full[:, :g_pad] = t
    digits = full.reshape(n_rows, 5, nb)
    n = np.tensordot(digits, _POW3, axes=([1], [0]))  # (n_rows, nb)
    return ((n * 256 + 242) // 243).astype(np.uint8)


def _unpack_ternary(b, g_pad):
    n_rows, nb = b.shape
    q = b.astype(np.uint32)
    planes = [(((q * int(p3)) & 0xFF) * 3) >> 8 for p3 in (1, 3, 9, 27, 81)]
    return np.stack(planes, axis=1).reshape(n_rows, 5 * nb)[:, :g_pad].astype(np.uint8)


# ---------------------------------------------------------------- the traits table

KINDS = ("fp16", "affine", "ternary", "subscale")
_HEADER_PARAMS = {"fp16": 0, "affine": 2, "ternary": 1, "subscale": 2}   # fp16 parameters a row-block starts with
_ZERO_CODE = {"fp16": 0, "affine": 0, "ternary": 1, "subscale": 0}       # the code of weight zero w.r.t. the offset


# ---------------------------------------------------------------- sub-scales (kind "subscale")
# Per 32-column sub-block j of a row: s_j (scale code) and n_j (min code), SUB_BITS bits each, stored before the
# codes as n_sub bytes of low nibbles (s_j & 15 | (n_j & 15) << 4) then ceil(n_sub / 2) bytes of high bits
# (sub-block j's nibble, low for even j: s_j >> 4 | (n_j >> 4) << 2).
SUB_BITS = 6
SUB_LEVELS = 1 << SUB_BITS


def n_sub(g_pad: int) -> int:
    return g_pad // SUBBLOCK


def subscale_bytes(g_pad: int) -> int:
    """Bytes of the sub-scale and sub-min codes of one row-block (12 bits per 32 columns, rounded up)."""
    n = n_sub(g_pad)
    return n + (n + 1) // 2


def pack_subscales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """sc, mn uint8[N, n_sub] (0..63) -> uint8[N, subscale_bytes]."""
    sc = np.asarray(sc, dtype=np.uint8)
    mn = np.asarray(mn, dtype=np.uint8)
    if int(max(sc.max(initial=0), mn.max(initial=0))) >= SUB_LEVELS:
        raise ValueError(f"sub-scale codes out of range (max >= {SUB_LEVELS})")
    n, k = sc.shape
    lo = (sc & 0x0F) | ((mn & 0x0F) << 4)
    hi = np.zeros((n, 2 * ((k + 1) // 2)), dtype=np.uint8)
    hi[:, :k] = (sc >> 4) | ((mn >> 4) << 2)
    return np.concatenate([lo, hi[:, 0::2] | (hi[:, 1::2] << 4)], axis=1)


def unpack_subscales(b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, subscale_bytes] -> (sc, mn) uint8[N, k]."""
    lo = b[:, :k]
    hb = b[:, k:]
    hi = np.stack([hb & 0x0F, hb >> 4], axis=2).reshape(b.shape[0], -1)[:, :k]
    return ((lo & 0x0F) | ((hi & 0x03) << 4)).astype(np.uint8), ((lo >> 4) | ((hi >> 2) << 4)).astype(np.uint8)


def subscale_grid(d, dmin, sc, mn, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (D, M) float32 [N, g] of a subscale chunk: D = d * s_j, M = -(dmin * n_j) of column's sub-block j.
    Both products are exact in fp32 (11-bit mantissa times a 6-bit integer), so w = D * q + M rounds once."""
    d = np.asarray(d, dtype=np.float32).reshape(-1, 1)
    dmin = np.asarray(dmin, dtype=np.float32).reshape(-1, 1)
    D = d * np.asarray(sc, dtype=np.float32)
    M = -(dmin * np.asarray(mn, dtype=np.float32))
    return np.repeat(D, SUBBLOCK, axis=1)[:, :g], np.repeat(M, SUBBLOCK, axis=1)[:, :g]


@dataclass(frozen=True)
class BlockType:
    """Traits of one action's row-block: what the allocator prices, the fitters fit and the kernels read."""
    name: str            # action name used in plans
    code: int            # id stored in the file (wqedge.tensors.<t>.chunk_actions)
    nominal_bits: float  # the action's nominal width (bits per code), as plans, reports and price rules use it
    levels: int          # number of code values (0 for fp16)
    kind: str            # one of KINDS: how a row-block is laid out and dequantized
    code_bytes: Callable[[int], int]         # g_pad -> bytes of codes per row
    pack: Callable[[np.ndarray], np.ndarray] | None
    unpack: Callable[[np.ndarray, int], np.ndarray] | None
    offered: bool = True  # among the actions the allocators choose from by default (else only by name: --preset, plans)
    base: str | None = None  # compact-header kinds: the fp16-header kind with the same codes and grid

    @property
    def is_float(self) -> bool:
        """Stores the weights themselves (fp16): no codes, no parameters."""
        return self.kind == "fp16"

    @property
    def is_affine(self) -> bool:
        """w = d * q + m with a stored offset m (one per chunk row)."""
        return self.kind == "affine"

    @property
    def has_subscales(self) -> bool:
        """Per 32-column sub-block scale and min codes under the row's d and dmin (kind "subscale")."""
        return self.kind == "subscale"

    @property
    def has_offset(self) -> bool:
        """The header stores an offset m beside the scale d."""
        return _HEADER_PARAMS[self.kind] == 2

    @property
    def zero_code(self) -> int:
        """The code subtracted before scaling (w = d * (q - zero_code) + m): 1 for ternary, 0 otherwise;
        also the padding code (weight zero for ternary)."""
        return _ZERO_CODE[self.kind]

    @property
    def compact(self) -> bool:
        """Row headers of one byte per parameter under a per-chunk fp16 scale base (compact_decode)."""
        return self.base is not None

    @property
    def header_bytes(self) -> int:
        """Parameters at the start of each row-block: fp16 each, or one byte each for compact kinds."""
        return (1 if self.compact else 2) * _HEADER_PARAMS[self.kind]

    @property
    def bits(self) -> int:
        """Bits of an affine or subscale code (log2 of levels); 0 for other kinds."""
        return int(self.levels).bit_length() - 1 if self.kind in ("affine", "subscale") else 0

    def sub_bytes(self, g_pad: int) -> int:
        """Bytes of sub-scale codes between header and codes (0 unless has_subscales)."""
        return subscale_bytes(g_pad) if self.has_subscales else 0

    def affine_offset(self, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
        """m' of the same weights in the plain affine form w = d * q + m' (ternary: m' = -d)."""
        if not self.zero_code:
            return m
        shift = float(self.zero_code) * np.asarray(d, dtype=np.float32)
        return -shift if m is None else m - shift

    def dequantize(self, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None,
                   sc: np.ndarray | None = None, mn: np.ndarray | None = None) -> np.ndarray:
        """float32 [N, g] from codes [N, g] and per-row d (and m for affine kinds; m = dmin and the sub-block
        codes sc, mn [N, n_sub] for subscale kinds): this kind's arithmetic."""
        if self.has_subscales:
            return dequantize(codes, *subscale_grid(d, m, sc, mn, codes.shape[1]))
        return dequantize(codes, d, m if self.has_offset else None, self.zero_code)

    def row_bytes(self, g: int, n_protected: int = 0) -> int:
        """Bytes of one row-block for a chunk of width g with n_protected fp16 residuals."""
        gp = padded(g)
        return self.header_bytes + self.sub_bytes(gp) + self.code_bytes(gp) + 2 * n_protected


BLOCK_TYPES: tuple[BlockType, ...] = (
    BlockType("fp16", 0, 16.0, 0, "fp16", lambda gp: 2 * gp, None, None),
    BlockType("q8", 1, 8.0, 256, "affine", lambda gp: gp, _pack_q8, _unpack_q8),
    BlockType("q4", 2, 4.0, 16, "affine", lambda gp: gp // 2, _pack_q4, _unpack_q4, offered=False),
    BlockType("q3", 3, 3.0, 8, "affine", lambda gp: 3 * gp // 8, _pack_q3, _unpack_q3, offered=False),
    BlockType("q2", 4, 2.0, 4, "affine", lambda gp: gp // 4, _pack_2bit, _unpack_2bit, offered=False),
    BlockType("ternary", 5, 1.5, 3, "ternary", ternary_bytes, _pack_ternary, _unpack_ternary, offered=False),
    BlockType("q1", 6, 1.0, 2, "affine", lambda gp: gp // 8, _pack_1bit, _unpack_1bit, offered=False),
    BlockType("q4s", 7, 4.0, 16, "subscale", lambda gp: gp // 2, _pack_q4, _unpack_q4, offered=False),
    BlockType("q3s", 8, 3.0, 8, "subscale", lambda gp: 3 * gp // 8, _pack_q3, _unpack_q3, offered=False),
    BlockType("q2s", 9, 2.0, 4, "subscale", lambda gp: gp // 4, _pack_2bit, _unpack_2bit, offered=False),
    BlockType("q4c", 10, 4.0, 16, "affine", lambda gp: gp // 2, _pack_q4, _unpack_q4, base="q4"),
    BlockType("q3c", 11, 3.0, 8, "affine", lambda gp: 3 * gp // 8, _pack_q3, _unpack_q3, base="q3"),
    BlockType("q2c", 12, 2.0, 4, "affine", lambda gp: gp // 4, _pack_2bit, _unpack_2bit, base="q2"),
    BlockType("ternaryc", 13, 1.5, 3, "ternary", ternary_bytes, _pack_ternary, _unpack_ternary, base="ternary"),
    BlockType("q1c", 14, 1.0, 2, "affine", lambda gp: gp // 8, _pack_1bit, _unpack_1bit, base="q1"),
)
BY_NAME = {b.name: b for b in BLOCK_TYPES}
BY_CODE = {b.code: b for b in BLOCK_TYPES}
ACTION_NAMES = tuple(b.name for b in BLOCK_TYPES)
# What the allocators (uniform, greedy, rl) choose from unless told otherwise: fp16, q8 and the compact-header kinds
# (the same grids as q4 .. q1 for 16 bits a row header less; bench/results/compact_headers.md). The fp16-header
# q4 .. q1 and the subscale kinds are chosen by name (presets, plans, --two-level; bench/results/subscale.md).
ALLOCATOR_ACTIONS = tuple(b.name for b in BLOCK_TYPES if b.offered)
# The uniform allocator (one action everywhere, by chunk width) also takes the fp16-header twins: at a budget of
# 4.25 bits q4 fits where q4c would leave 0.125 bit unspent, and it has no damage table to price them twice.
UNIFORM_ACTIONS = ALLOCATOR_ACTIONS + tuple(b.base for b in BLOCK_TYPES if b.offered and b.compact)
FLOAT_ACTION = next(b.name for b in BLOCK_TYPES if b.is_float)   # keep the weights (the top of every budget)


def block_type(action: str | int) -> BlockType:
    table = BY_CODE if isinstance(action, (int, np.integer)) else BY_NAME
    try:
        return table[action]
    except KeyError:
        raise ValueError(f"unknown block type {action!r}; known: {', '.join(ACTION_NAMES)}") from None


def chunk_bits(action: str | int, rows: int, g: int, n_protected: int = 0) -> int:
    """Exact stored bits of one chunk: its row-blocks plus its protected-column indices (uint16 each), plus
    a compact kind's fp16 scale base."""
    bt = block_type(action)
    return 8 * rows * bt.row_bytes(g, n_protected) + 16 * n_protected + (16 if bt.compact else 0)


def effective_bits(action: str | int, g: int, n_protected: int = 0, rows: int = 4096) -> float:
    """Stored bits per weight of a chunk (what the allocator prices)."""
    return chunk_bits(action, rows, g, n_protected) / (rows * g)


# ---------------------------------------------------------------- compact row headers (q4c, q3c, q2c, ternaryc, q1c)
# Row r's header is e_r (and z_r for kinds with an offset), one byte each, under the chunk's fp16 scale base D:
#   d_r = fp16(D * 2^(-e_r / 32))   (e_r = 255: d_r = 0)     m_r = fp16(-(d_r * (z_r * (L - 1))) / 255)
# in float32 arithmetic: 2^(-e/32) = COMPACT_FRAC[e % 32] * 2^(-(e // 32)), the product with D rounded once, the
# power of two exact; d_r * (z_r (L - 1)) is exact (11 + 12 bits), the division rounds once. So every reader
# (numpy here, the C++ loader) gets the same fp16 d and m, and from there a compact chunk is its base kind.
COMPACT_STEPS = 32     # scale codes per octave: d within 1.1% of any value in 8 octaves below the base
#                       (16 steps, 16 octaves: +0.3% perplexity at 3.25 b, the q4 grid's range edges amplifying d's error)
COMPACT_ZERO = 255     # e code of d = 0 (constant rows)
COMPACT_FRAC = np.array([float.fromhex(h) for h in (
    "0x1p+0", "0x1.f50766p-1", "0x1.ea4afap-1", "0x1.dfc974p-1", "0x1.d5818ep-1", "0x1.cb720ep-1", "0x1.c199bep-1",
    "0x1.b7f77p-1", "0x1.ae89fap-1", "0x1.a5503cp-1", "0x1.9c4918p-1", "0x1.93737cp-1", "0x1.8ace54p-1",
    "0x1.82589ap-1", "0x1.7a1148p-1", "0x1.71f75ep-1", "0x1.6a09e6p-1", "0x1.6247ecp-1", "0x1.5ab07ep-1",
    "0x1.5342b6p-1", "0x1.4bfdaep-1", "0x1.44e086p-1", "0x1.3dea64p-1", "0x1.371a74p-1", "0x1.306fep-1",
    "0x1.29e9ep-1", "0x1.2387a6p-1", "0x1.1d4874p-1", "0x1.172b84p-1", "0x1.11301ep-1", "0x1.0b5586p-1",
    "0x1.059b0ep-1")], dtype=np.float32)   # float32(2^(-i/32))


def compact_decode(bt: "BlockType", e, z, base) -> tuple[np.ndarray, np.ndarray | None]:
    """(d, m) float16 [N] of compact row headers: e, z uint8 [N] (z None for ternary), base the chunk's scale base."""
    e = np.asarray(e, dtype=np.int64)
    D = np.float32(np.float16(base))
    d = np.ldexp(D * COMPACT_FRAC[e % COMPACT_STEPS], -(e // COMPACT_STEPS)).astype(np.float32)
    d16 = np.where(e == COMPACT_ZERO, np.float32(0), d).astype(np.float16)
    if z is None or not bt.has_offset:
        return d16, None
    t = d16.astype(np.float32) * (np.asarray(z, dtype=np.float32) * np.float32(bt.levels - 1))
    return d16, (-(t / np.float32(255))).astype(np.float32).astype(np.float16)


def compact_encode(bt: "BlockType", d, m, base) -> tuple[np.ndarray, np.ndarray | None]:
    """The header codes (e, z) of parameters that lie on the compact grid of `base`; ValueError otherwise (fit
    through compact_snap: a value off the grid would be silently changed by the round trip)."""
    if base is None:
        raise ValueError(f"a {bt.name} chunk needs its scale base (ChunkData.base); fit it with compact_snap")
    d = np.asarray(d, dtype=np.float32)
    m = None if m is None or not bt.has_offset else np.asarray(m, dtype=np.float32)
    e, z = _compact_codes(bt, d, m, base)
    d16, m16 = compact_decode(bt, e, z, base)
    if not np.array_equal(d16.astype(np.float32), d) or (m is not None and not np.array_equal(m16.astype(np.float32), m)):
        raise ValueError(f"{bt.name}: d/m are not on the compact grid of scale base {float(base)!r} "
                         "(blocks.compact_snap puts them there)")
    return e, z


def _nearest_code(guess, top: int, decode, target):
    """Per row, of the codes guess - 1, guess, guess + 1 (clipped to 0..top), the one whose decoded value (decode:
    codes -> float32 values) lies nearest to target: the rounded guess was taken in another domain (log2 for e),
    and fp16 rounding can move a value past the half-way point."""
    best, err = guess, np.full(target.shape, np.inf)
    for cand in (guess - 1, guess, guess + 1):
        cand = np.clip(cand, 0, top)
        de = np.abs(decode(cand) - target)
        take = de < err
        best, err = np.where(take, cand, best), np.where(take, de, err)
    return best


def _compact_codes(bt, d, m, base):
    """Nearest codes (e, z) of d, m [N] float32 under `base` (d, m anywhere; d clamped to [0, base])."""
    D = float(np.float16(base))
    with np.errstate(divide="ignore", invalid="ignore"):
        ef = np.where((d > 0) & (D > 0), -COMPACT_STEPS * np.log2(np.maximum(d, 1e-38) / max(D, 1e-38)), COMPACT_ZERO)
    e0 = np.clip(np.round(ef), 0, COMPACT_ZERO - 1).astype(np.int64)
    best = _nearest_code(e0, COMPACT_ZERO - 1, lambda c: compact_decode(bt, c, None, base)[0].astype(np.float32), d)
    e = np.where((d <= 0) | (D <= 0), COMPACT_ZERO, best).astype(np.uint8)
    if m is None:
        return e, None
    d16 = compact_decode(bt, e, None, base)[0].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zf = np.where(d16 > 0, -m / (d16 * float(bt.levels - 1)) * 255, 0)
    z0 = np.clip(np.round(zf), 0, 255).astype(np.int64)
    z = _nearest_code(z0, 255, lambda c: compact_decode(bt, e, c, base)[1].astype(np.float32), m)
    return e, z.astype(np.uint8)


def compact_snap(bt: "BlockType", d, m=None, base: float | None = None):
    """(base, d', m'): d and m [N] moved to the nearest values a compact header holds (float16 arrays; m' None
    for ternary). base None: the largest d, as fp16 (the chunk's own scale base). A constant row (d = 0, m = c)
    becomes the grid that holds c exactly where it can: d = |c| / (L - 1), m = min(c, 0)."""
    d = np.asarray(d, dtype=np.float32).copy()
    m = None if m is None or not bt.has_offset else np.asarray(m, dtype=np.float32).copy()
    if m is not None:
        const = (d <= 0) & (m != 0)
        d[const] = np.abs(m[const]) / np.float32(bt.levels - 1)
        m[const] = np.minimum(m[const], 0)
    if base is None:
        base = float(np.float16(d.max(initial=0.0)))
        if not np.isfinite(base):
            raise ValueError(f"{bt.name}: scale base overflows fp16 (weight range too large for the format)")
    e, z = _compact_codes(bt, d, m, base)
    d16, m16 = compact_decode(bt, e, z, base)
    return float(np.float16(base)), d16, m16


def expanded(c: ChunkData) -> ChunkData:
    """A compact chunk as its base kind (the same codes, d and m, fp16 headers): what readers that know only the
    fp16-header kinds (the ONNX lowerings, the native custom op) take. Other chunks pass unchanged."""
    bt = block_type(c.action)
    return replace(c, action=bt.base, base=None) if bt.compact else c


# ---------------------------------------------------------------- whole row-blocks

@dataclass
class ChunkData:
    """One quantized chunk of a linear, in file terms (numpy, no torch).

    codes: uint8[N, g] (affine: 0..levels-1; ternary: 0..2), or None for fp16.
    d, m: float16[N] (affine); d alone is the ternary scale a; for fp16 `values` holds the weights.
    subscale kinds: d and m = dmin per row, sc and mn uint8[N, n_sub] the sub-block scale and min codes.
    compact kinds: d and m as for their base kind, on the grid of the scale base `base` (compact_snap).
    protected: int[n_p] chunk-local column indices; residuals float16[N, n_p].
    start: the chunk's first column in its linear (set by readers; writers go by position).
    """
    action: str
    g: int
    codes: np.ndarray | None = None
    d: np.ndarray | None = None
    m: np.ndarray | None = None
    values: np.ndarray | None = None
    protected: np.ndarray | None = None
    residuals: np.ndarray | None = None
    start: int = 0
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None
    base: float | None = None   # compact kinds: the chunk's scale base (an fp16 value); d, m lie on its grid

    @property
    def end(self) -> int:
        return self.start + self.g

    @property
    def n_protected(self) -> int:
        return 0 if self.protected is None else int(len(self.protected))


def dequantize(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None, zero_code: int = 0) -> np.ndarray:
    """The one dequantization: float32 w = d * (q - zero_code) + m per row (m None: no offset;
    d and m may also be per column, [N, g]), in the file's arithmetic (fp32 on the stored fp16 parameters). wqedge.quant.affine.dequantize is its torch twin."""
    q = np.asarray(codes).astype(np.float32)
    if zero_code:
        q = q - float(zero_code)
    w = _param(d) * q
    if m is not None:
        w = w + _param(m)
    return w


def _param(p) -> np.ndarray:
    """A per-row parameter [N] as a column [N, 1]; per-column parameters [N, g] pass unchanged."""
    p = np.asarray(p, dtype=np.float32)
    return p if p.ndim == 2 else p.reshape(-1, 1)


def dequantize_chunk(c: ChunkData) -> np.ndarray:
    """float32 [N, g] reconstruction of a chunk (protected residuals added), exactly what
    unpack_chunk(pack_chunk(c)) reads back."""
    bt = block_type(c.action)
    if bt.is_float:
        w = np.array(c.values, dtype=np.float32, copy=True)
    else:
        w = bt.dequantize(c.codes, c.d, c.m, c.sc, c.mn)
    if c.n_protected:
        w[:, np.asarray(c.protected, dtype=np.int64)] += np.asarray(c.residuals).astype(np.float32)
    return w


def pack_chunk(c: ChunkData) -> np.ndarray:
    """Serialise a chunk into its row-blocks: uint8[N, row_bytes]."""
    bt = block_type(c.action)
    gp = padded(c.g)
    parts = []
    if bt.is_float:
        v = np.zeros((c.values.shape[0], gp), dtype=np.float16)
        v[:, : c.g] = c.values
        parts.append(v.view(np.uint8))
    else:
        n = c.codes.shape[0]
        if bt.compact:
            e, z = compact_encode(bt, c.d, c.m, c.base)
            parts.append(e.reshape(n, 1) if z is None else np.stack([e, z], axis=1))
        elif bt.has_offset:
            parts.append(np.stack([c.d, c.m], axis=1).astype(np.float16).view(np.uint8))
        else:
            parts.append(c.d.astype(np.float16).reshape(n, 1).view(np.uint8))
        if bt.has_subscales:
            if c.sc is None or c.mn is None or c.sc.shape != (n, n_sub(gp)) or c.mn.shape != (n, n_sub(gp)):
                raise ValueError(f"{bt.name} chunk of width {c.g} needs sc and mn of shape {(n, n_sub(gp))}")
            parts.append(pack_subscales(c.sc, c.mn))
        q = np.full((n, gp), bt.zero_code, dtype=np.uint8)
        q[:, : c.g] = c.codes
        if int(q.max(initial=0)) >= bt.levels:
            raise ValueError(f"{bt.name} codes out of range (max {int(q.max())} >= {bt.levels})")
        parts.append(bt.pack(q))
    if c.n_protected:
        parts.append(np.ascontiguousarray(c.residuals, dtype=np.float16).view(np.uint8))
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == bt.row_bytes(c.g, c.n_protected)
    return out


def decode_chunk(b: np.ndarray, action: str | int, g: int, protected: np.ndarray | None = None,
                 base: float | None = None) -> ChunkData:
    """Row-blocks uint8[N, row_bytes] of one chunk -> its ChunkData (codes, d, m as float32; fp16 values;
    residuals), the inverse of pack_chunk. base: a compact kind's scale base (required for those kinds)."""
    bt = block_type(action)
    if bt.compact and base is None:
        raise ValueError(f"a {bt.name} chunk needs its scale base to be decoded")
    gp = padded(g)
    n_p = 0 if protected is None else len(protected)
    if b.shape[1] != bt.row_bytes(g, n_p):
        raise ValueError(f"{bt.name} chunk of width {g}: expected {bt.row_bytes(g, n_p)} bytes a row, got {b.shape[1]}")
    h = bt.header_bytes
    sb = bt.sub_bytes(gp)
    cb = sb + bt.code_bytes(gp)
    c = ChunkData(bt.name, g)
    if bt.is_float:
        c.values = np.ascontiguousarray(b[:, :cb]).view(np.float16)[:, :g]
    else:
        c.codes = bt.unpack(np.ascontiguousarray(b[:, h + sb : h + cb]), gp)[:, :g]
        if sb:
            c.sc, c.mn = unpack_subscales(np.ascontiguousarray(b[:, h : h + sb]), n_sub(gp))
        if bt.compact:
            d16, m16 = compact_decode(bt, b[:, 0], b[:, 1] if bt.has_offset else None, base)
            c.base = float(np.float16(base))
            c.d = d16.astype(np.float32)
            c.m = None if m16 is None else m16.astype(np.float32)
        else:
            params = np.ascontiguousarray(b[:, :h]).view(np.float16).astype(np.float32)
            c.d = params[:, 0]
            c.m = params[:, 1] if bt.has_offset else None
    if n_p:
        c.protected = np.asarray(protected, dtype=np.int64)
        c.residuals = np.ascontiguousarray(b[:, h + cb :]).view(np.float16)
    return c


def unpack_chunk(b: np.ndarray, action: str | int, g: int, protected: np.ndarray | None = None,
                 base: float | None = None) -> np.ndarray:
    """Dequantize row-blocks uint8[N, row_bytes] of one chunk to float32[N, g] (the reference semantics); base: a
    compact kind's scale base."""
    return dequantize_chunk(decode_chunk(b, action, g, protected, base)).reshape(b.shape[0], g)
