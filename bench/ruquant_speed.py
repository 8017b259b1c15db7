"""Decode speed of rotated files (RUQuant; `--methods ruquant,hadamard` adds the data-free Hadamard method) vs the
same model unrotated, through the C++ runtime's wqedge-bench (issue 15): the transforms' overhead per token. Made for a quiet many-core machine (bench/results/ruquant_speed.txt
was run on the device machine): a random-weight model of llama-s's shape (hidden 512, 8 layers, 8/4 heads,
FFN 1408, vocab 8192) is built on the spot, converted twice with preset q4 (weights-only fits; the rotated one
with --rotate transforms built from text the tiny corpus gives), and `wqedge-bench` runs both files alternately.
--shape tinyllama builds TinyLlama-1.1B's shape instead (hidden 2048, 22 layers, GQA 32/4, FFN 5632, vocab 32000):
the transforms cost 2·d·B multiply-adds per group and token against the linears' ~d² weights, so their share of
decode falls with the width, and llama-s is the worst case.

--act-bits 4 (or 6) writes every file with that activation quantization, the unrotated one too, so the comparison is
W4A4 rotated against W4A4 unrotated: at 4 and 6 bits the transforms' block products stay float (docs/ruquant.md).

    python bench/ruquant_speed.py --bench cpp/build/wqedge-bench --out DIR [--shape llama-s|tinyllama]
        [--threads 1,4] [--reps 5] [--act-bits 8|6|4] [--device cuda] [--blocks 64,128]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from wqedge import pipeline
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.tinymodel import build_tiny_model, tiny_corpus

SHAPES = {"llama-s": dict(hidden=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate=1408, vocab_size=8192),
          "tinyllama": dict(hidden=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate=5632, vocab_size=32000)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="path to the wqedge-bench executable")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two files")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-s")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (-p of wqedge-bench)")
    ap.add_argument("--decode", type=int, default=128, help="decoded tokens (-n of wqedge-bench)")
    ap.add_argument("--methods", default="ruquant", help="rotation methods to convert and time beside the plain file "
                    "(comma list of ruquant, hadamard)")
    ap.add_argument("--device", default=None, help="torch device for the two conversions (cuda: the GPU of the device machine)")
    ap.add_argument("--act-bits", type=int, choices=(8, 6, 4), default=8,
                    help="activation bits of every file (default 8: int8 block products on AVX-512 VNNI)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep files already in --out from an earlier run of the same settings (the model is rebuilt "
                         "the same from its seed), converting only the missing ones")
    ap.add_argument("--blocks", default=None,
                    help="RUQuant's block sizes B, comma-separated: one rotated file each, named rotated-bB (default: "
                         "wqedge.rotation.BLOCK, named rotated); the transforms cost 2 d B multiply-adds per group and "
                         "token and B^2 bytes per stage matrix")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = LlamaCheckpoint.open(build_tiny_model(out / "model", **SHAPES[args.shape], tokenizer_vocab=1000,
                                                    init="normal", dtype="float16"))
    text = " ".join(tiny_corpus(3000))
    files = {}
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else [None]
    variants = [(False, None)] + [(m, b) for m in args.methods.split(",") for b in (blocks if m == "ruquant" else [None])]
    for rot, block in variants:
        cal = text if rot == "ruquant" else None     # the hadamard method is data-free
        tag = f"-b{block}" if block else ""
        name = {False: "plain", "ruquant": "rotated"}.get(rot, rot) + tag
        suffix = "" if args.act_bits == 8 else f"-a{args.act_bits}"
        path = out / f"q4-{'rot' if rot == 'ruquant' else rot or 'plain'}{tag}{suffix}.gguf"
        if args.reuse and path.exists():
            files[name] = path
            continue
        plan = pipeline.make_plan(ckpt, 0, preset="q4", calib_text=cal, rotate=rot, device=args.device,
                                  act_bits=args.act_bits, rotate_block=block)
        files[name] = pipeline.convert(ckpt, plan, path, calib_text=cal, feedback=False, device=args.device).path
    res = []
    for t in [int(x) for x in args.threads.split(",")]:
        for r in range(args.rounds):
            for name, path in files.items():
                p = subprocess.run([args.bench, "-m", str(path), "-p", str(args.prompt), "-n", str(args.decode), "-r", str(args.reps),
                                    "-t", str(t), "--act", "q8", "--json"], capture_output=True, text=True, check=True)
                row = {"file": name, "threads": t, "round": r, **json.loads(p.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                res.append(row)
    (out / "ruquant_speed.json").write_text(json.dumps(res, indent=1))
    for t in sorted({r["threads"] for r in res}):
        best = {n: min(r["decode_cpu_ms_per_token"]
                       for r in res if r["file"] == n and r["threads"] == t) for n in files}
        print(f"{t} thread(s), best ms/token: " + ", ".join(
            f"{n} {v:.3f}" + ("" if n == "plain" else f" ({100 * (v / best['plain'] - 1):+.1f}%)")
            for n, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
