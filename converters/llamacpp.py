"""Export a model as a GGUF in llama.cpp's own `llama` layout (F16/F32 or stock quantized types).

Our own format (docs/format.md) keeps Q and K rows in Hugging Face order and stores column-chunk
blocks as I8 bytes that llama.cpp cannot run. This module writes the file llama.cpp's
convert_hf_to_gguf.py would write for the same weights: its tensor names and `llama.*` keys, Q and
K rows permuted into the interleaved order llama.cpp's RoPE expects, the tokenizer through
`add_tokenizer_to_gguf`, and `rope_freqs.weight` for llama3 RoPE scaling.

Sources (`src`):
  * a Hugging Face checkpoint folder (or an open `wqedge.checkpoint.LlamaCheckpoint`): the float
    weights. Reading it goes through wqedge.checkpoint (torch); everything else here is numpy + gguf.
  * a wqedge GGUF: its weights exactly as our format defines them (`WqGGUF.dequantize_linear`), so
    llama.cpp runs our quantized model's weights (at F32, or rounded to F16).

Outputs:
  * `export_llamacpp(src, out)` — every decoder linear F16 (default) or F32 (`dtype="f32"`).
  * `export_llamacpp(src, out, imatrix, tensor_types={gguf_name: "Q4_K", ...})` — one stock ggml type per
    decoder linear (Q8_0, Q6_K, Q5_K, Q4_K, IQ4_NL, Q4_0, Q3_K, Q2_K, IQ types ...), quantized by
    llama.cpp's own quantizer (`ggml_quantize_chunk` of libggml-base.so, shipped in llama-cpp-python,
    through ctypes) with an optional importance matrix (per-input-column diag(XᵀX)), with llama.cpp's
    fallbacks where K does not fit the block. The types are chosen elsewhere: llama-quantize's presets
    (`wqedge.alloc.llamacpp_types.preset_types(spec, "Q4_K_M")`) or the *projection* of a chunk-level plan
    under a bit budget (`budget_types(spec, bits, plan, available_types(...))`).

Embeddings and the output head stay F16 (as our runtime keeps them) unless `embed_type`/`output_type`
say otherwise; norms and rope_freqs are F32. Bits per weight are reported over the decoder linears,
the same accounting as `wqedge.effective_bits`.

The type projection and llama-quantize's presets live in wqedge.alloc.llamacpp_types (import them from
there); the evaluator (`LlamaCppEvaluator`, `measured_linear_bits`) in wqedge.runtime.llamacpp_eval.
"""
from __future__ import annotations

import ctypes as C
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from wqedge.fileio import atomic_output
from wqedge.spec import ModelSpec, other_tensors, rope_freq_factors
from wqedge.converters.tokenizer import TokenizerMeta, add_tokenizer_to_gguf
from wqedge.converters.gguf_writer import add_llama_metadata
from wqedge.alloc.llamacpp_types import (  # type facts (sizes, fallbacks); the choice of types is made there
    DEFAULT_TYPES,
    QT,
    qtype,
    fit_type,
    fits,
    type_bits,
)

__all__ = [
    "ExportResult",
    "available_types",
    "export_llamacpp",
    "ggml_library_path",
    "permute_qk",
    "quantize_tensor",
    "unpermute_qk",
]

ARCH = "llama"
# llama.cpp's `llama` graph runs layer 0's head counts in every layer; its `deci` architecture (Nemotron-NAS:
# the llama graph with per-layer head counts and FFN lengths, same tensors and RoPE) runs a pruned model.
ARCH_PER_LAYER = "deci"

_FTYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0",
          "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
          "Q6_K": "MOSTLY_Q6_K", "IQ2_XXS": "MOSTLY_IQ2_XXS", "IQ2_XS": "MOSTLY_IQ2_XS", "IQ3_XXS": "MOSTLY_IQ3_XXS",
          "IQ1_S": "MOSTLY_IQ1_S", "IQ4_NL": "MOSTLY_IQ4_NL", "IQ3_S": "MOSTLY_IQ3_S", "IQ2_S": "MOSTLY_IQ2_S",
          "IQ4_XS": "MOSTLY_IQ4_XS", "IQ1_M": "MOSTLY_IQ1_M", "TQ1_0": "MOSTLY_TQ1_0", "TQ2_0": "MOSTLY_TQ2_0",
          "Q1_0": "MOSTLY_Q1_0"}


