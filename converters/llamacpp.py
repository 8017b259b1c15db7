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
  * `export_llamacpp(src, out, bits_budget=b, plan=..., imatrix=...)` — one stock ggml type per
    decoder linear (Q8_0, Q6_K, Q5_K, Q4_K, IQ4_NL, Q4_0, Q3_K, Q2_K, IQ types ...), quantized by
    llama.cpp's own quantizer (`ggml_quantize_chunk` of libggml-base.so, shipped in llama-cpp-python,
    through ctypes) with an optional importance matrix (per-input-column diag(XᵀX)). The type of each
    tensor is the *projection* of a chunk-level plan (its per-tensor effective bits; without a plan,
    the budget itself) onto the stock types that fit the tensor (K-quants need K % 256 == 0), adjusted
    so that the decoder linears' bits per weight, counted from tensor byte sizes, are <= the budget.
  * `export_llamacpp(src, out, tensor_types={gguf_name: "Q4_K", ...})` — explicit types (presets such
    as `preset_types(spec, "Q4_K_M")`), with llama.cpp's fallbacks where K does not fit the block.

Embeddings and the output head stay F16 (as our runtime keeps them) unless `embed_type`/`output_type`
say otherwise; norms and rope_freqs are F32. Bits per weight are reported over the decoder linears,
the same accounting as `wqedge.effective_bits`.

`LlamaCppEvaluator` is the `logits_fn` of `wqedge.perplexity.perplexity` for llama.cpp (llama_cpp.Llama),
so llama.cpp's perplexity is computed with the one shared definition.
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

__all__ = [
    "DEFAULT_TYPES",
    "PRESETS",
    "ExportResult",
    "LlamaCppEvaluator",
    "available_types",
    "export_llamacpp",
    "ggml_library_path",
    "llamacpp_logits_fn",
    "measured_linear_bits",
    "permute_qk",
    "preset_types",
    "project_types",
    "quantize_tensor",
    "type_bits",
    "unpermute_qk",
]

ARCH = "llama"
QT = gguf.GGMLQuantizationType

# Stock types considered by the projection, most preferred first among equal sizes.
# (TQ1_0/TQ2_0 are for ternary-trained models and Q1_0 for binary ones: pass them in `types` to allow them.)
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K", "IQ3_S", "IQ3_XXS",
                 "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# What llama.cpp's llama-quantize substitutes when a tensor's row length is not a multiple of the block.
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ2_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
             "TQ1_0": "IQ4_NL", "TQ2_0": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
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
        return self.ckpt.linear_weight(hf_name).numpy()


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


