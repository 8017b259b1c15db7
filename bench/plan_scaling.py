#!/usr/bin/env python3
"""Conversion cost against model size (issue 13, "planning that scales with the model"): wall seconds per stage
and peak host memory of one whole `wqedge convert` (calibration, gradients, damage table, knapsack, error-feedback
fitting, writing), for random-weight LLaMA models of named real shapes built on the spot (no download).

    python bench/plan_scaling.py [--shapes llama-s,smollm-135m,tinyllama-1.1b] [--device cpu|cuda]
        [--calib FILE] [--bits 3.25] [--threads 2] [--out FILE]

Each conversion runs in its own process (bench/convert_cost.py's convert_once: stage times from the CLI's own
lines, the child's peak RSS from wait4). Random weights make the quality meaningless but not the cost, which
depends on shapes only. Targets (issue 13): a 0.1 B model <= 5 min on 2 CPU cores; a 1.1B-shaped model <= 5 min on
one GPU in <= 6 GB of host memory. The projection for 7B/70B scales each stage by the work it does (see
`project`). No assertions: this is a benchmark.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from convert_cost import convert_once  # noqa: E402

# name: hidden, layers, heads, kv heads, intermediate, vocab, tied (the real checkpoints' shapes)
SHAPES = {
    "llama-s": (512, 8, 8, 4, 1408, 8192, False),            # the fixture's shape
    "smollm-135m": (576, 30, 9, 3, 1536, 49152, True),       # hidden not a multiple of 128, GQA, tied
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, False),
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000, False),   # projection only (not built here)
    "llama-3-70b": (8192, 80, 64, 8, 28672, 128256, False),
}


def linears(shape) -> list[tuple[int, int]]:
    """(N out, K in) of every decoder linear."""
    hidden, layers, heads, kv, inter, _, _ = shape
    hd = hidden // heads
    one = [(heads * hd, hidden), (kv * hd, hidden), (kv * hd, hidden), (hidden, heads * hd),
           (inter, hidden), (inter, hidden), (hidden, inter)]
    return one * layers


def linear_weights(shape) -> int:
    return sum(n * k for n, k in linears(shape))


def chunks(shape, group: int = 128) -> int:
    return sum(math.ceil(k / group) for _, k in linears(shape))


def gptq_work(shape) -> int:
    """Σ N·K² + K³: GPTQ's column updates and the Cholesky factorisation of each linear."""
    return sum(n * k * k + k ** 3 for n, k in linears(shape))


def column_steps(shape) -> int:
    """Σ K: error feedback's sequential column steps (on a GPU each is a fixed number of kernel launches)."""
    return sum(k for _, k in linears(shape))


def build(name: str, where: Path) -> Path:
    from wqedge.tinymodel import build_tiny_model
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[name]
    return build_tiny_model(where / name, hidden=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                            intermediate=inter, vocab_size=vocab, tie_embeddings=tied, dtype="float16",
                            tokenizer_vocab=min(vocab, 4000), init="normal")


def project(row: dict, measured: str, target: str, device: str = "cpu") -> tuple[float, float]:
    """(low, high) seconds for `target`, each stage scaled from a measured row by the work it does: input
    statistics and gradients are passes over a fixed number of tokens (∝ linear weights); the damage table fits
    at most max_rows rows of every chunk x action (∝ chunks); fitting on CPU cores is between ∝ linear weights
    (NeUQI fits and forward passes over the feedback windows: low) and ∝ Σ N·K² + K³ (GPTQ's updates: high); on a
    GPU it is launch-bound, ∝ Σ K column steps (low; measured 0.73 ms a step on llama-s, 0.57 on SmolLM-135M),
    up to ∝ weights (high, once the steps become compute-bound). Same device as the measured row."""
    m, t = SHAPES[measured], SHAPES[target]
    r = linear_weights(t) / linear_weights(m)
    fixed = (row.get("inputs", 0) + row.get("gradients", 0)) * r + row.get("damage table", 0) * chunks(t) / chunks(m)
    fit = row.get("fitting", 0)
    if device == "cuda":
        return fixed + fit * column_steps(t) / column_steps(m), fixed + fit * r
    return fixed + fit * r, fixed + fit * gptq_work(t) / gptq_work(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-s,smollm-135m")
    ap.add_argument("--device", default=None, help="planning device (default: cuda if available, else cpu)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the fixture's calib.txt)")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    a = ap.parse_args()
    calib = a.calib or str(Path(os.environ.get("WQEDGE_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "text" / "calib.txt")
    if not Path(calib).is_file():
        raise SystemExit(f"calibration text {calib} not found (--calib FILE)")
    extra = ["--device", a.device] if a.device else []
    head = (f"# bench/plan_scaling.py --shapes {a.shapes} --bits {a.bits} --device {a.device or 'default'} "
            f"--threads {a.threads}; host {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(head, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes.split(","):
            path = build(name, Path(tmp))
            row = convert_once(ROOT, str(path), Path(tmp) / f"{name}.gguf", calib, a.bits, a.threads, extra=extra)
            row["name"], row["weights"] = name, linear_weights(SHAPES[name])
            rows.append(row)
            print(f"{name}: total {row['total']:.1f} s, peak RSS {row['rss_mib']:.0f} MiB; "
                  + ", ".join(f"{k} {row[k]:.1f}" for k in ("inputs", "gradients", "damage table", "plan", "fitting")
                              if k in row), flush=True)
            for shp in (path / "model.safetensors", ):
                if shp.exists():
                    shp.unlink()
    cols = ("inputs", "gradients", "damage table", "plan", "fitting", "total")
    lines = [head, "", "| shape | linear weights | " + " | ".join(f"{c} s" for c in cols) + " | peak RSS MiB |",
             "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['weights'] / 1e6:.0f} M | "
                     + " | ".join("-" if r.get(c) is None else f"{r[c]:.1f}" for c in cols) + f" | {r['rss_mib']:.0f} |")
    big = max(rows, key=lambda r: r["weights"])
    lines += ["", f"Projection from {big['name']} on the same device (`project`: statistics and gradients ∝ linear "
              "weights, damage table ∝ chunks, fitting ∝ Σ K column steps on a GPU up to ∝ weights; on CPU cores "
              "between ∝ weights and ∝ Σ N·K² + K³):", "",
              "| shape | linear weights | projected s |", "|---|---|---|"]
    for t in [n for n in SHAPES if linear_weights(SHAPES[n]) > big["weights"]]:
        lo, hi = project(big, big["name"], t, "cuda" if (a.device or "").startswith("cuda") else "cpu")
        lines.append(f"| {t} | {linear_weights(SHAPES[t]) / 1e9:.1f} B | {lo:.0f} – {hi:.0f} |")
    out = "\n".join(lines) + "\n"
    print(out)
    if a.out:
        Path(a.out).write_text(out)


if __name__ == "__main__":
    main()
