"""Is a checkpoint over-confident? Perplexity of the fp model with its logits divided by temperatures T.

A quantized model distilled towards an over-confident teacher ends up softer than it, and perplexity rewards that:
it can then score below the fp model (smol-s in bench/results/distill_smol.md), which says nothing about how
faithful the quantization is. A well calibrated checkpoint scores best at T = 1 (llama-s: 6.263, 6.253 at 1.1).

    python bench/temperature.py [--model DIR] [--eval eval.txt] [--temperatures 1,1.1,1.2,1.35,1.5] [--windows 32]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from wqedge.bench.report import add_fixture_args
from wqedge.calib import tokenize_text
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fixture_args(ap)
    ap.add_argument("--temperatures", default="1,1.1,1.2,1.35,1.5")
    ap.add_argument("--windows", type=int, default=32)
    a = ap.parse_args(argv)
    ckpt = LlamaCheckpoint.open(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    tokens = tokenize_text(tok, Path(a.eval).read_text(encoding="utf-8"), bos)
    model = ckpt.load_hf_model(torch.float32).eval()
    print(f"{Path(a.model).name}: perplexity on {Path(a.eval).name} ({a.windows} windows of 512, second half)")
    print("| T | perplexity |\n|---|---|")
    for t in (float(x) for x in a.temperatures.split(",")):
        @torch.no_grad()
        def logits(win, t=t):
            return (model(torch.as_tensor(win, dtype=torch.long)).logits.float() / t).numpy()
        print(f"| {t:g} | {perplexity(logits, tokens, bos, 512, a.windows, batch_size=8).perplexity:.3f} |", flush=True)


if __name__ == "__main__":
    main()
