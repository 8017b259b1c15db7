#!/usr/bin/env python3
"""Which NeUQI scale grid the damage table should fit with (issue 13: conversion in minutes).

    python bench/table_grid.py [--budgets 4.25,3.25] [--grids fast=16,256,8 table=8,128,4] [--which TABLE_GRID]
        [--model DIR] [--calib FILE] [--eval FILE] [--windows 32]

The table only ranks actions; error feedback fits the file's chunks again (neuqi.FAST_GRID). Per budget and per
table grid (neuqi.TABLE_GRID patched for the run): the greedy plan's table seconds, the chunks whose action differs
from the first grid's plan, then the file as `wqedge convert` writes it (error feedback on the calibration text,
default actions for the budget) scored by the C++ runtime (float activations) on the eval text. --which SUB_GRID
varies error feedback's grid for the two-level kinds' sub-blocks instead (the plans are then the same). No
assertions.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wqedge import pipeline  # noqa: E402
from wqedge.bench.report import add_fixture_args  # noqa: E402
from wqedge.checkpoint import LlamaCheckpoint  # noqa: E402
from wqedge.perplexity import perplexity  # noqa: E402
from wqedge.quant import neuqi  # noqa: E402
from wqedge.runtime import native  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="4.25,3.25")
    ap.add_argument("--grids", nargs="+", default=["fast=16,256,8", "table=8,128,4"],
                    help="NAME=coarse,fine,radius (the first is the reference)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--which", default="TABLE_GRID", choices=["TABLE_GRID", "SUB_GRID"],
                    help="the neuqi grid constant the runs vary")
    a = ap.parse_args()
    ck = LlamaCheckpoint.open(a.model)
    calib, text = Path(a.calib).read_text(), Path(a.eval).read_text()
    native.set_activations("f32")
    grids = [(g.split("=")[0], tuple(int(x) for x in g.split("=")[1].split(","))) for g in a.grids]
    default = getattr(neuqi, a.which)

    def ppl(path):
        m = native.Model(path)
        toks = [m.bos_id] + list(m.tokenize(text, add_bos=False))
        return perplexity(native.NativeEvaluator(m, n_ctx=512), toks, m.bos_id, 512, a.windows, 1).perplexity

    print(f"model {a.model}, calibration {a.calib}, eval {a.eval} ({a.windows} windows)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (float(b) for b in a.budgets.split(",")):
            ref = None
            for name, grid in grids:
                setattr(neuqi, a.which, grid)
                try:
                    t = time.time()
                    plan = pipeline.make_plan(ck, budget, calib_text=calib, progress=False)
                    dt = time.time() - t
                    acts = [x for tt in plan.tensors for x in tt.actions]
                    diff = "" if ref is None else f", {sum(x != y for x, y in zip(ref, acts))}/{len(acts)} chunks differ"
                    ref = ref or acts
                    out = Path(tmp) / f"{budget}-{name}.gguf"
                    t = time.time()
                    pipeline.write_gguf(ck, plan, out, calib_text=calib)
                    ft = time.time() - t
                finally:
                    setattr(neuqi, a.which, default)
                print(f"{budget} b, {a.which} {name} {grid}: plan {dt:.1f} s{diff}, fitting {ft:.1f} s, "
                      f"ppl {ppl(out):.4f}", flush=True)


if __name__ == "__main__":
    main()
