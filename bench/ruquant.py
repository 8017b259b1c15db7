"""RUQuant stage 1 in PyTorch: perplexity of weight-and-activation quantized llama-s, with and without rotation.

Fake quantization throughout (wqedge.actquant): per transform group the input goes x -> T(x) -> per-token
asymmetric b-bit quantize-dequantize -> W' (folded through T, then weight-quantized with the existing
chunk fitter wqedge.quant.fit.fit_linear, min-max RTN at G = 128 unless stated). Attention products, the KV
cache, norms and the LM head stay float. Perplexity: wqedge.perplexity (llama.cpp's definition, second half
of 512-token windows), the first --windows windows of the evaluation text. Prints a Markdown table and
writes it to bench/results/ruquant.md.

    python bench/ruquant.py [--windows 6] [--calib-seqs 4]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from wqedge.actquant import fake_quant, quantize_model
from wqedge.bench.report import add_fixture_args, write_markdown
from wqedge.calib import calibration_tokens, tokenize_text
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity
from wqedge.quant import affine
from wqedge.quant.fit import dequantize_chunk, fit_linear
from wqedge.reference import logits_fn
from wqedge.rotation import Transform, build_model_transforms, group_activations, group_weights, learn_reflection
from wqedge.units import chunk_bounds

ROOT = Path(__file__).resolve().parents[1]
G = 128


def block_weights(action: str, method: str = "minmax"):
    """weight_fn for quantize_model: every chunk of W' fitted with `action` by the existing fitter."""
    def fn(name, w):
        chunks = fit_linear(w, [action] * len(chunk_bounds(w.shape[1], G)), G, method)
        return torch.cat([dequantize_chunk(c) for c in chunks], 1)
    return fn


def affine6_weights(name, w):
    """6-bit weights (no q6 block type exists): wqedge.quant.affine min-max per row of each 128-column chunk."""
    out = []
    for s, e in chunk_bounds(w.shape[1], G):
        c = w[:, s:e]
        sc, z = affine.minmax_params(c, 6)
        out.append(affine.dequantize(affine.quantize(c, sc, z, 6), sc, z))
    return torch.cat(out, 1)


