"""Read a wqedge GGUF back (numpy only): model shape, chunk layouts, dequantized weights, bit counts.

This is the Python-side definition of what the file means; the PyTorch reference and every
runtime are checked against weights produced here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from wqedge.blocks import (COMPACT_FORMAT_VERSION, FORMAT_VERSION, SCALE_BASE, ChunkData, block_type, decode_chunk,
                           dequantize_chunk)
from wqedge.head import head_tensor
from wqedge.rotation_format import (FIELDS as ROT_FIELDS, GROUPS as ROT_GROUPS, INT_ROTATED_FORMAT_VERSION,
                                    KEY_ACT_BITS, KEY_ROTATION, ROTATED_FORMAT_VERSION, StoredTransform,
                                    tensor_name as rot_tensor_name)
from wqedge.spec import ModelSpec, with_layer_shapes
from wqedge.units import chunk_bounds
from wqedge.runtime.gguf_check import FormatError, open_reader

__all__ = ["FormatError", "LinearLayout", "WqGGUF"]


@dataclass
class LinearLayout:
    name: str
    out_features: int
    in_features: int
    actions: list[str]
    protected_counts: list[int]
    row_bytes: int


def _field(reader: gguf.GGUFReader, key: str, default=...):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise FormatError(f"missing key {key}")
        return default
    return f.contents()


def _format_errors(method):
    """Any malformed value met while reading (wrong type, unknown id, absurd size) is a FormatError."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *a, **k):
        try:
            return method(self, *a, **k)
        except FormatError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError, MemoryError) as e:
            raise FormatError(f"{self.path}: malformed wqedge file ({type(e).__name__}: {e})") from None
    return wrapper


