#!/usr/bin/env python3
"""How many calibration windows does error feedback need? (issue 13: "llama-s with calibration <= 90 s on 2 cores")

    python bench/feedback_windows.py [--budgets 3.25,2.5] [--counts 32,64,128,256] [--model DIR] [--calib FILE]
        [--eval FILE] [--windows 32] [--device cuda]

Error feedback (wqedge/quant/feedback.py) runs two forward passes per decoder layer over its windows: on 2 CPU
cores its 256 windows of 512 tokens are most of a conversion's time. Per budget this plans once (greedy, the
default pipeline), then fits the same plan with error feedback on each window count and scores the written file
with the PyTorch reference of the GGUF (perplexity on the eval text, llama.cpp's definition: second halves of
512-token windows). The quality figures are what chooses feedback.FEEDBACK_SEQS; the seconds compare only with
each other (same device, same run). No assertions: this is a benchmark.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wqedge.alloc.planner import make_plan  # noqa: E402
from wqedge.bench.report import add_fixture_args, write_markdown  # noqa: E402
from wqedge.calib import default_device  # noqa: E402
from wqedge.checkpoint import LlamaCheckpoint  # noqa: E402
from wqedge.perplexity import perplexity  # noqa: E402
from wqedge.quant.feedback import quantize_checkpoint  # noqa: E402
from wqedge.quantize import convert_to_gguf  # noqa: E402
from wqedge.reference import load_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--budgets", default="3.25,2.5")
    ap.add_argument("--counts", default="32,64,128,256", help="error-feedback windows to compare")
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows")
    ap.add_argument("--device", default=None)
    ap.add_argument("--grad-seqs", type=int, default=None, help="the planner's LM-gradient windows (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "feedback_windows.md"))
    a = ap.parse_args()
    dev = default_device(a.device)
    ck = LlamaCheckpoint.open(a.model)
    calib, text = Path(a.calib).read_text(), Path(a.eval).read_text()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ck.spec.bos_token_id if ck.spec.bos_token_id is not None else 1
    eval_tokens = [bos] + tok(text, add_special_tokens=False)["input_ids"]

    def ppl(path) -> float:
        model = load_reference(path).to(dev)

        def fn(win):
            with torch.inference_mode():
                return model(torch.from_numpy(np.asarray(win, dtype=np.int64)).to(dev)).logits.float().cpu().numpy()
        return perplexity(fn, eval_tokens, bos, 512, a.windows, batch_size=8).perplexity

    grad = "" if a.grad_seqs is None else f" --grad-seqs {a.grad_seqs}"
    lines = [f"# Error-feedback windows against quality (`bench/feedback_windows.py --budgets {a.budgets} --counts "
             f"{a.counts} --windows {a.windows}{grad}`, device {dev})", "",
             f"{Path(a.model).name}, greedy plans from {Path(a.calib).name} (planned once per budget), error-feedback "
             f"fits on N windows of 512 tokens drawn as the pipeline draws them (evenly spaced over the text); perplexity of the written "
             f"file through the PyTorch reference on {Path(a.eval).name}, {a.windows} windows.", "",
             "| budget | feedback windows | fit s | ppl |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (float(b) for b in a.budgets.split(",")):
            opts = {} if a.grad_seqs is None else {"n_grad_seqs": a.grad_seqs}
            plan = make_plan(ck, budget, "greedy", calib_text=calib, device=dev, progress=False, **opts)
            for n in (int(c) for c in a.counts.split(",")):
                t = time.time()
                fitted = quantize_checkpoint(ck, plan, calib, device=dev, n_seqs=n)
                dt = time.time() - t
                out = Path(tmp) / f"{budget}-{n}.gguf"
                convert_to_gguf(ck, plan, out, None, dev, fitted=fitted)
                p = ppl(out)
                lines.append(f"| {budget} | {n} | {dt:.1f} | {p:.4f} |")
                print(lines[-1], flush=True)
    write_markdown(lines, a.out)


if __name__ == "__main__":
    main()