def _qtype(t) -> QT:
    if isinstance(t, QT):
        return t
    try:
        return QT[str(t).upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {t!r}") from None


def type_bits(t) -> float:
    """Bits per weight of a ggml type (block bytes * 8 / block elements)."""
    blk, nbytes = gguf.GGML_QUANT_SIZES[_qtype(t)]
    return 8.0 * nbytes / blk


def _fits(t, k: int) -> bool:
    return k % gguf.GGML_QUANT_SIZES[_qtype(t)][0] == 0


# IQ1_M asserts on a missing importance matrix although ggml_quantize_requires_imatrix says no (llama.cpp 0.3.x)
_NEEDS_IMATRIX = {"IQ1_M"}


def requires_imatrix(t) -> bool:
    q = _qtype(t)
    return q.name in _NEEDS_IMATRIX or bool(_ggml().ggml_quantize_requires_imatrix(int(q)))


def available_types(types=DEFAULT_TYPES, imatrix: bool = False) -> list[str]:
    """The types of `types` that the installed llama.cpp quantizes (those needing an importance matrix only
    when one is given), in the given order."""
    lib = _ggml()
    out = []
    for t in types:
        try:
            q = _qtype(t)
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
    q = _qtype(t)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantize_tensor wants a 2-D array")
    n, k = w.shape
    if q == QT.F32:
        return w.view(np.uint8).reshape(n, 4 * k)
    if q == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(n, 2 * k)
    if not _fits(q, k):
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


# ================================================================ type projection

def project_types(shapes: Mapping[str, tuple[int, int]], bits_budget: float,
                  targets: Mapping[str, float] | None = None, types=None) -> dict[str, str]:
    """One stock type per tensor ({name: (N, K)}) with Σ bits <= bits_budget · Σ N·K.

    Each tensor starts at the largest type (by bits per weight) that fits its K and does not exceed its
    target (the plan's effective bits of that tensor; the budget when no target is given). Then, while
    over budget, the tensor furthest above its target (ties: the largest) steps down one size; then,
    while budget is left, the tensor furthest below its target steps up where it still fits. ValueError
    when even the smallest types exceed the budget.
    """
    types = list(types or DEFAULT_TYPES)
    targets = dict(targets or {})
    ladders: dict[str, list[tuple[float, str]]] = {}
    for name, (n, k) in shapes.items():
        by_bits: dict[float, str] = {}
        for t in types:  # first (most preferred) type of each size
            if _fits(t, k):
                by_bits.setdefault(type_bits(t), t)
        if not by_bits:
            raise ValueError(f"{name}: no type in {types} fits rows of {k}")
        ladders[name] = sorted(by_bits.items())  # ascending bits
    total_w = sum(n * k for n, k in shapes.values())
    cap = bits_budget * total_w * (1 + 1e-12)
    level: dict[str, int] = {}
    for name, lad in ladders.items():
        tgt = targets.get(name, bits_budget)
        ok = [i for i, (b, _) in enumerate(lad) if b <= tgt + 1e-9]
        level[name] = ok[-1] if ok else 0

    def bits(name, i=None):
        n, k = shapes[name]
        return ladders[name][level[name] if i is None else i][0] * n * k

    def excess(name):
        return ladders[name][level[name]][0] - targets.get(name, bits_budget)

    total = sum(bits(nm) for nm in shapes)
    while total > cap:
        down = [nm for nm in shapes if level[nm] > 0]
        if not down:
            raise ValueError(f"budget {bits_budget} bits per weight is below what the smallest allowed types "
                             f"reach ({total / total_w:.4f})")
        nm = max(down, key=lambda x: (excess(x), shapes[x][0] * shapes[x][1]))
        total -= bits(nm) - bits(nm, level[nm] - 1)
        level[nm] -= 1
    while True:
        up = [nm for nm in shapes if level[nm] + 1 < len(ladders[nm]) and excess(nm) < 0
              and total + bits(nm, level[nm] + 1) - bits(nm) <= cap]
        if not up:
            break
        nm = min(up, key=lambda x: (excess(x), -shapes[x][0] * shapes[x][1]))
        total += bits(nm, level[nm] + 1) - bits(nm)
        level[nm] += 1
    return {nm: ladders[nm][level[nm]][1] for nm in shapes}


def _fit_type(t: str, k: int) -> str:
    """llama-quantize's fallback chain for a type whose block does not divide k."""
    seen = []
    while not _fits(t, k):
        seen.append(t)
        t = _FALLBACK.get(t, "Q8_0" if t != "Q8_0" else "F16")
        if t in seen:
            return "F16"
    return t


PRESETS = ("Q8_0", "Q4_0", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K")


def preset_types(spec: ModelSpec, preset: str) -> dict[str, str]:
    """Decoder-linear types like llama-quantize's presets (its rules for attn_v / ffn_down, reduced to LLaMA
    without MoE): {gguf_name: type}. Fallbacks for rows the block does not divide are applied at export."""
    preset = preset.upper()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    L = spec.n_layers

    def more_bits(i):  # llama.cpp's use_more_bits(i_layer, n_layers)
        return i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2

    out = {}
    for lin in spec.linears():
        stem = lin.gguf_name.split(".")[2]
        i = int(lin.gguf_name.split(".")[1])
        t = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
             "Q2_K": "Q2_K"}[preset]
        if preset == "Q4_K_M" and stem in ("attn_v", "ffn_down") and more_bits(i):
            t = "Q6_K"
        elif preset == "Q3_K_M" and stem == "attn_v":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif preset == "Q3_K_M" and stem == "ffn_down":
            t = "Q5_K" if i < L // 16 else "Q4_K"
        elif preset == "Q3_K_M" and stem == "attn_output":
            t = "Q4_K"
        elif preset == "Q2_K" and stem == "attn_v" or preset == "Q2_K" and stem == "ffn_down":
            t = "Q3_K"
        out[lin.gguf_name] = t
    return out


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


def _plan_targets(plan, spec: ModelSpec) -> dict[str, float]:
    """Per decoder linear (gguf name), the plan's effective bits."""
    if plan is None:
        return {}
    from wqedge.plan import Plan
    if isinstance(plan, str) and plan.lstrip().startswith("{"):
        plan = Plan.from_dict(json.loads(plan))
    elif isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan, spec)
    elif isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    by_hf = {lin.hf_name: lin.gguf_name for lin in spec.linears()}
    return {by_hf[t.name]: t.bits(plan.group_size) / t.n_weights for t in plan.tensors if t.name in by_hf}


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


