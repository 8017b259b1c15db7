"""RUQuant stage 1 vs the data-free Hadamard rotation (`--rotate hadamard`), in PyTorch fake quantization.

The same harness as bench/ruquant.py (wqedge.actquant.quantize_model: per group x -> T(x) -> per-token b-bit
fake quantization -> W' folded through T, weights min-max RTN at G = 128 by the chunk fitter), on llama-s:
  none      no transform
  ruquant   RUQuant stage 1 (wqedge.rotation, from 4 calibration windows)
  residual  the offline part of the Hadamard method alone: residual stream and heads rotated, norms folded
            (wqedge.residual_rotation.ResidualRotation), nothing online
  hadamard  residual + the online block Hadamard on down_proj's input (wqedge.residual_rotation.hadamard_transforms:
            what `wqedge convert --rotate hadamard` writes)
Perplexity: llama.cpp's definition over the first --windows windows of the evaluation text.

    python bench/rotation_methods.py [--windows 6] [--out bench/results/rotation_methods_fakequant.md]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ruquant import affine6_weights, block_weights, fixture_inputs  # noqa: E402

from wqedge.actquant import quantize_model  # noqa: E402
from wqedge.bench.report import add_fixture_args, write_markdown  # noqa: E402
from wqedge.perplexity import perplexity  # noqa: E402
from wqedge.reference import logits_fn  # noqa: E402
from wqedge.residual_rotation import ResidualRotation, hadamard_config, hadamard_transforms  # noqa: E402
from wqedge.rotation import build_model_transforms, group_activations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("W16A4", None, 4), ("W4A4", "q4", 4), ("W6A6", "w6", 6), ("W4A6", "q4", 6), ("W4A8", "q4", 8),
            ("W4A16", "q4", None))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rotation_methods_fakequant.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.time()
    ckpt, ids, bos, cal = fixture_inputs(a, 4)
    fp = ckpt.load_hf_model(torch.float32)
    t0 = time.time()
    ruq = build_model_transforms(fp, group_activations(fp, cal.train), seed=a.seed)
    t_ruq = time.time() - t0
    t0 = time.time()
    fpr = ResidualRotation(ckpt.spec.hidden_size, ckpt.spec.head_dim, a.seed).rotate_model(copy.deepcopy(fp))
    had = hadamard_transforms(ckpt.spec, hadamard_config(a.seed))
    t_had = time.time() - t0
    variants = {"none": (fp, None), "ruquant": (fp, ruq), "residual": (fpr, None), "hadamard": (fpr, had)}

    def ppl(m):
        return perplexity(logits_fn(m), ids, bos, 512, a.windows, batch_size=4).perplexity

    fp_ppl = ppl(fp)
    print(f"fp16 {fp_ppl:.4f}; rotated fp {ppl(fpr):.4f}", flush=True)
    weights = {None: None, "q4": block_weights("q4"), "w6": affine6_weights}
    table = {}
    for label, w, bits in SETTINGS:
        for v, (base, tr) in variants.items():
            p = ppl(quantize_model(copy.deepcopy(base), tr, bits, weights[w]))
            table[(label, v)] = p
            print(f"{label} {v}: {p:.4f}", flush=True)
    lines = [f"# Rotation methods in fake quantization ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
             "", f"`python {' '.join(sys.argv)}` (torch {torch.__version__}, {a.threads} threads, total "
             f"{time.time() - t_start:.0f} s). llama-s, first {a.windows} windows of 512 of eval.txt (llama.cpp's "
             f"definition; fp16 {fp_ppl:.4f} on them). Weights min-max RTN at G = 128 (W6: 6-bit affine), "
             f"activations per token asymmetric at the input of every decoder linear. RUQuant stage 1 built in "
             f"{t_ruq:.1f} s from 4 calibration windows; the Hadamard method's rotations in {t_had:.1f} s, no data.", "",
             "| setting | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for label, _, _ in SETTINGS:
        lines.append(f"| {label} | " + " | ".join(
            f"{table[(label, v)]:.4f} ({100 * (table[(label, v)] / fp_ppl - 1):+.2f}%)" for v in variants) + " |")
    write_markdown(lines, a.out)


if __name__ == "__main__":
    main()
