"""Which calibration when the user gives none: none at all, text the model writes itself, or real text.

For each budget, the default pipeline of `wqedge convert` is run with each calibration source and the
written file is scored on held-out text (perplexity, llama.cpp's definition, through the PyTorch
reference on the file's dequantized weights):

* none          - uniform plan, NeUQI fits with uniform weights (what convert did without --calib);
* self, uniform - uniform plan, NeUQI fits weighted by diag(XᵀX) of self-generated text;
* self, uniform + feedback - uniform plan, error feedback (GPTQ) on self-generated text;
* self, greedy  - greedy plan + error feedback on self-generated text (wqedge.calib_source);
* real, greedy  - greedy plan + error feedback on real calibration text (convert --calib).

Prints a Markdown table and writes it to bench/results/calib_source.md.

    python bench/calib_source.py [--model ../shared/fixtures/llama-s] [--bits 4.25,3.25] [--windows 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer

from wqedge.alloc.planner import make_plan
from wqedge.alloc.uniform import uniform_plan
from wqedge.bench.report import write_markdown
from wqedge.calib import collect_stats
from wqedge.calib_source import DEFAULT_LENGTH, DEFAULT_SEQS, self_generated_text
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity
from wqedge.quant.feedback import quantize_checkpoint
from wqedge.quantize import convert_to_gguf
from wqedge.reference import load_reference, logits_fn
from wqedge.runtime.gguf_reader import WqGGUF

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(FIX / "llama-s"))
    ap.add_argument("--text", default=str(FIX / "text" / "eval.txt"), help="evaluation text")
    ap.add_argument("--calib", default=str(FIX / "text" / "calib.txt"), help="real calibration text ('' to skip)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--bits", default="4.25,3.25")
    ap.add_argument("--self-seqs", type=int, default=DEFAULT_SEQS)
    ap.add_argument("--self-len", type=int, default=DEFAULT_LENGTH)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="none,self-stats,self-feedback,self-greedy,real-greedy",
                    help="which rows to run (comma list; fp16 always)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "calib_source.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = LlamaCheckpoint.open(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    bos = ckpt.spec.bos_token_id
    ids = [bos] + tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    linears = ckpt.spec.linears()

    def ppl(path):
        model = load_reference(path) if path else ckpt.load_hf_model(torch.float32)
        return perplexity(logits_fn(model), ids, bos, 512, args.windows, batch_size=4).perplexity

    t0 = time.time()
    self_text = self_generated_text(ckpt, args.self_seqs, args.self_len)
    t_sample = time.time() - t0
    real_text = Path(args.calib).read_text() if args.calib else None
    self_stats = collect_stats(ckpt, self_text) if "self-stats" in args.rows else None

    rows = [("fp16 (as stored)", "-", 16.0, ppl(None), 0.0)]
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.gguf"

        def score(label, budget, plan, stats=None, fitted=None, t_start=None):
            convert_to_gguf(ckpt, plan, out, stats, fitted=fitted)
            dt = time.time() - t_start
            rows.append((label, budget, WqGGUF(out).measured_bits(), ppl(out), dt))
            print(rows[-1], flush=True)

        want = set(args.rows.split(","))
        for b in (float(x) for x in args.bits.split(",")):
            t = time.time()
            if "none" in want:
                score("none: uniform, NeUQI (uniform weights)", b, uniform_plan(linears, 128, b, "neuqi"), t_start=t)
            t = time.time()
            if "self-stats" in want:
                score("self: uniform, NeUQI (diag XᵀX)", b, uniform_plan(linears, 128, b, "neuqi"), self_stats,
                      t_start=t)
            t = time.time()
            if "self-feedback" in want:
                plan = uniform_plan(linears, 128, b, "neuqi")
                score("self: uniform + error feedback", b, plan, fitted=quantize_checkpoint(ckpt, plan, self_text),
                      t_start=t)
            for label, text in (("self", self_text), ("real", real_text)):
                if text is None or f"{label}-greedy" not in want:
                    continue
                t = time.time()
                plan = make_plan(ckpt, b, allocator="greedy", calib_text=text, progress=False)
                fitted = quantize_checkpoint(ckpt, plan, text)
                score(f"{label}: greedy + error feedback", b, plan, fitted=fitted, t_start=t)

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"`python bench/calib_source.py {' '.join(sys.argv[1:])}`, {when}. Model `{Path(args.model).name}`, "
             f"evaluation text `{Path(args.text).name}`, {args.windows} windows of 512, second half scored "
             f"(llama.cpp's definition), G = 128, torch threads {args.threads}. Self-generated calibration: "
             f"{args.self_seqs} x {args.self_len} tokens sampled from the model (seeded) in {t_sample:.1f} s "
             "(not counted in the rows' seconds).", "",
             "| calibration and pipeline | budget | effective bits (file) | perplexity | seconds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.1f} |" for r in rows]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
