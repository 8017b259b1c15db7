"""How RUQuant input transforms and activation bits are stored in our GGUF (docs/format.md, "Rotations").

Format core (numpy only): the writer (converters/gguf_writer.py), the Python reader (runtime/gguf_reader.py)
and the C++ loader (cpp/src/rotation.cpp) agree on these names. The torch side (wqedge/rotation.py) converts
its `Transform` to and from `StoredTransform`.

A file with transforms or with activation bits other than 8 is format version 2 (`ROTATED_FORMAT_VERSION`):
a reader that predates it refuses the file by its version instead of running the folded weights without
their transforms (which would give wrong outputs). Transforms whose block matrices are int8 codes with
per-row scales (what wqedge.rotation builds since format 3) make it version 3 (`INT_ROTATED_FORMAT_VERSION`):
a version-2 reader would not know the codes' meaning. Every other file stays version 1, byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROTATED_FORMAT_VERSION = 2
INT_ROTATED_FORMAT_VERSION = 3
MAX_INT8_BLOCK = 512   # the largest block format 3 stores as int8 matrices (docs/format.md "Rotations")
# Transform groups of a decoder layer, in wqedge.calib.INPUT_GROUPS order: the linears that read one input.
GROUPS = ("attn_in", "attn_out", "ffn_in", "ffn_down")   # q/k/v, o, gate/up, down
GROUP_LINEARS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
KEY_ROTATION = "wqedge.rotation"             # string: the method ("ruquant", "hadamard"); absent: no transforms
KEY_BLOCK = "wqedge.rotation.block_size"     # u32: B
KEY_ACT_BITS = "wqedge.act_bits"             # u32: 8, 6 or 4; absent: 8
FIELDS = ("r1", "r1_tail", "perm", "r2", "r2_tail", "householder", "smooth",
          "r1_scale", "r1_tail_scale", "r2_scale", "r2_tail_scale")
MATRICES = (("r1", "r1_scale"), ("r1_tail", "r1_tail_scale"), ("r2", "r2_scale"), ("r2_tail", "r2_tail_scale"))


@dataclass
class StoredTransform:
    """x' = H R2 P R1 (x / s) of one group, as arrays (see wqedge/rotation.py for the meaning).

    A matrix is float32 (format 2), or int8 codes when its `*_scale` (float32, one per row) is present
    (format 3): the matrix is then diag(scale) codes."""
    r1: np.ndarray                   # [B, B] applied to each full block of B channels
    r1_tail: np.ndarray | None       # [t, t] for the ragged last block (t = d mod B), else None
    perm: np.ndarray                 # int32 [d]: x'[i] = x[perm[i]]
    r2: np.ndarray
    r2_tail: np.ndarray | None
    householder: np.ndarray          # float32 [d], unit or all zero (no reflection)
    smooth: np.ndarray | None        # float32 [d] divisors, or None
    r1_scale: np.ndarray | None = None       # float32 [B] row scales of int8 r1, else None
    r1_tail_scale: np.ndarray | None = None  # float32 [t]
    r2_scale: np.ndarray | None = None
    r2_tail_scale: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.perm.shape[0])

    @property
    def integer(self) -> bool:
        """True when the block matrices are int8 codes with row scales (format 3)."""
        return self.r1_scale is not None

    def arrays(self) -> dict[str, np.ndarray]:
        """field -> array for every present field, in FIELDS order, with the stored dtypes."""
        out = {}
        for f in FIELDS:
            a = getattr(self, f)
            if a is not None:
                dt = np.int32 if f == "perm" else np.int8 if getattr(self, f + "_scale", None) is not None else np.float32
                out[f] = np.ascontiguousarray(a, dtype=dt)
        return out

    def check(self, where: str) -> None:
        """ValueError naming `where` when the arrays do not describe a transform of width dim."""
        d, b = self.dim, self.r1.shape[0]
        t = d % b if d >= b else d
        if self.r1.shape != (b, b) or self.r2.shape != (b, b):
            raise ValueError(f"{where}: r1/r2 must be square [B, B], got {self.r1.shape}, {self.r2.shape}")
        for name in ("r1_tail", "r2_tail"):
            a = getattr(self, name)
            if (a is None) != (t == 0) or (a is not None and a.shape != (t, t)):
                raise ValueError(f"{where}: {name} must be [{t}, {t}] for width {d} and block {b}")
        for m, sc in MATRICES:
            a, scale = getattr(self, m), getattr(self, sc)
            if a is not None and (scale is not None) != self.integer:
                raise ValueError(f"{where}: {sc} must be present for every matrix or for none")
            if scale is not None and (a is None or scale.shape != (a.shape[0],)):
                raise ValueError(f"{where}: {sc} must hold one scale per row of {m}")
            if scale is not None and (np.abs(a) > 127).any():
                raise ValueError(f"{where}: {m} codes must lie in [-127, 127]")
        if self.integer and b > MAX_INT8_BLOCK:
            raise ValueError(f"{where}: int8 block matrices need B <= {MAX_INT8_BLOCK}, got {b}")
        if sorted(self.perm.tolist()) != list(range(d)):
            raise ValueError(f"{where}: perm is not a permutation of 0..{d - 1}")
        for name in ("householder", "smooth"):
            a = getattr(self, name)
            if a is not None and a.shape != (d,):
                raise ValueError(f"{where}: {name} must have {d} values")
        if self.smooth is not None and not (self.smooth > 0).all():
            raise ValueError(f"{where}: smoothing divisors must be positive")


def identity_matrix(m: np.ndarray | None, scale: np.ndarray | None) -> bool:
    """True when a stored block matrix is the identity: float exactly I, or int8 codes 127·I with row scales 1/127
    (within 1e-6, as cpp/src/rotation.cpp is_identity_q); None (no tail) counts as the identity."""
    if m is None:
        return True
    eye = np.eye(m.shape[0])
    if scale is None:
        return bool(np.array_equal(m, eye))
    return bool(np.array_equal(m, 127 * eye) and (np.abs(scale.astype(np.float64) * 127 - 1) < 1e-6).all())


def is_identity(st: StoredTransform) -> bool:
    """True when a stored transform is the identity (every matrix the identity, float or int8 codes 127·I with
    scales 1/127; the identity permutation; no reflection, no smoothing): what method "hadamard" stores for the
    groups it leaves alone, and what the C++ runtime and the ONNX export skip (docs/format.md "Rotations")."""
    return (st.smooth is None and not st.householder.any() and np.array_equal(st.perm, np.arange(st.dim))
            and all(identity_matrix(getattr(st, m), getattr(st, sc)) for m, sc in MATRICES))


def tensor_name(layer: int, group: int, field: str) -> str:
    """GGUF tensor name of one field of layer `layer`'s group `group` (index into GROUPS)."""
    return f"blk.{layer}.rot_{GROUPS[group]}.{field}"


