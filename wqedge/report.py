"""Plan reports: per-layer effective bits, per-projection bits, action histogram, and a PNG heatmap.

The heatmap has one row per decoder linear (layer by layer, q k v o gate up down) and one column per
chunk (left to right along the input dimension); each cell is coloured by its action (legend: the strip
at the bottom, in the traits table's order fp16, q8, q4, q3, q2, ternary, q1). The PNG is written with
numpy and zlib only (no matplotlib).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from . import blocks
from .plan import Plan

ACTION_COLORS = {          # RGB
    "fp16": (127, 0, 0),
    "q8": (228, 26, 28),
    "q4": (255, 127, 0),
    "q3": (255, 217, 47),
    "q2": (77, 175, 74),
    "ternary": (55, 126, 184),
    "q1": (106, 61, 154),
    "q4s": (191, 95, 0),       # the two-level kinds: a darker shade of their one-scale width
    "q3s": (191, 163, 35),
    "q2s": (51, 117, 49),
}
EMPTY = (255, 255, 255)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write uint8 [H, W, 3] as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path


def heatmap(plan: Plan, cell: int = 10, gap: int = 1) -> np.ndarray:
    """uint8 [H, W, 3]: rows = linears, columns = chunks, colour = action; a gap line between layers."""
    n_chunks = max(len(t.actions) for t in plan.tensors)
    layers = [int(t.name.split(".")[2]) for t in plan.tensors]
    rows_px = []
    for i, t in enumerate(plan.tensors):
        row = np.full((cell, n_chunks * cell, 3), 255, np.uint8)
        for c, a in enumerate(t.actions):
            row[:, c * cell:(c + 1) * cell - gap] = ACTION_COLORS.get(a, (0, 0, 0))
        row[cell - gap:, :] = 255
        rows_px.append(row)
        if i + 1 < len(plan.tensors) and layers[i + 1] != layers[i]:
            rows_px.append(np.full((2, n_chunks * cell, 3), 200, np.uint8))
    legend = np.full((cell + 4, n_chunks * cell, 3), 255, np.uint8)
    for k, a in enumerate(blocks.ACTION_NAMES):
        x0 = k * (cell + 4)
        if x0 + cell <= legend.shape[1]:
            legend[2:2 + cell, x0:x0 + cell] = ACTION_COLORS[a]
    img = np.concatenate(rows_px + [np.full((4, n_chunks * cell, 3), 255, np.uint8), legend], 0)
    return img


def projection_bits(plan: Plan) -> dict[str, float]:
    acc: dict[str, list[int]] = {}
    for t in plan.tensors:
        p = t.name.split(".")[-2]
        b, n = acc.setdefault(p, [0, 0])
        acc[p] = [b + t.bits(plan.group_size), n + plan.original_weights(t)]   # pruned weights: 0 bits
    return {k: b / n for k, (b, n) in acc.items()}


def pruning_lines(plan: Plan) -> list[str]:
    """Per layer, what a pruning plan removes (nothing for other plans)."""
    pr = plan.pruning
    if pr is None:
        return []
    n_layers = 1 + max(int(t.name.split(".")[2]) for t in plan.tensors)
    lines = ["pruned structures per layer (FFN channels in groups of "
             f"{pr.ffn_group_size}; query heads; KV groups with their query heads):"]
    for i in range(n_layers):
        lp = pr.layer(i)
        ch = pr.intermediate_size - len(pr.kept_channels(i))
        lines.append(f"  layer {i:3d}: FFN {ch:5d} of {pr.intermediate_size} channels, heads "
                     f"{pr.n_heads - len(pr.kept_heads(i))} of {pr.n_heads}, KV groups {len(lp.kv_groups)} of "
                     f"{pr.n_kv_heads}")
    return lines


def e2e_loss_label(ce: float) -> str:
    """The end-to-end distillation loss with text weight ce, as every report and progress line writes it."""
    return f"{1 - ce:g}·KL + {ce:g}·CE"


def fit_lines(meta: dict) -> list[str]:
    """How a plan's chunks are (in a plan) or were (in a file's plan) fitted: error feedback and light distillation,
    from meta["fit"] (docs/plan.md); nothing for a plan that records no fit."""
    fit = meta.get("fit") or {}
    if not fit:
        return []
    lines = ["fit: " + (f"error feedback (GPTQ-style) on {fit.get('n_seqs', '?')} calibration windows"
                        if fit.get("error_feedback") else "per-chunk fits (no error feedback)")]
    done, steps = fit.get("distilled"), int(fit.get("distill_steps", 0) or 0)
    n_windows = (done or {}).get("windows") or fit.get("distill_windows")
    windows = f" on {n_windows} windows" if n_windows else ""
    ce = fit.get("distill_ce") or (done or {}).get("e2e_ce")
    loss = f", loss {e2e_loss_label(ce)}" if ce else ""
    if done:
        codes = (f"codes trained ({done.get('codes_changed', 0):,} changed, in "
                 f"{done.get('layers_codes_trained', 0)} layers)" if done.get("code_lr") else "codes frozen")
        e2e = int(done.get("e2e_steps", 0))
        kept = "kept" if done.get("e2e_kept") else "dropped (it did not lower the held-out loss)"
        stage = f"; end-to-end {e2e} steps{loss}, {kept}" if e2e else ""
        lines.append(f"distilled: {steps} steps per decoder layer{windows}, {codes}{stage}")
    elif steps:
        extra = "".join([f", end-to-end {fit['distill_e2e']} steps" if fit.get("distill_e2e") else "",
                         ", codes frozen" if fit.get("distill_freeze_codes") else "", loss])
        lines.append(f"distillation when converted: {steps} steps per decoder layer{windows}{extra}")
    elif fit.get("distill_default"):
        lines.append(f"not distilled: {fit['distill_default']}")
    return lines


def text_report(plan: Plan) -> str:
    lines = [f"plan: allocator {plan.allocator}, group size {plan.group_size}, budget {plan.budget_bits} bits, "
             f"effective {plan.effective_bits():.4f} bits over {plan.n_weights():,} weights"]
    hist = plan.action_histogram()
    total = sum(hist.values())
    lines.append("chunks per action: " + ", ".join(f"{a} {n} ({100 * n / total:.1f}%)" for a, n in hist.items()))
    lines.append("effective bits per layer:")
    for layer, b in plan.layer_bits().items():
        lines.append(f"  layer {layer:3d}: {b:6.3f}")
    lines.append("effective bits per projection: " + ", ".join(f"{p} {b:.3f}" for p, b in projection_bits(plan).items()))
    lines += pruning_lines(plan)
    lines += fit_lines(plan.meta)
    if plan.meta.get("predicted_damage") is not None:
        lines.append(f"predicted loss increase: {plan.meta['predicted_damage']:.4f} nats/token ({plan.meta.get('damage')})")
    if plan.meta.get("seconds"):
        lines.append("planning seconds: " + ", ".join(f"{k} {v}" for k, v in plan.meta["seconds"].items()))
    return "\n".join(lines)


def write_report(plan: Plan, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write OUT.txt (text report) and OUT.png (heatmap); returns both paths."""
    txt = Path(f"{out_prefix}.txt")
    txt.write_text(text_report(plan) + "\n")
    png = write_png(Path(f"{out_prefix}.png"), heatmap(plan))
    return txt, png
