"""Uniform quantization quality on a real model: fp16 vs min-max vs NeUQI at 4, 3 and 2 bits.

Every row goes through the whole product path: plan -> quantize -> GGUF written to disk -> read back
-> PyTorch reference -> perplexity (llama.cpp's definition). Prints a Markdown table and writes it to
bench/results/uniform_quality.md.

    python bench/uniform_quality.py [--model ../shared/fixtures/llama-s] [--calib ../shared/fixtures/text/calib.txt]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from wqedge.alloc.uniform import uniform_plan
from wqedge.bench.report import write_markdown
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity
from wqedge.pipeline import write_gguf
from wqedge.reference import load_reference, logits_fn
from wqedge.runtime.gguf_reader import WqGGUF

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(FIX / "llama-s"))
    ap.add_argument("--text", default=str(FIX / "text" / "eval.txt"))
    ap.add_argument("--calib", default=str(FIX / "text" / "calib.txt"), help="'' to skip the calibrated NeUQI rows")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "uniform_quality.md"))
    args = ap.parse_args()

    ckpt = LlamaCheckpoint.open(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = [tok.bos_token_id] + tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    bos = ckpt.spec.bos_token_id

    def ppl(model):
        return perplexity(logits_fn(model), ids, bos, 512, args.windows, batch_size=4).perplexity

    stats = calib_text = None
    if args.calib:
        from wqedge.calib import collect_stats
        calib_text = Path(args.calib).read_text()
        t0 = time.time()
        stats = collect_stats(ckpt, calib_text)
        print(f"calibration: {time.time() - t0:.1f} s")

    rows = [("fp16 (as stored)", "-", 16.0, ppl(ckpt.load_hf_model(torch.float32)), 0.0)]
    print(rows[-1])
    actions = {"4": "q4", "3": "q3", "2": "q2"}
    variants = [("min-max RTN", "minmax", None), ("NeUQI (uniform weights)", "neuqi", None)]
    if stats is not None:
        variants.append(("NeUQI (diag XᵀX from calib)", "neuqi", stats))
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.bits.split(","):
            for label, method, st in variants:
                plan = uniform_plan(ckpt.spec.linears(), 128, 16.0, method, action=actions[b],
                                    model_fingerprint=ckpt.fingerprint())
                t0 = time.time()
                path = write_gguf(ckpt, plan, Path(tmp) / "m.gguf", calib_text if st is not None else None, stats=st)
                dt = time.time() - t0
                bits = WqGGUF(path).measured_bits()
                rows.append((label, actions[b], bits, ppl(load_reference(path)), dt))
                print(rows[-1], flush=True)

    lines = [f"Model `{Path(args.model).name}`, text `{Path(args.text).name}`, {args.windows} windows of 512, "
             "second half scored (llama.cpp's definition). G = 128. Each quantized row was written to a GGUF, "
             "read back and evaluated through the PyTorch reference.", "",
             "| quantizer | action | effective bits (file) | perplexity | convert time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.1f} |" for r in rows]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