# ================================================================ Q/K row order

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face (rotate-half) row order -> llama.cpp's interleaved order, as convert_hf_to_gguf's
    LlamaModel.permute does (n_head = attention heads for Q, key/value heads for K)."""
    n = w.shape[0]
    if n % (2 * n_head):
        raise ValueError(f"{n} rows do not split into {n_head} heads of even size")
    return np.ascontiguousarray(w.reshape(n_head, 2, n // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk."""
    n = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, n // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ================================================================ sources

class _Source:
    spec: ModelSpec
    plan = None
    label = ""

    def tokenizer(self) -> TokenizerMeta: ...
    def dense(self, hf_name: str) -> np.ndarray: ...      # float16/float32 as stored
    def linear(self, hf_name: str) -> np.ndarray: ...     # float32 [N, K], HF row order

    def kept_columns(self, hf_name: str) -> np.ndarray | None:  # of a checkpoint pruned on the way (prune)
        return None


class _CheckpointSource(_Source):
    def __init__(self, ckpt):
        from wqedge.checkpoint import LlamaCheckpoint  # torch: only for checkpoint sources
        self.ckpt = ckpt if isinstance(ckpt, LlamaCheckpoint) else LlamaCheckpoint.open(ckpt)
        self.spec = self.ckpt.spec
        self.label = f"checkpoint {self.ckpt.path}"

    def tokenizer(self) -> TokenizerMeta:
        from wqedge.converters.tokenizer import read_tokenizer
        return read_tokenizer(self.ckpt.path, n_vocab=self.spec.vocab_size)

    def dense(self, hf_name):
        import torch
        t = self.ckpt.get(hf_name)
        return t.numpy() if t.dtype == torch.float16 else t.to(torch.float32).numpy()

    def linear(self, hf_name):
        w = self.ckpt.linear_weight(hf_name).numpy()
        return w if self.pruned is None else np.ascontiguousarray(self.pruned.prune_weight(hf_name, w))

    pruned = None

    def prune(self, plan) -> None:
        """Export the model `plan` prunes (its kept rows and columns, per-layer shapes)."""
        self.pruned = plan
        self.spec = plan.model_spec(self.ckpt.spec)

    def kept_columns(self, hf_name):
        return None if self.pruned is None else self.pruned.kept_columns(hf_name)


class _WqSource(_Source):
    def __init__(self, path):
        from wqedge.runtime.gguf_reader import WqGGUF
        self.f = WqGGUF(path)
        self.spec = self.f.spec
        self.label = f"wqedge {self.f.path}"
        self._gguf = {hf: g for hf, g, _ in other_tensors(self.spec)}
        self._gguf.update({lin.hf_name: lin.gguf_name for lin in self.spec.linears()})
        pj = self.f.plan_json
        if pj:
            from wqedge.plan import Plan, PlanError
            try:
                self.plan = Plan.from_dict(json.loads(pj))
            except (PlanError, ValueError):
                self.plan = None

    def tokenizer(self) -> TokenizerMeta:
        from wqedge.converters.tokenizer import meta_from_gguf
        return meta_from_gguf(self.f.reader)

    def dense(self, hf_name):
        t = self.f.tensors[self._gguf[hf_name]]
        arr = np.asarray(t.data)
        shape = tuple(int(x) for x in reversed(t.shape))
        return np.array(arr, dtype=np.float16 if arr.dtype == np.float16 else np.float32).reshape(shape)

    def linear(self, hf_name):
        return self.f.dequantize_linear(self._gguf[hf_name])


def _open_source(src) -> _Source:
    if isinstance(src, _Source):
        return src
    if hasattr(src, "linear_weight") and hasattr(src, "spec"):
        return _CheckpointSource(src)
    p = Path(src)
    if p.is_dir():
        return _CheckpointSource(p)
    if p.is_file():
        return _WqSource(p)
    raise FileNotFoundError(f"{p}: neither a checkpoint folder nor a wqedge GGUF file")


# ================================================================ ggml through ctypes

