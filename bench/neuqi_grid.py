#!/usr/bin/env python3
"""Does NeUQI's coarser scale search (neuqi.FAST_GRID) change plans or files? (issue 13: conversion speed; the
damage table has since moved to TABLE_GRID, bench/table_grid.py: here both the table and error feedback are patched)

    python bench/neuqi_grid.py [--budgets 3.25,2.5] [--model DIR] [--calib FILE] [--eval FILE] [--windows 32]

Per budget: greedy plans from a damage table fitted with FULL_GRID and with FAST_GRID (seconds, chunks whose action
differs), then error-feedback files of (plan full, fits full), (plan fast, fits full), (plan fast, fits fast), each
scored by the C++ runtime (float activations) on the eval text: perplexity as llama.cpp defines it. No assertions.
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
    ap.add_argument("--budgets", default="3.25,2.5")
    ap.add_argument("--windows", type=int, default=32)
    a = ap.parse_args()
    ck = LlamaCheckpoint.open(a.model)
    calib, text = Path(a.calib).read_text(), Path(a.eval).read_text()
    native.set_activations("f32")
    full, fast, table = neuqi.FULL_GRID, neuqi.FAST_GRID, neuqi.TABLE_GRID

    def ppl(path):
        m = native.Model(path)
        toks = [m.bos_id] + list(m.tokenize(text, add_bos=False))
        return perplexity(native.NativeEvaluator(m, n_ctx=512), toks, m.bos_id, 512, a.windows, 1).perplexity

    with tempfile.TemporaryDirectory() as tmp:
        for budget in (float(b) for b in a.budgets.split(",")):
            plans = {}
            for name, grid in (("full", full), ("fast", fast)):
                neuqi.TABLE_GRID = grid         # the damage table's grid
                t = time.time()
                plans[name] = pipeline.make_plan(ck, budget, calib_text=calib, progress=False)
                print(f"{budget} plan, damage table on the {name} grid: {time.time() - t:.1f} s", flush=True)
            neuqi.TABLE_GRID = table
            acts = {k: [x for t in p.tensors for x in t.actions] for k, p in plans.items()}
            diff = sum(x != y for x, y in zip(acts["full"], acts["fast"]))
            print(f"{budget}: chunks with another action {diff}/{len(acts['full'])}", flush=True)
            for pname, gname in (("full", "full"), ("fast", "full"), ("fast", "fast")):
                neuqi.FAST_GRID = full if gname == "full" else fast   # error feedback's grid
                out = Path(tmp) / f"{budget}-{pname}-{gname}.gguf"
                t = time.time()
                pipeline.write_gguf(ck, plans[pname], out, calib_text=calib)
                dt = time.time() - t
                neuqi.FAST_GRID = fast
                print(f"{budget} plan {pname}, error-feedback fits on the {gname} grid: convert {dt:.1f} s, "
                      f"ppl {ppl(out):.4f}", flush=True)


if __name__ == "__main__":
    main()
