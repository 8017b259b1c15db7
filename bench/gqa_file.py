"""A random-weight q4 file of llama-s's shape with grouped-query attention (default: 8 query heads on 1 KV head, as
TinyLlama groups them), for attention timings at long context where llama-s itself (2 heads a KV head) does not show
how kernels treat a KV group (bench/results/decode_depth.md: the GQA-8 rows). Weights only (no calibration text);
time it with `wqedge-bench -m OUT/q4.gguf -p 3000 -n 48 -t 1 --act q8 --kv-bits f16|8|4`.

    python bench/gqa_file.py --out DIR [--kv-heads 1] [--heads 8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from wqedge import pipeline
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.tinymodel import build_tiny_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the checkpoint (model/) and q4.gguf")
    ap.add_argument("--heads", type=int, default=8, help="query heads (head_dim 64 at hidden 512)")
    ap.add_argument("--kv-heads", type=int, default=1, help="KV heads (a divisor of --heads)")
    ap.add_argument("--ctx", type=int, default=4096, help="max_position_embeddings: the longest prompt + decode")
    args = ap.parse_args()
    if args.heads % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads} does not divide --heads {args.heads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = LlamaCheckpoint.open(build_tiny_model(out / "model", hidden=512, n_layers=8, n_heads=args.heads,
                                                 n_kv_heads=args.kv_heads, intermediate=1408, vocab_size=8192,
                                                 tokenizer_vocab=1000, init="normal", dtype="float16",
                                                 max_position_embeddings=args.ctx))
    plan = pipeline.make_plan(ckpt, 0, preset="q4")
    path = pipeline.convert(ckpt, plan, out / "q4.gguf", calib_text=None, feedback=False).path
    print(path)


if __name__ == "__main__":
    main()