def ggml_library_path() -> Path | None:
    """libggml-base.so as shipped by llama-cpp-python (None when the package is not installed)."""
    env = os.environ.get("WQEDGE_GGML_BASE")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        for d in (root / "lib", root):
            if (d / name).is_file():
                return d / name
    return None


_LIB = None


def _ggml():
    global _LIB
    if _LIB is None:
        path = ggml_library_path()
        if path is None:
            raise RuntimeError("llama.cpp's libggml-base was not found: pip install llama-cpp-python "
                               "(or set WQEDGE_GGML_BASE to the library)")
        lib = C.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = C.c_size_t
        lib.ggml_quantize_chunk.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64,
                                            C.c_void_p]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [C.c_int]
        lib.ggml_quantize_requires_imatrix.restype = C.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [C.c_int]
        lib.ggml_row_size.restype = C.c_size_t
        lib.ggml_row_size.argtypes = [C.c_int, C.c_int64]
        lib.ggml_blck_size.restype = C.c_int64
        lib.ggml_blck_size.argtypes = [C.c_int]
        lib.ggml_type_name.restype = C.c_char_p
        lib.ggml_type_name.argtypes = [C.c_int]
        _LIB = lib
    return _LIB


# IQ1_M asserts on a missing importance matrix although ggml_quantize_requires_imatrix says no (llama.cpp 0.3.x)
_NEEDS_IMATRIX = {"IQ1_M"}


def requires_imatrix(t) -> bool:
    q = qtype(t)
    return q.name in _NEEDS_IMATRIX or bool(_ggml().ggml_quantize_requires_imatrix(int(q)))


def available_types(types=DEFAULT_TYPES, imatrix: bool = False) -> list[str]:
    """The types of `types` that the installed llama.cpp quantizes (those needing an importance matrix only
    when one is given), in the given order."""
    lib = _ggml()
    out = []
    for t in types:
        try:
            q = qtype(t)
        except ValueError:
            continue
        name = lib.ggml_type_name(int(q))
        if not name or name.decode().upper() != q.name.upper():
            continue
        if int(lib.ggml_blck_size(int(q))) != gguf.GGML_QUANT_SIZES[q][0]:
            continue
        if requires_imatrix(q) and not imatrix:
            continue
        out.append(q.name)
    return out