def fixture_inputs(args, calib_seqs: int):
    """(checkpoint, evaluation tokens, BOS id, calibration windows of 512) from add_fixture_args' arguments."""
    ckpt = LlamaCheckpoint.open(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    bos = ckpt.spec.bos_token_id
    ids = tokenize_text(tok, Path(args.eval).read_text(), bos)
    return ckpt, ids, bos, calibration_tokens(tok, args.calib, n_seqs=calib_seqs, seqlen=512, n_heldout=0, bos_id=bos)


def act_error(acts, transforms, bits):
    """Mean over groups of ||x̂ - x||² / ||x||² of the calibration activations after T, at `bits`."""
    errs = []
    for k, x in acts.items():
        y = x if transforms is None else transforms[k].apply(x)
        errs.append(float((fake_quant(y, bits) - y).pow(2).sum() / y.pow(2).sum()))
    return sum(errs) / len(errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--calib-seqs", type=int, default=4, help="512-token calibration windows for the transforms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.6, help="SmoothQuant alpha")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the W4A4 and W16A4 rows")
    ap.add_argument("--stage2", type=int, default=0, metavar="STEPS",
                    help="also learn each group's global reflection for W4A4 (AdamW steps; 0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ruquant.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    ckpt, ids, bos, cal = fixture_inputs(args, args.calib_seqs)
    fp = ckpt.load_hf_model(torch.float32)

    t0 = time.time()
    acts = group_activations(fp, cal.train)
    t_acts = time.time() - t0
    t0 = time.time()
    rot = build_model_transforms(fp, acts, seed=args.seed)
    t_rot = time.time() - t0
    t0 = time.time()
    rot_s = build_model_transforms(fp, acts, seed=args.seed, smooth_alpha=args.alpha)
    t_rot_s = time.time() - t0
    smooth = {k: Transform.identity(t.dim) for k, t in rot_s.items()}
    for k, t in smooth.items():
        t.smooth = rot_s[k].smooth
    variants = {"none": None, "smooth": smooth, "rot": rot, "smooth+rot": rot_s}
    t_s2 = 0.0
    if args.stage2:
        t0 = time.time()
        variants["rot+stage2"] = {k: learn_reflection(t, acts[k], group_weights(fp, *k), act_bits=4, weight_bits=4,
                                                      steps=args.stage2, max_tokens=256, seed=args.seed)[0]
                                  for k, t in rot.items()}
        t_s2 = time.time() - t0
        print(f"stage 2: {t_s2:.1f} s", flush=True)
    print(f"activations {t_acts:.1f} s, stage 1 {t_rot:.1f} s, stage 1 + smoothing {t_rot_s:.1f} s", flush=True)

    def ppl(model):
        return perplexity(logits_fn(model), ids, bos, 512, args.windows, batch_size=4).perplexity

    weights = {"16": (None, "fp"), "q8": (block_weights("q8"), "q8 min-max G128"),
               "w6": (affine6_weights, "6-bit affine min-max G128"), "q4": (block_weights("q4"), "q4 min-max G128"),
               "q3": (block_weights("q3"), "q3 min-max G128"), "q2": (block_weights("q2"), "q2 min-max G128")}
    settings = [("W16A8", "16", 8), ("W16A6", "16", 6), ("W16A4", "16", 4), ("W6A6", "w6", 6),
                ("W4A16", "q4", None), ("W4A8", "q4", 8), ("W4A4", "q4", 4),
                ("W4A4 clip 0.9", "q4", 4), ("W3A16", "q3", None), ("W2A16", "q2", None)]
    stage1 = ["none", "smooth", "rot", "smooth+rot"]
    tvars = {"W4A4": list(variants), "W6A6": stage1, "W16A4": list(variants)}
    if args.quick:
        settings = [s for s in settings if s[0] in ("W16A4", "W4A4")]

    fp_ppl = ppl(fp)
    print(f"fp16 {fp_ppl:.4f}", flush=True)
    rows = [("fp16 (as stored, fp32 compute)", "fp", "-", "-", fp_ppl)]
    for label, wkey, abits in settings:
        wfn, wdesc = weights[wkey]
        for v in tvars.get(label, ["none", "rot"]):
            t0 = time.time()
            clip = 0.9 if "clip 0.9" in label else 1.0
            model = quantize_model(copy.deepcopy(fp), variants[v], abits, wfn, clip=clip)
            p = ppl(model)
            rows.append((label, wdesc, "-" if abits is None else f"A{abits} per token", v, p))
            print(f"{label} {v}: {p:.4f} ({time.time() - t0:.0f} s)", flush=True)
            del model

    err = {v: {b: act_error(acts, variants[v], b) for b in (8, 6, 4)} for v in variants}
    lines = [f"# RUQuant stage 1 (PyTorch fake quantization), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"Command: `python {' '.join(sys.argv)}` (torch {torch.__version__}, {args.threads} threads, "
             f"total {time.time() - t_start:.0f} s).", "",
             f"Model `{Path(args.model).name}`, text `{Path(args.eval).name}`: perplexity in llama.cpp's definition "
             f"(512-token windows, second half scored) over the **first {args.windows} windows** only "
             f"(the fixture's reference figures use 32, so absolute values differ from 6.263). Transforms from "
             f"{cal.train.shape[0]} calibration windows of 512 tokens of `{Path(args.calib).name}` (BOS position left "
             f"out), seed {args.seed}, B = 128, K = 16 reflections, 3 Givens rounds, zig-zag, second block matrix, "
             f"global Householder; smoothing alpha = {args.alpha}. Activations: per token, asymmetric, integer zero point, "
             "no clipping (except the rows marked clip 0.9: range 0.9·[min, max], as the paper uses at A4), at the input of every decoder linear (attention products, KV cache, LM head float). "
             "Weights: folded through T, then fitted by `wqedge.quant.fit.fit_linear` (min-max RTN, G = 128) "
             "except the 6-bit row (no q6 block type: `wqedge.quant.affine` min-max, 6 bits, G = 128).", "",
             f"Stage-1 build time: {t_rot:.1f} s (with smoothing {t_rot_s:.1f} s) for {len(rot)} groups, plus "
             f"{t_acts:.1f} s gathering activations."
             + (f" Stage 2 (rows `rot+stage2`: global reflection learnt per group for W4A4, {args.stage2} AdamW "
                f"steps, lr 1e-2, 256 calibration tokens, output error of the group's linears with straight-through "
                f"min-max quantizers): {t_s2:.1f} s." if args.stage2 else ""), "",
             "| setting | weights | activations | transform | perplexity | vs fp16 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.4f} | {100 * (r[4] / fp_ppl - 1):+.2f}% |" for r in rows]
    lines += ["", "Relative activation quantization error ||x̂ - x||² / ||x||² on the calibration activations "
              "(mean over the 32 groups, after the transform):", "",
              "| transform | A8 | A6 | A4 |", "|---|---|---|---|"]
    lines += [f"| {v} | {e[8]:.2e} | {e[6]:.2e} | {e[4]:.2e} |" for v, e in err.items()]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
