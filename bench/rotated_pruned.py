"""RUQuant on a pruned model (issues 15 and 16): does rotation still do its job when the o and down transforms are
built on the kept heads and FFN channels? One pruning for every row, forced (the joint search keeps 0% on llama-s,
bench/results/pruning.md, so a plan with both would otherwise be a rotated unpruned one): the structures of least
loss-aware damage (wqedge.alloc.prune.select_pruning on wqedge.structure_damage) up to --fraction of the decoder
weights. For each setting, the same pruning is planned (greedy, the budget over the unpruned weights) and converted
(`wqedge convert`'s pipeline: error feedback) without and with --rotate; perplexity by wqedge eval's definition
(llama.cpp's: second half of each 512-token window) in our C++ runtime, float activations (the reference's
arithmetic; tests/test_rotated_pruned.py checks the runtime against the reference on such files).

    python bench/rotated_pruned.py [--fraction 0.1] [--windows 16] [--out bench/results/rotated_pruned]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from wqedge import pipeline
from wqedge.bench.report import add_fixture_args, write_markdown
from wqedge.checkpoint import LlamaCheckpoint

SETTINGS = (("W4A4", 4.25, 4), ("W4A8", 4.25, 8), ("2.5-bit weight-only", 2.5, 8))   # name, bits, act bits


def runtime_ppl(path: Path, text: Path, windows: int) -> float:
    p = subprocess.run([sys.executable, "-m", "wqedge", "eval", str(path), "--text", str(text), "--chunks", str(windows),
                        "--backend", "cpp"], capture_output=True, text=True, check=True,
                       env={**os.environ, "WQEDGE_ACT": "f32"})
    return float(re.search(r"^perplexity: ([0-9.]+)", p.stdout, re.M).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--fraction", type=float, default=0.10, help="decoder weights pruned (structures of least damage)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="bench_rotated_pruned")
    a = ap.parse_args()
    ckpt = LlamaCheckpoint.open(a.model)
    calib = Path(a.calib).read_text()
    from wqedge.alloc.planner import prepare
    from wqedge.alloc.prune import select_pruning
    from wqedge.structure_damage import structure_damage
    t0 = time.time()
    _, ctx = prepare(ckpt, 128, calib, 0, None, progress=False, stream_layers=False)
    sd = structure_damage(ctx.model, ctx.calib.train[: ctx.opts["n_grad_seqs"]], 32, device=ctx.device, batch_size=2)
    pruning = select_pruning(ckpt.spec, sd, a.fraction, ("ffn", "heads"))
    print(f"pruning: {sum(len(lp.ffn_groups) for lp in pruning.layers.values())} FFN groups, "
          f"{sum(len(lp.heads) for lp in pruning.layers.values())} query heads, "
          f"{sum(len(lp.kv_groups) for lp in pruning.layers.values())} KV groups ({time.time() - t0:.0f} s)", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(f"{out}_files")
    work.mkdir(exist_ok=True)
    rows = []
    for name, bits, act in SETTINGS:
        for rot in (False, True):
            t0 = time.time()
            plan = pipeline.make_plan(ckpt, bits, calib_text=calib, rotate=rot, act_bits=act, fixed_pruning=pruning,
                                      progress=False)
            path = work / f"{name.split()[0]}-{'rot' if rot else 'plain'}.gguf"
            pipeline.convert(ckpt, plan, path, calib_text=calib)
            ppl = runtime_ppl(path, Path(a.eval), a.windows)
            rows.append({"setting": name, "bits": bits, "act_bits": act, "rotated": rot, "ppl": ppl,
                         "effective_bits": plan.effective_bits(), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    out.with_suffix(".json").write_text(json.dumps({"pruning": pruning.to_dict(), "fraction": a.fraction,
                                                    "windows": a.windows, "rows": rows}, indent=1))
    md = [f"# RUQuant on a pruned llama-s ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
          f"`python bench/rotated_pruned.py --fraction {a.fraction} --windows {a.windows}`: {a.fraction:.0%} of the "
          "decoder weights pruned (least structure damage), the same pruning in every row; perplexity (llama.cpp's "
          f"definition, {a.windows} windows of eval.txt) in the C++ runtime, float activations.", "",
          "| setting | unrotated | rotated | change |", "|---|---|---|---|"]
    for name, _, _ in SETTINGS:
        p, r = (next(x["ppl"] for x in rows if x["setting"] == name and x["rotated"] == rot) for rot in (False, True))
        md.append(f"| {name} | {p:.4f} | {r:.4f} | {100 * (r / p - 1):+.2f}% |")
    write_markdown(md, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