def group_of(linear_gguf_name: str) -> tuple[int, int]:
    """(layer, group index) of a decoder linear's GGUF name, e.g. blk.3.ffn_up.weight -> (3, 2)."""
    _, layer, proj = linear_gguf_name.split(".")[:3]
    for gi, names in enumerate(GROUP_LINEARS):
        if proj in names:
            return int(layer), gi
    raise ValueError(f"{linear_gguf_name}: not a decoder linear")


# ---------------------------------------------------------------- the plan's "rotation" config (docs/plan.md)
METHODS = ("ruquant", "hadamard")   # wqedge.rotation (RUQuant) and wqedge.residual_rotation (QuaRot-style)
CONFIG_KEYS = ("method", "block", "seed", "smooth_alpha", "n_seqs", "seqlen", "stage2")
HADAMARD_KEYS = ("method", "block", "seed")
STAGE2_KEYS = ("steps", "act_bits", "weight_bits", "group", "lr", "tokens")
LEGACY_BLOCK = 128   # RUQuant's block of a config that names none (wqedge.rotation.BLOCK until 2026-12-08)
# RUQuant's default block (wqedge.rotation.BLOCK), here so that the CLI names it without importing torch. 32 since
# 2026-12-08 (128 before): on llama-s W4A4 +5.8% over fp16 against +8.4% at 128 (+7.2% at 64), W8A4 +4.2% against +6.8%,
# A6 and A8 rows within their noise; the runtime's transform then costs 2 d B = 64 multiply-adds per input column
# instead of 256 (bench/results/ruquant_block.md).
DEFAULT_BLOCK = 32


def check_rotation_config(config, act_bits: tuple[int, ...]) -> None:
    """ValueError naming the field when a plan's rotation config is not one wqedge.rotation.build_rotation can
    rebuild: an unknown method or field (a field this version does not know would be silently ignored, giving
    other transforms than the plan was made on), or a "stage2" entry without all its settings."""
    if not isinstance(config, dict) or config.get("method") not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    known = HADAMARD_KEYS if config["method"] == "hadamard" else CONFIG_KEYS
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
    if config["method"] == "hadamard":
        b = config.get("block")
        if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1) or b > MAX_INT8_BLOCK:
            raise ValueError(f"block must be a power of two from 2 to {MAX_INT8_BLOCK} (its matrices are int8), "
                             f"got {b!r}")
        if isinstance(config.get("seed"), bool) or not isinstance(config.get("seed"), int):
            raise ValueError(f"seed must be an integer, got {config.get('seed')!r}")
        return
    s2 = config.get("stage2")
    if s2 is None:
        return
    if not isinstance(s2, dict):
        raise ValueError("stage2 must be an object")
    missing = [k for k in STAGE2_KEYS if k not in s2]
    unknown = sorted(set(s2) - set(STAGE2_KEYS))
    if missing or unknown:
        raise ValueError(f"stage2: {'missing' if missing else 'unknown'} field {(missing or unknown)[0]!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(s2["steps"]) or s2["steps"] < 1:
        raise ValueError(f"stage2.steps must be an integer >= 1, got {s2['steps']!r}")
    if not is_int(s2["act_bits"]) or s2["act_bits"] not in act_bits:
        raise ValueError(f"stage2.act_bits must be one of {', '.join(map(str, act_bits))}, got {s2['act_bits']!r}")
    if s2["weight_bits"] is not None and (not is_int(s2["weight_bits"]) or not 1 <= s2["weight_bits"] <= 8):
        raise ValueError(f"stage2.weight_bits must be 1-8 or null (float weights), got {s2['weight_bits']!r}")
    if not is_int(s2["group"]) or s2["group"] < 1 or not is_int(s2["tokens"]) or s2["tokens"] < 1:
        raise ValueError("stage2.group and stage2.tokens must be integers >= 1")
    if isinstance(s2["lr"], bool) or not isinstance(s2["lr"], (int, float)) or not 0 < s2["lr"] < 1:
        raise ValueError(f"stage2.lr must lie in (0, 1), got {s2['lr']!r}")