def quantize_tensor(w: np.ndarray, t, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of w float32[N, K] to type t: uint8[N, row_bytes] (ggml_quantize_chunk)."""
    q = qtype(t)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantize_tensor wants a 2-D array")
    n, k = w.shape
    if q == QT.F32:
        return w.view(np.uint8).reshape(n, 4 * k)
    if q == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(n, 2 * k)
    if not fits(q, k):
        raise ValueError(f"{q.name} needs rows that are a multiple of {gguf.GGML_QUANT_SIZES[q][0]}, got {k}")
    lib = _ggml()
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if im.shape != (k,):
            raise ValueError(f"importance matrix has {im.size} values for {k} columns")
        if not np.all(np.isfinite(im)) or (im < 0).any():
            raise ValueError("importance matrix must be finite and non-negative")
    elif requires_imatrix(q):
        raise ValueError(f"{q.name} needs an importance matrix")
    if not np.all(np.isfinite(w)):
        raise ValueError("non-finite weights")
    row = int(lib.ggml_row_size(int(q), k))
    if row != gguf.GGML_QUANT_SIZES[q][1] * k // gguf.GGML_QUANT_SIZES[q][0]:
        raise RuntimeError(f"{q.name}: llama.cpp and gguf disagree on the row size")
    dst = np.empty((n, row), np.uint8)
    lib.ggml_quantize_init(int(q))
    written = lib.ggml_quantize_chunk(int(q), w.ctypes.data, dst.ctypes.data, 0, n, k,
                                      None if im is None else im.ctypes.data)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


# ================================================================ export

@dataclass
class ExportResult:
    path: Path
    tensor_types: dict[str, str]           # decoder linear gguf name -> ggml type
    linear_bits: float                     # 8 * bytes of the decoder linears / their weights
    file_bytes: int
    source: str
    permuted: bool = True
    notes: list[str] = field(default_factory=list)

    def type_histogram(self) -> dict[str, int]:
        h: dict[str, int] = {}
        for t in self.tensor_types.values():
            h[t] = h.get(t, 0) + 1
        return dict(sorted(h.items(), key=lambda kv: -type_bits(kv[0])))


def _imatrix_for(imatrix, hf_name: str, gguf_name: str):
    if imatrix is None:
        return None
    v = imatrix.get(hf_name)
    if v is None:
        v = imatrix.get(gguf_name)
    if v is None:
        return None
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


def export_llamacpp(src, out: str | os.PathLike, imatrix=None, *,
                    plan=None, tensor_types: Mapping[str, str] | Callable[[str, int, int], str] | None = None,
                    dtype: str = "f16", embed_type: str = "F16", output_type: str | None = None,
                    name: str | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write `src` (checkpoint folder, LlamaCheckpoint or wqedge GGUF) as a llama.cpp `llama` GGUF at `out`
    (`deci` when its layers differ in shape: a pruned model, from a pruned file or a checkpoint and a pruning `plan`).

    Decoder linears: `tensor_types` ({gguf name: type} or fn(gguf_name, N, K) -> type) if given (a bit budget's
    types come from wqedge.alloc.llamacpp_types.budget_types, presets from preset_types: the choice is made
    there, not here), with llama-quantize's fallbacks where a block does not divide the rows; else all
    `dtype` ("f16" or "f32"). `plan`: only a pruning plan's shapes matter here. `imatrix`: {HF or gguf name:
    per-input-column importance [K]} (diag(XᵀX) from wqedge.calib.layerwise_stats), passed to llama.cpp's quantizer.
    Embeddings are `embed_type` (F16, F32 or a stock type), the output head `output_type` (default: as the
    embeddings). The file is written atomically, one tensor in memory at a time.
    """
    s = _open_source(src)
    if getattr(plan, "pruning", None) is not None and isinstance(s, _CheckpointSource):
        s.prune(plan)
    spec = s.spec
    base = {"f16": "F16", "f32": "F32"}.get(str(dtype).lower())
    if base is None:
        raise ValueError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    linears = spec.linears()
    shapes = {lin.gguf_name: (lin.out_features, lin.in_features) for lin in linears}
    notes: list[str] = []
    if tensor_types is not None:
        if callable(tensor_types):
            want = {nm: tensor_types(nm, n, k) for nm, (n, k) in shapes.items()}
        else:
            want = {nm: tensor_types.get(nm, base) for nm in shapes}
        ttypes = {}
        for nm, t in want.items():
            t = qtype(t).name
            ft = fit_type(t, shapes[nm][1])
            if ft != t:
                notes.append(f"{nm}: {t} does not fit rows of {shapes[nm][1]}, using {ft}")
            ttypes[nm] = ft
    else:
        ttypes = {nm: base for nm in shapes}
    for t in set(ttypes.values()) | {embed_type, output_type or embed_type}:
        q = qtype(t)
        if q not in (QT.F16, QT.F32) and q.name not in available_types((q.name,), imatrix=True):
            raise ValueError(f"the installed llama.cpp cannot quantize to {q.name}")
    if imatrix is None and any(requires_imatrix(t) for t in set(ttypes.values()) if qtype(t) not in (QT.F16, QT.F32)):
        raise ValueError("a chosen type needs an importance matrix (imatrix=...)")

    tok = s.tokenizer()
    factors = rope_freq_factors(spec)
    hf_of = {g: hf for hf, g, _ in other_tensors(spec)}
    lin_of = {lin.gguf_name: lin for lin in linears}

    # tensor order as convert_hf_to_gguf writes LLaMA: embeddings, then layer by layer, then head
    order: list[tuple[str, str, tuple[int, ...]]] = []   # (gguf name, type, numpy shape)
    emb_t = qtype(embed_type).name
    out_t = qtype(output_type or embed_type).name
    order.append(("token_embd.weight", fit_type(emb_t, spec.hidden_size), (spec.vocab_size, spec.hidden_size)))
    if factors is not None:
        order.append(("rope_freqs.weight", "F32", factors.shape))
    for i in range(spec.n_layers):
        order.append((f"blk.{i}.attn_norm.weight", "F32", (spec.hidden_size,)))
        for lin in linears:
            if lin.gguf_name.startswith(f"blk.{i}.attn"):
                order.append((lin.gguf_name, ttypes[lin.gguf_name], (lin.out_features, lin.in_features)))
        order.append((f"blk.{i}.ffn_norm.weight", "F32", (spec.hidden_size,)))
        for lin in linears:
            if lin.gguf_name.startswith(f"blk.{i}.ffn"):
                order.append((lin.gguf_name, ttypes[lin.gguf_name], (lin.out_features, lin.in_features)))
    order.append(("output_norm.weight", "F32", (spec.hidden_size,)))
    if not spec.tie_word_embeddings:
        order.append(("output.weight", fit_type(out_t, spec.hidden_size), (spec.vocab_size, spec.hidden_size)))

    def nbytes(t: str, shape) -> int:
        q = qtype(t)
        blk, sz = gguf.GGML_QUANT_SIZES[q]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return rows * (shape[-1] // blk) * sz

    lin_bytes = sum(nbytes(ttypes[nm], shapes[nm]) for nm in shapes)
    lin_bits = 8.0 * lin_bytes / sum(n * k for n, k in shapes.values())
    quantized = any(qtype(t) not in (QT.F16, QT.F32) for _, t, _ in order)
    counts: dict[str, int] = {}
    for t in ttypes.values():
        counts[t] = counts.get(t, 0) + 1
    main_t = max(counts, key=lambda t: (counts[t], type_bits(t)))

    def data(gname: str, t: str, shape) -> np.ndarray:
        if gname == "rope_freqs.weight":
            return np.asarray(factors, np.float32)
        if gname in lin_of:
            lin = lin_of[gname]
            w = s.linear(lin.hf_name)
            if w.shape != shape:
                raise ValueError(f"{lin.hf_name}: shape {w.shape}, expected {shape}")
            if not np.all(np.isfinite(w)):
                raise ValueError(f"{lin.hf_name}: non-finite weights")
            stem = gname.split(".")[2]
            if stem == "attn_q":
                w = permute_qk(w, spec.heads(lin.layer))
            elif stem == "attn_k":
                w = permute_qk(w, spec.kv_heads(lin.layer))
            im = _imatrix_for(imatrix, lin.hf_name, gname)
            cols = s.kept_columns(lin.hf_name)
            if im is not None and cols is not None and im.shape[0] != shape[1]:
                im = im[cols]   # statistics of the unpruned model, for the kept input columns
        else:
            w = s.dense(hf_of[gname])
            im = None
        q = qtype(t)
        if q == QT.F32:
            return np.ascontiguousarray(w, dtype=np.float32)
        if q == QT.F16:
            return np.ascontiguousarray(w, dtype=np.float16)
        if im is None and requires_imatrix(q):
            raise ValueError(f"{gname}: {q.name} needs an importance matrix, none given for this tensor")
        return quantize_tensor(np.asarray(w, np.float32), q, im)

    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH_PER_LAYER if spec.uneven else ARCH)
        add_llama_metadata(w, spec, name)
        w.add_file_type(getattr(gguf.LlamaFileType, _FTYPE.get(main_t, "GUESSED")))
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("wqedge.llamacpp.source", s.label)
        w.add_float32("wqedge.llamacpp.linear_bits", lin_bits)
        add_tokenizer_to_gguf(w, tok)
        for gname, t, shape in order:
            q = qtype(t)
            nb = nbytes(t, shape)
            if q == QT.F32:
                w.add_tensor_info(gname, shape, np.dtype(np.float32), nb)
            elif q == QT.F16:
                w.add_tensor_info(gname, shape, np.dtype(np.float16), nb)
            else:
                byte_shape = (*shape[:-1], nb // max(1, int(np.prod(shape[:-1]))))
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nb, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, t, shape in order:
            arr = data(gname, t, shape)
            if arr.nbytes != nbytes(t, shape):
                raise RuntimeError(f"{gname}: {arr.nbytes} bytes, expected {nbytes(t, shape)}")
            w.write_tensor_data(arr)
            if progress:
                progress(gname)
        w.close()
    return ExportResult(Path(out), ttypes, lin_bits, Path(out).stat().st_size, s.label, True, notes)