def export_llamacpp(src, out: str | os.PathLike, bits_budget: float | None = None, imatrix=None, *,
                    plan=None, tensor_types: Mapping[str, str] | Callable[[str, int, int], str] | None = None,
                    types=None, dtype: str = "f16", embed_type: str = "F16", output_type: str | None = None,
                    name: str | None = None, progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write `src` (checkpoint folder, LlamaCheckpoint or wqedge GGUF) as a llama.cpp `llama` GGUF at `out`.

    Decoder linears: explicit `tensor_types` ({gguf name: type} or fn(gguf_name, N, K) -> type) if given;
    else, with `bits_budget`, the projection of `plan` (a Plan, its JSON or file; for a wqedge GGUF source
    the file's own plan by default) or of the budget alone onto `types` (default DEFAULT_TYPES, filtered to
    what the installed llama.cpp has); else all `dtype` ("f16" or "f32"). `imatrix`: {HF or gguf name:
    per-input-column importance [K]} (diag(XᵀX) from wqedge.calib.layerwise_stats), passed to llama.cpp's quantizer.
    Embeddings are `embed_type` (F16, F32 or a stock type), the output head `output_type` (default: as the
    embeddings). The file is written atomically, one tensor in memory at a time.
    """
    s = _open_source(src)
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
            t = _qtype(t).name
            ft = _fit_type(t, shapes[nm][1])
            if ft != t:
                notes.append(f"{nm}: {t} does not fit rows of {shapes[nm][1]}, using {ft}")
            ttypes[nm] = ft
    elif bits_budget is not None:
        if plan is None and s.plan is not None:
            plan = s.plan
        targets = _plan_targets(plan, spec)
        allowed = available_types(types or DEFAULT_TYPES, imatrix=imatrix is not None)
        ttypes = project_types(shapes, float(bits_budget), targets, allowed)
    else:
        ttypes = {nm: base for nm in shapes}
    for t in set(ttypes.values()) | {embed_type, output_type or embed_type}:
        q = _qtype(t)
        if q not in (QT.F16, QT.F32) and q.name not in available_types((q.name,), imatrix=True):
            raise ValueError(f"the installed llama.cpp cannot quantize to {q.name}")
    if imatrix is None and any(requires_imatrix(t) for t in set(ttypes.values()) if _qtype(t) not in (QT.F16, QT.F32)):
        raise ValueError("a chosen type needs an importance matrix (imatrix=...)")

    tok = s.tokenizer()
    factors = rope_freq_factors(spec)
    hf_of = {g: hf for hf, g, _ in other_tensors(spec)}
    lin_of = {lin.gguf_name: lin for lin in linears}

    # tensor order as convert_hf_to_gguf writes LLaMA: embeddings, then layer by layer, then head
    order: list[tuple[str, str, tuple[int, ...]]] = []   # (gguf name, type, numpy shape)
    emb_t = _qtype(embed_type).name
    out_t = _qtype(output_type or embed_type).name
    order.append(("token_embd.weight", _fit_type(emb_t, spec.hidden_size), (spec.vocab_size, spec.hidden_size)))
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
        order.append(("output.weight", _fit_type(out_t, spec.hidden_size), (spec.vocab_size, spec.hidden_size)))

    def nbytes(t: str, shape) -> int:
        q = _qtype(t)
        blk, sz = gguf.GGML_QUANT_SIZES[q]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return rows * (shape[-1] // blk) * sz

    lin_bytes = sum(nbytes(ttypes[nm], shapes[nm]) for nm in shapes)
    lin_bits = 8.0 * lin_bytes / sum(n * k for n, k in shapes.values())
    quantized = any(_qtype(t) not in (QT.F16, QT.F32) for _, t, _ in order)
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
                w = permute_qk(w, spec.n_heads)
            elif stem == "attn_k":
                w = permute_qk(w, spec.n_kv_heads)
            im = _imatrix_for(imatrix, lin.hf_name, gname)
        else:
            w = s.dense(hf_of[gname])
            im = None
        q = _qtype(t)
        if q == QT.F32:
            return np.ascontiguousarray(w, dtype=np.float32)
        if q == QT.F16:
            return np.ascontiguousarray(w, dtype=np.float16)
        if im is None and requires_imatrix(q):
            raise ValueError(f"{gname}: {q.name} needs an importance matrix, none given for this tensor")
        return quantize_tensor(np.asarray(w, np.float32), q, im)

    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        add_llama_metadata(w, spec, name)
        w.add_file_type(getattr(gguf.LlamaFileType, _FTYPE.get(main_t, "GUESSED")))
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("wqedge.llamacpp.source", s.label)
        w.add_float32("wqedge.llamacpp.linear_bits", lin_bits)
        add_tokenizer_to_gguf(w, tok)
        for gname, t, shape in order:
            q = _qtype(t)
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


def measured_linear_bits(path, spec: ModelSpec | None = None) -> float:
    """8 x bytes of the decoder-linear tensors / their weights, read from a llama.cpp GGUF's tensor infos."""
    from wqedge.runtime.gguf_check import open_reader
    r = open_reader(path)
    total_b = total_w = 0
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in (
                "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            total_b += int(t.n_bytes)
            total_w += int(t.n_elements)
    return 8.0 * total_b / total_w


# ================================================================ llama.cpp as a logits_fn

class LlamaCppEvaluator:
    """wqedge.perplexity's logits_fn for llama.cpp: int32[B, T] -> float32[B, T, vocab].

    Each window is evaluated from an empty KV cache with logits for every position (llama_cpp.Llama with
    logits_all=True), exactly what the shared perplexity definition scores.
    """

    def __init__(self, model, n_ctx: int = 512, n_threads: int | None = None, n_batch: int = 512, verbose=False):
        if isinstance(model, (str, os.PathLike)):
            import llama_cpp
            model = llama_cpp.Llama(model_path=os.fspath(model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                    n_threads=n_threads, n_threads_batch=n_threads, logits_all=True,
                                    verbose=verbose)
        self.llm = model

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        w = np.asarray(windows, dtype=np.int32)
        if w.ndim == 1:
            w = w[None]
        B, T = w.shape
        if T > self.llm.n_ctx():
            raise ValueError(f"windows of {T} tokens exceed the context of {self.llm.n_ctx()}")
        out = np.empty((B, T, self.llm.n_vocab()), np.float32)
        for b in range(B):
            self.llm.reset()
            self.llm.eval([int(x) for x in w[b]])
            out[b] = self.llm.scores[:T]
        self.llm.reset()
        return out

    def greedy(self, prompt, n_new: int) -> list[int]:
        """Greedy continuation (argmax of llama.cpp's logits), n_new tokens, from an empty cache."""
        llm = self.llm
        llm.reset()
        toks = [int(x) for x in prompt]
        llm.eval(toks)
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        llm.reset()
        return out

    def close(self):
        c = getattr(self.llm, "close", None)
        if c:
            c()


def llamacpp_logits_fn(model, n_ctx: int = 512, n_threads: int | None = None) -> LlamaCppEvaluator:
    """The LogitsFn of wqedge.perplexity for a llama.cpp GGUF (path or llama_cpp.Llama)."""
    return LlamaCppEvaluator(model, n_ctx=n_ctx, n_threads=n_threads)
