"""Column-chunk block formats: the one traits table for every action.

A quantized linear W[N, K] is stored row-major: each of the N rows is the
concatenation, chunk by chunk along K, of one *row-block* per chunk. A row-block
is ``header | codes | protected residuals``; its size depends only on the chunk's
action, its width g and its number of protected columns, so every row has the
same byte length and a thread that owns a range of rows streams them without
gathering. The byte layout is specified in docs/format.md (format version 1);
this module is its executable form, numpy only, shared by the converter (pack)
and the runtime readers (unpack). Adding a block type touches this table alone.

Dequantization of one element (fp32 arithmetic on fp16-stored parameters):
  affine kinds (q8, q4, q3, q2, q1):  w = d * q + m        (q in 0 .. 2^bits-1)
  ternary:                            w = a * (t - 1)      (t in {0, 1, 2})
  fp16:                               w = stored half
  protected column p of the chunk:    w += r_p             (fp16 residual)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FORMAT_VERSION = 1
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

@dataclass(frozen=True)
class BlockType:
    """Traits of one action's row-block: what the allocator prices and the kernels read."""
    name: str            # action name used in plans
    code: int            # id stored in the file (wqedge.tensors.<t>.chunk_actions)
    nominal_bits: float  # the action's nominal width, as plans and reports name it
    levels: int          # number of code values (0 for fp16)
    header_bytes: int    # fp16 parameters at the start of each row-block
    code_bytes: Callable[[int], int]         # g_pad -> bytes of codes per row
    pack: Callable[[np.ndarray], np.ndarray] | None
    unpack: Callable[[np.ndarray, int], np.ndarray] | None

    @property
    def is_affine(self) -> bool:
        return self.header_bytes == 4

    @property
    def bits(self) -> int:
        """Bits of an affine code (log2 of levels); 0 for other kinds."""
        return int(self.levels).bit_length() - 1 if self.is_affine else 0

    def row_bytes(self, g: int, n_protected: int = 0) -> int:
        """Bytes of one row-block for a chunk of width g with n_protected fp16 residuals."""
        return self.header_bytes + self.code_bytes(padded(g)) + 2 * n_protected


BLOCK_TYPES: tuple[BlockType, ...] = (
    BlockType("fp16", 0, 16.0, 0, 0, lambda gp: 2 * gp, None, None),
    BlockType("q8", 1, 8.0, 256, 4, lambda gp: gp, _pack_q8, _unpack_q8),
    BlockType("q4", 2, 4.0, 16, 4, lambda gp: gp // 2, _pack_q4, _unpack_q4),
    BlockType("q3", 3, 3.0, 8, 4, lambda gp: 3 * gp // 8, _pack_q3, _unpack_q3),
    BlockType("q2", 4, 2.0, 4, 4, lambda gp: gp // 4, _pack_2bit, _unpack_2bit),
    BlockType("ternary", 5, 1.5, 3, 2, ternary_bytes, _pack_ternary, _unpack_ternary),
    BlockType("q1", 6, 1.0, 2, 4, lambda gp: gp // 8, _pack_1bit, _unpack_1bit),
)
BY_NAME = {b.name: b for b in BLOCK_TYPES}
BY_CODE = {b.code: b for b in BLOCK_TYPES}
ACTION_NAMES = tuple(b.name for b in BLOCK_TYPES)


def block_type(action: str | int) -> BlockType:
    table = BY_CODE if isinstance(action, (int, np.integer)) else BY_NAME
    try:
        return table[action]
    except KeyError:
        raise ValueError(f"unknown block type {action!r}; known: {', '.join(ACTION_NAMES)}") from None


def chunk_bits(action: str | int, rows: int, g: int, n_protected: int = 0) -> int:
    """Exact stored bits of one chunk: its row-blocks plus its protected-column indices (uint16 each)."""
    return 8 * rows * block_type(action).row_bytes(g, n_protected) + 16 * n_protected


def effective_bits(action: str | int, g: int, n_protected: int = 0, rows: int = 4096) -> float:
    """Stored bits per weight of a chunk (what the allocator prices)."""
    return chunk_bits(action, rows, g, n_protected) / (rows * g)


# ---------------------------------------------------------------- whole row-blocks

@dataclass
class ChunkData:
    """One quantized chunk of a linear, in file terms (numpy, no torch).

    codes: uint8[N, g] (affine: 0..levels-1; ternary: 0..2), or None for fp16.
    d, m: float16[N] (affine); d alone is the ternary scale a; for fp16 `values` holds the weights.
    protected: int[n_p] chunk-local column indices; residuals float16[N, n_p].
    """
    action: str
    g: int
    codes: np.ndarray | None = None
    d: np.ndarray | None = None
    m: np.ndarray | None = None
    values: np.ndarray | None = None
    protected: np.ndarray | None = None
    residuals: np.ndarray | None = None

    @property
    def n_protected(self) -> int:
        return 0 if self.protected is None else int(len(self.protected))


def pack_chunk(c: ChunkData) -> np.ndarray:
    """Serialise a chunk into its row-blocks: uint8[N, row_bytes]."""
    bt = block_type(c.action)
    gp = padded(c.g)
    parts = []
    if bt.name == "fp16":
        v = np.zeros((c.values.shape[0], gp), dtype=np.float16)
        v[:, : c.g] = c.values
        parts.append(v.view(np.uint8))
    else:
        n = c.codes.shape[0]
        if bt.is_affine:
            parts.append(np.stack([c.d, c.m], axis=1).astype(np.float16).view(np.uint8))
        else:
            parts.append(c.d.astype(np.float16).reshape(n, 1).view(np.uint8))
        fill = 1 if bt.name == "ternary" else 0
        q = np.full((n, gp), fill, dtype=np.uint8)
        q[:, : c.g] = c.codes
        if int(q.max(initial=0)) >= bt.levels:
            raise ValueError(f"{bt.name} codes out of range (max {int(q.max())} >= {bt.levels})")
        parts.append(bt.pack(q))
    if c.n_protected:
        parts.append(np.ascontiguousarray(c.residuals, dtype=np.float16).view(np.uint8))
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == bt.row_bytes(c.g, c.n_protected)
    return out


def unpack_chunk(b: np.ndarray, action: str | int, g: int, protected: np.ndarray | None = None) -> np.ndarray:
    """Dequantize row-blocks uint8[N, row_bytes] of one chunk to float32[N, g] (the reference semantics)."""
    bt = block_type(action)
    gp = padded(g)
    n_p = 0 if protected is None else len(protected)
    if b.shape[1] != bt.row_bytes(g, n_p):
        raise ValueError(f"{bt.name} chunk of width {g}: expected {bt.row_bytes(g, n_p)} bytes a row, got {b.shape[1]}")
    n = b.shape[0]
    h = bt.header_bytes
    cb = bt.code_bytes(gp)
    if bt.name == "fp16":
        w = np.ascontiguousarray(b[:, :cb]).view(np.float16).astype(np.float32)[:, :g]
    else:
        params = np.ascontiguousarray(b[:, :h]).view(np.float16).astype(np.float32)
        q = bt.unpack(np.ascontiguousarray(b[:, h : h + cb]), gp)[:, :g].astype(np.float32)
        if bt.is_affine:
            w = params[:, 0:1] * q + params[:, 1:2]
        else:
            w = params[:, 0:1] * (q - 1.0)
    if n_p:
        r = np.ascontiguousarray(b[:, h + cb :]).view(np.float16).astype(np.float32)
        w[:, np.asarray(protected, dtype=np.int64)] += r
    return w.reshape(n, g)
