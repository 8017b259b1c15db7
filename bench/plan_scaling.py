"""Planning cost against model size: seconds and units (column chunks) per second of the greedy planner.

Random-weight LLaMA models of growing width and depth are built on the spot (no download) and planned
with calibration text, on the CPU and, where one is available, on the GPU:

    python bench/plan_scaling.py [--sizes 256x2,512x4,1024x4] [--bits 3.0] [--device cpu,cuda]

Prints a Markdown table (and writes it to --out); no assertions: this is a benchmark.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from wqedge.alloc.planner import make_plan
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.tinymodel import build_tiny_model, tiny_corpus
from wqedge.units import enumerate_units

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256x2,512x4,1024x4", help="comma-separated HIDDENxLAYERS")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--device", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-seqs", type=int, default=8, help="calibration windows (of 256 tokens)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_scaling.md"))
    args = ap.parse_args()

    text = "\n".join(tiny_corpus(6000))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            hidden, layers = (int(x) for x in size.split("x"))
            path = build_tiny_model(Path(tmp) / size, hidden=hidden, n_layers=layers, n_heads=hidden // 64,
                                    n_kv_heads=max(1, hidden // 128), intermediate=int(hidden * 2.75) // 128 * 128)
            ckpt = LlamaCheckpoint.open(path)
            n_units = len(enumerate_units(ckpt.spec.linears(), 128))
            n_weights = sum(lin.out_features * lin.in_features for lin in ckpt.spec.linears())
            for dev in args.device.split(","):
                t0 = time.perf_counter()
                plan = make_plan(ckpt, args.bits, "greedy", calib_text=text, device=dev, progress=False,
                                 n_seqs=args.n_seqs, n_grad_seqs=args.n_seqs, seqlen=256, n_heldout=0)
                dt = time.perf_counter() - t0
                rows.append((size, n_weights, n_units, dev, dt, n_units / dt, plan.effective_bits()))
                print(rows[-1], flush=True)
    lines = [f"Greedy planning (calibration {args.n_seqs} x 256 tokens, damage table, knapsack) at {args.bits} bits, "
             f"G = 128, random-weight models built on the spot; torch threads {torch.get_num_threads()}.", "",
             "| model (hidden x layers) | linear weights | units | device | seconds | units/s | effective bits |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.3f} |" for r in rows]
    out = "\n".join(lines) + "\n"
    print(out)
    Path(args.out).write_text(out)


if __name__ == "__main__":
    main()
