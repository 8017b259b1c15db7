"""The quantized KV cache setting: its GGUF keys, its plan field and its byte arithmetic (docs/format.md "KV cache").

Format core (numpy only): the converter writes the setting (converters/gguf_writer.py), the Python reader
(runtime/gguf_reader.py), the PyTorch reference (wqedge/kvquant.py) and the C++ runtime (cpp/src/kvcache.h) read it.
The KV cache is a runtime choice: the file's keys are the default a runtime may override (`--kv-bits`), and a
file without them runs with the float cache, exactly as before. No format version change: the weights are the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEY_BITS = "wqedge.kv_cache.bits"          # u32: 16 (fp16 values), 8 or 4; absent: float32 cache
KEY_ROTATION = "wqedge.kv_cache.rotation"  # string: "hadamard" (default when absent) or "none"
BITS = (16, 8, 4)
F16 = 16   # fp16 values: no groups, no rotation (nothing to make uniform), half the float32 cache's bytes
# What `wqedge convert` writes into a GGUF when neither --kv-bits nor the plan's kv_cache says otherwise: fp16 values
# (llama.cpp's default cache type). The runtime reads them as stored, so at long context a decode reads half the
# float32 cache's bytes: llama-s q4, 1 thread, after 2000 tokens 1.8-1.9 ms a token against 3.3-3.7 (float32),
# no loss at short context (bench/results/decode_depth.md); perplexity 10.8821 (float32) vs 10.8820 (fp16), llama-s
# q4, `wqedge eval --backend cpp --kv-bits f32|f16`, eval.txt, 1233 windows of 512.
DEFAULT_BITS = F16
ROTATIONS = ("hadamard", "none")
GROUPS = {8: 32, 4: 16}  # values per (scale, min) pair; a head_dim the group does not divide is one group per head
FLOAT_BYTES = 4      # the float cache: float32 per value


def hadamard_block(head_dim: int) -> int:
    """Size of the Walsh–Hadamard blocks of a head: head_dim when a power of two, else the largest power of two
    dividing it (block-diagonal Hadamard; an odd head_dim gets blocks of 1, i.e. no rotation)."""
    return head_dim & -head_dim


@dataclass(frozen=True)
class KVCacheSpec:
    """bits: 8, 4 or None (float32 cache); rotation: "hadamard" (K rotated per head before quantizing, and Q with
    it at attention time) or "none". Codes are asymmetric (fp16 scale and min per group of GROUPS[bits] values).
    Chosen by measurement (bench/results/kv_cache_choice.txt, bench/results/kv_cache.md, llama-s): at 4 bits
    asymmetric codes beat symmetric ones, groups of 16 beat 32 (+0.1% vs +1.0% over W4: 6 bits a value instead of
    5) and per-head groups; rotating K helps, rotating V as well hurts; at 8 bits every variant is within noise."""
    bits: int | None = None
    rotation: str = "hadamard"
    symmetric: bool = False   # the file format is asymmetric; symmetric exists for the measurement only
    group_size: int | None = None  # None: GROUPS[bits] (the format); other values for the measurement only, 0 = per head
    rotate_values: bool = False  # True also rotates V (measured worse; measurement only, the runtime never does)

    def __post_init__(self):
        if self.bits is not None and self.bits not in BITS:
            raise ValueError(f"KV cache bits must be one of {', '.join(map(str, BITS))} (or float), got {self.bits!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"KV cache rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def rotate_k(self) -> bool:
        return self.rotation != "none" and self.bits != F16

    @property
    def rotate_v(self) -> bool:
        return self.rotation != "none" and self.rotate_values

    def group(self, head_dim: int) -> int:
        if self.bits == F16:
            return head_dim
        g = GROUPS[self.bits] if self.group_size is None else (self.group_size or head_dim)
        return g if head_dim % g == 0 else head_dim

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one token's K (or V) of one KV head in the cache."""
        if self.bits is None:
            return FLOAT_BYTES * head_dim
        if self.bits == F16:
            return 2 * head_dim
        n_groups = head_dim // self.group(head_dim)
        return n_groups * (2 if self.symmetric else 4) + head_dim * self.bits // 8

    def cache_bytes(self, n_ctx: int, kv_heads_per_layer: list[int], head_dim: int) -> int:
        """K and V of n_ctx tokens over all layers."""
        return 2 * n_ctx * sum(kv_heads_per_layer) * self.row_bytes(head_dim)

    def label(self) -> str:
        if self.bits is None:
            return "f32"
        if self.bits == F16:
            return "f16"
        return f"q{self.bits}" + ("" if self.rotate_k else " (no rotation)")

    # ------------------------------------------------------------ plan field (docs/plan.md, version 3)
    def to_plan(self) -> dict:
        """The plan's kv_cache field; {"bits": None} is a float32 cache asked for explicitly (`--kv-bits f32`),
        which the converter's default does not replace (an absent field does get it). fp16 values are never
        rotated, so {"bits": 16} carries no rotation."""
        return {"bits": self.bits} if not self.rotation_stored else {"bits": self.bits, "rotation": self.rotation}

    @property
    def rotation_stored(self) -> bool:
        """Whether the rotation means anything, so plans and files record it: quantized codes (8 or 4 bits) only."""
        return self.bits is not None and self.bits != F16

    @classmethod
    def from_plan(cls, d: dict | None) -> "KVCacheSpec":
        if d is None:
            return cls()
        if not isinstance(d, dict) or set(d) - {"bits", "rotation"}:
            raise ValueError(f"kv_cache must be {{\"bits\": 16|8|4|null, \"rotation\": \"hadamard\"|\"none\"}}, got {d!r}")
        return cls(d.get("bits"), d.get("rotation", "hadamard"))


def parse_bits(text: str | int | None) -> int | None:
    """--kv-bits value: 'f32'/'float'/None -> None (float cache), 'f16'/'16' -> 16, '8'/'4' -> 8/4; else ValueError."""
    if text is None or (isinstance(text, str) and text.lower() in ("f32", "float", "none")):
        return None
    if isinstance(text, str) and text.lower() == "f16":
        return F16
    try:
        b = int(text)
    except ValueError:
        raise ValueError(f"--kv-bits must be f32, f16, 8 or 4, got {text!r}") from None
    if b not in BITS:
        raise ValueError(f"--kv-bits must be f32, f16, 8 or 4, got {text!r}")
    return b


def dequantize_rows(rows: np.ndarray, bits: int, head_dim: int) -> np.ndarray:
    """float32[n, head_dim] values of cache rows uint8[n, row_bytes] (the layout of cpp/src/kvcache.h: per group
    fp16 scale d, fp16 min m, then the codes; 4 bits: byte i holds code i low and code i + g/2 high)."""
    if bits == F16:
        return np.ascontiguousarray(rows, dtype=np.uint8).view(np.float16).astype(np.float32).reshape(len(rows), head_dim)
    spec = KVCacheSpec(bits)
    g = spec.group(head_dim)
    gb = 4 + g * bits // 8
    r = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), head_dim // g, gb)
    d = r[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = r[..., 2:4].copy().view(np.float16).astype(np.float32)
    c = r[..., 4:]
    if bits == 4:
        c = np.concatenate([c & 0xF, c >> 4], axis=-1)
    return (c.astype(np.float32) * d + m).reshape(len(rows), head_dim)
