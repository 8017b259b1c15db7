"""The bit-budget projection onto llama.cpp's stock types: an allocator for the llama.cpp target.

`project_types` chooses one ggml type per decoder linear so that the linears' bits per weight, counted
from tensor byte sizes, stay within a budget, each tensor as close as it can get to its target (the plan's
effective bits of that tensor, `plan_targets`). `preset_types` is llama-quantize's preset rules (Q4_K_M,
Q3_K_M, ...), `preset_embedding_types` its embedding and head types, `fit_type` its fallback chain for rows a
block does not divide. numpy + gguf only; the quantization itself is llama.cpp's, in wqedge.converters.llamacpp.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import gguf

from wqedge.spec import ModelSpec

QT = gguf.GGMLQuantizationType

# Stock types considered by the projection, most preferred first among equal sizes.
# (TQ1_0/TQ2_0 are for ternary-trained models and Q1_0 for binary ones: pass them in `types` to allow them.)
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K", "IQ3_S", "IQ3_XXS",
                 "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# What llama.cpp's llama-quantize substitutes when a tensor's row length is not a multiple of the block.
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ2_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
             "TQ1_0": "IQ4_NL", "TQ2_0": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def qtype(t) -> QT:
    if isinstance(t, QT):
        return t
    try:
        return QT[str(t).upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {t!r}") from None


def type_bits(t) -> float:
    """Bits per weight of a ggml type (block bytes * 8 / block elements)."""
    blk, nbytes = gguf.GGML_QUANT_SIZES[qtype(t)]
    return 8.0 * nbytes / blk


def fits(t, k: int) -> bool:
    """The type's block divides rows of k."""
    return k % gguf.GGML_QUANT_SIZES[qtype(t)][0] == 0


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
            if fits(t, k):
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


def fit_type(t: str, k: int) -> str:
    """llama-quantize's fallback chain for a type whose block does not divide k."""
    seen = []
    while not fits(t, k):
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


# The file type's base type: llama-quantize's default for tensors its rules do not name (the embedding table too).
PRESET_BASE = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
               "Q2_K": "Q2_K"}
# File types whose output head llama-quantize makes Q5_K (not Q6_K), and whose embeddings it makes Q2_K / IQ3_S.
_HEAD_Q5_K = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_EMBD_Q2_K = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")
_EMBD_IQ3_S = ("IQ2_S", "IQ2_M", "IQ3_XXS")


def preset_embedding_types(spec: ModelSpec, preset: str) -> tuple[str, str]:
    """(token_embd type, output head type) as llama-quantize chooses them for file type `preset` (a PRESETS name,
    or a stock type quantizing every linear, e.g. IQ2_XXS): the head Q6_K (Q8_0 in a Q8_0 file or when the base
    type's block does not divide the hidden size, Q5_K for the 1-2-bit i-quants); the embeddings the base type
    (Q2_K / IQ3_S for those i-quants), or the head's type when they are tied; each through `fit_type`. Without
    this a llama.cpp row would read an F16 head per token that llama-quantize's own file does not have."""
    base = PRESET_BASE.get(preset.upper()) or qtype(preset).name
    d = spec.hidden_size
    if base == "Q8_0" or d % gguf.GGML_QUANT_SIZES[qtype(base)][0]:
        out = "Q8_0"
    else:
        out = "Q5_K" if base in _HEAD_Q5_K else "Q6_K"
    embd = "Q2_K" if base in _EMBD_Q2_K else "IQ3_S" if base in _EMBD_IQ3_S else base
    if spec.tie_word_embeddings:
        embd = out
    return fit_type(embd, d), fit_type(out, d)


def plan_targets(plan, spec: ModelSpec) -> dict[str, float]:
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


def budget_types(spec: ModelSpec, bits_budget: float, plan=None, allowed=DEFAULT_TYPES) -> dict[str, str]:
    """gguf name -> stock type for every decoder linear of `spec`: the projection of `plan` (a Plan, its JSON or
    file; None: the budget alone) onto the `allowed` types within `bits_budget` (`project_types`). `allowed`: what
    the installed llama.cpp quantizes (wqedge.converters.llamacpp.available_types). Pass the result to
    export_llamacpp(tensor_types=...): the converter writes types, it does not choose them."""
    shapes = {lin.gguf_name: (lin.out_features, lin.in_features) for lin in spec.linears()}
    return project_types(shapes, float(bits_budget), plan_targets(plan, spec), list(allowed))