class WqGGUF:
    """A wqedge model file opened for reading (memory-mapped by gguf.GGUFReader)."""

    @_format_errors
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        self.reader = open_reader(self.path)
        version = _field(self.reader, "wqedge.format_version", None)
        if version is None:
            raise FormatError(f"{self.path}: not a wqedge file (no wqedge.format_version key); a GGUF from "
                              "llama.cpp runs in llama.cpp, wqedge reads files written by `wqedge convert`")
        arch = _field(self.reader, "general.architecture", None)
        if arch != "llama":
            raise FormatError(f"{self.path}: architecture {arch!r}; wqedge files are 'llama'")
        if version not in (FORMAT_VERSION, ROTATED_FORMAT_VERSION, INT_ROTATED_FORMAT_VERSION, COMPACT_FORMAT_VERSION):
            raise FormatError(f"{self.path}: wqedge format version {version}, this reader reads "
                              f"{FORMAT_VERSION} to {COMPACT_FORMAT_VERSION}")
        self.format_version = int(version)
        self.group_size = int(_field(self.reader, "wqedge.group_size"))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.spec = self._spec()

    # ------------------------------------------------------------ metadata
    def _spec(self) -> ModelSpec:  # called by __init__ only, whose errors are already FormatErrors
        r = self.reader
        g = lambda k, d=...: _field(r, f"llama.{k}", d)  # noqa: E731
        scaling = _field(r, "wqedge.rope.scaling", None)
        n_layers = int(g("block_count"))
        # feed_forward_length, head_count, head_count_kv: one u32, or one per layer (a pruned model)
        ff, heads, kv = (g(k) for k in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"))
        per_layer = {k: v for k, v in (("ff", ff), ("heads", heads), ("kv", kv)) if isinstance(v, list)}
        for k, v in per_layer.items():
            if len(v) != n_layers:
                raise FormatError(f"{self.path}: per-layer {k} lists {len(v)} values for {n_layers} layers")
        ff, heads, kv = (max(v) if isinstance(v, list) else int(v) for v in (ff, heads, kv))
        hidden = int(g("embedding_length"))
        spec = ModelSpec(
            hidden_size=hidden, n_layers=n_layers, n_heads=heads,
            n_kv_heads=kv, head_dim=int(g("attention.key_length", hidden // heads)),
            intermediate_size=ff, vocab_size=int(g("vocab_size")),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")), rope_theta=float(g("rope.freq_base")),
            rope_scaling=json.loads(scaling) if scaling else None,
            max_position_embeddings=int(g("context_length")),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id", None),
            eos_token_id=_field(r, "tokenizer.ggml.eos_token_id", None),
            name=str(_field(r, "general.name", "llama")),
        )
        if not per_layer:
            return spec
        return with_layer_shapes(spec, *(per_layer.get(k) or [getattr(spec, a)] * n_layers for k, a in
                                         (("ff", "intermediate_size"), ("heads", "n_heads"), ("kv", "n_kv_heads"))))

    @property
    def effective_bits(self) -> float:
        """The figure recorded by the converter."""
        return float(_field(self.reader, "wqedge.effective_bits"))

    @property
    def plan_json(self) -> str | None:
        return _field(self.reader, "wqedge.plan", None)

    @property
    def act_bits(self) -> int:
        """Activation bits the file asks the runtime for (8 unless a version 2 file says otherwise)."""
        return int(_field(self.reader, KEY_ACT_BITS, 8))

    @property
    def kv_cache(self):
        """The file's KV cache setting (wqedge.kv_format.KVCacheSpec; bits None = float: no key). An unknown value
        is a FormatError."""
        from wqedge.kv_format import KEY_BITS, KEY_ROTATION as KV_ROTATION, KVCacheSpec
        bits, rot = _field(self.reader, KEY_BITS, None), _field(self.reader, KV_ROTATION, "hadamard")
        try:
            return KVCacheSpec(None if bits is None else int(bits), str(rot))
        except ValueError as e:
            raise FormatError(f"{self.path}: {e} (keys {KEY_BITS}, {KV_ROTATION})") from None

    @property
    def rotation(self) -> str | None:
        """The rotation method of the stored input transforms, or None (docs/format.md, "Rotations")."""
        return _field(self.reader, KEY_ROTATION, None)

    @_format_errors
    def transforms(self) -> dict[tuple[int, int], StoredTransform]:
        """{(layer, group): StoredTransform} of a rotated file ({} otherwise), checked for shape."""
        if self.rotation is None:
            return {}
        out = {}
        for li in range(self.spec.n_layers):
            for gi in range(len(ROT_GROUPS)):
                arr = {}
                for f in ROT_FIELDS:
                    t = self.tensors.get(rot_tensor_name(li, gi, f))
                    if t is not None:
                        shape = tuple(int(x) for x in reversed(t.shape))
                        arr[f] = np.array(t.data).reshape(shape)
                for need in ("r1", "r2", "perm", "householder"):
                    if need not in arr:
                        raise FormatError(f"{self.path}: rotated file lacks tensor {rot_tensor_name(li, gi, need)}")
                st = StoredTransform(**{f: arr.get(f) for f in ROT_FIELDS})
                try:
                    st.check(f"{self.path}: layer {li} group {ROT_GROUPS[gi]}")
                except ValueError as e:
                    raise FormatError(str(e)) from None
                out[(li, gi)] = st
        return out

    def tokenizer_fields(self) -> dict:
        """The tokenizer.ggml.* keys, without the prefix."""
        p = "tokenizer.ggml."
        return {k[len(p):]: f.contents() for k, f in self.reader.fields.items() if k.startswith(p)}

    @_format_errors
    def layout(self, name: str) -> LinearLayout:
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: no tensor {name}")
        key = f"wqedge.tensors.{name}."
        actions = [block_type(int(a)).name for a in _field(self.reader, key + "chunk_actions")]
        k = int(_field(self.reader, key + "in_features"))
        prot = _field(self.reader, key + "chunk_protected", None) or [0] * len(actions)
        n = int(t.shape[1])
        rb = int(t.shape[0])
        widths = [e - s for s, e in chunk_bounds(k, self.group_size)]
        if len(widths) != len(actions) or len(prot) != len(actions):
            raise FormatError(f"{name}: {k} columns make {len(widths)} chunks, file lists {len(actions)} actions")
        expect = sum(block_type(a).row_bytes(g, p) for a, g, p in zip(actions, widths, prot))
        if expect != rb:
            raise FormatError(f"{name}: rows are {rb} bytes, its chunk actions need {expect}")
        return LinearLayout(name, n, k, actions, [int(p) for p in prot], rb)

    def linear_names(self) -> list[str]:
        return [lin.gguf_name for lin in self.spec.linears()]

    # ------------------------------------------------------------ data
    def is_quantized(self, name: str) -> bool:
        """Whether tensor `name` is a quantized linear (I8 row-blocks described by wqedge.tensors.<name>.* keys):
        the decoder linears, and the output head (output.weight, or token_embd.weight when tied) when quantized."""
        return f"wqedge.tensors.{name}.chunk_actions" in self.reader.fields

    @property
    def head_tensor(self) -> str:
        """The tensor the output head reads: output.weight, or token_embd.weight when the embeddings are tied."""
        return head_tensor(self.spec.tie_word_embeddings)[1]

    @property
    def head_kind(self) -> str:
        """How the output head is stored: "fp16" / "fp32" (dense) or its block kind ("q8", "q4"; wqedge.head)."""
        name = self.head_tensor
        if self.is_quantized(name):
            acts = set(self.layout(name).actions)
            return acts.pop() if len(acts) == 1 else "mixed"
        return "fp32" if np.asarray(self.tensors[name].data).dtype == np.float32 else "fp16"

    @_format_errors
    def dense(self, name: str) -> np.ndarray:
        """A non-linear tensor as float32, in numpy (row-major) shape; a quantized head (or tied embedding table)
        dequantized (docs/format.md, "Output head")."""
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: no tensor {name}")
        if self.is_quantized(name):
            if name != self.head_tensor:
                raise FormatError(f"{self.path}: {name} is a quantized linear, not a dense tensor")
            lay = self.layout(name)
            if (lay.out_features, lay.in_features) != (self.spec.vocab_size, self.spec.hidden_size):
                raise FormatError(f"{self.path}: {name} is [{lay.out_features}, {lay.in_features}], expected "
                                  f"[{self.spec.vocab_size}, {self.spec.hidden_size}]")
            return self.dequantize_linear(name)
        shape = tuple(int(x) for x in reversed(t.shape))
        return np.array(t.data, dtype=np.float32).reshape(shape)  # a private, writable copy

    def scale_bases(self, name: str, lay: LinearLayout | None = None) -> np.ndarray:
        """The compact chunks' fp16 scale bases of linear `name`, left to right (empty when it has none); lay: its
        layout, when the caller has read it already."""
        lay = lay or self.layout(name)
        n = sum(block_type(a).compact for a in lay.actions)
        t = self.tensors.get(name + SCALE_BASE)
        if t is None:
            if n:
                raise FormatError(f"{self.path}: {name} has {n} compact chunk(s) but no {name + SCALE_BASE} tensor")
            return np.zeros(0, np.float16)
        v = np.asarray(t.data).reshape(-1)
        if v.dtype != np.float16 or v.size != n:
            raise FormatError(f"{self.path}: {name + SCALE_BASE} holds {v.size} {v.dtype} value(s), expected {n} F16 "
                              "(one per compact chunk)")
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise FormatError(f"{self.path}: {name + SCALE_BASE} holds a negative or non-finite scale base")
        return v

    def protected_indices(self, name: str) -> np.ndarray:
        t = self.tensors.get(name + ".protect")
        return np.zeros(0, np.int64) if t is None else np.asarray(t.data).view(np.uint16).astype(np.int64)

    @_format_errors
    def chunks(self, name: str) -> list[ChunkData]:
        """The chunks of quantized linear `name` as blocks.decode_chunk reads them, left to right (each with
        its first column as `start` and chunk-local protected columns)."""
        lay = self.layout(name)
        raw = np.asarray(self.tensors[name].data).view(np.uint8).reshape(lay.out_features, lay.row_bytes)
        prot = self.protected_indices(name)
        bases = iter(self.scale_bases(name, lay))
        out = []
        off = 0
        pi = 0
        for (s, e), a, n_p in zip(chunk_bounds(lay.in_features, self.group_size), lay.actions, lay.protected_counts):
            nb = block_type(a).row_bytes(e - s, n_p)
            c = decode_chunk(raw[:, off: off + nb], a, e - s, prot[pi: pi + n_p] - s if n_p else None,
                             base=next(bases) if block_type(a).compact else None)
            c.start = s
            out.append(c)
            off += nb
            pi += n_p
        return out

    @_format_errors
    def dequantize_linear(self, name: str) -> np.ndarray:
        """float32[N, K] exactly as the format defines the weights."""
        lay = self.layout(name)
        out = np.empty((lay.out_features, lay.in_features), np.float32)
        for c in self.chunks(name):
            out[:, c.start: c.end] = dequantize_chunk(c)
        return out

    @_format_errors
    def stored_bytes(self, name: str) -> int:
        """Bytes a quantized linear occupies in the file: its row-blocks plus its .protect indices and .scale_base values."""
        side = [self.tensors.get(name + ".protect"), self.tensors.get(name + SCALE_BASE)]
        return int(self.tensors[name].n_bytes) + sum(int(t.n_bytes) for t in side if t is not None)

    def measured_bits(self) -> float:
        """8 x bytes of the quantized linear tensors (and their .protect indices) / their weights; for a pruned
        model, / the unpruned model's weights (wqedge.original_weights: pruned weights cost 0 bits)."""
        rows = self.layer_table()
        n = _field(self.reader, "wqedge.original_weights", None) or sum(r["shape"][0] * r["shape"][1] for r in rows)
        return 8 * sum(r["bytes"] for r in rows) / int(n)

    @_format_errors
    def layer_table(self) -> list[dict]:
        """Per linear: shape, bits per weight, action counts (for `wqedge inspect`)."""
        rows = []
        for name in self.linear_names():
            lay = self.layout(name)
            nbytes = self.stored_bytes(name)
            counts: dict[str, int] = {}
            for a in lay.actions:
                counts[a] = counts.get(a, 0) + 1
            rows.append({"name": name, "shape": (lay.out_features, lay.in_features), "bytes": nbytes,
                         "bits": 8 * nbytes / (lay.out_features * lay.in_features), "actions": counts,
                         "protected": sum(lay.protected_counts)})
        return rows
