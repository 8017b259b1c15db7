"""Two-level (subscale) block kinds against one-scale kinds and llama.cpp's types, uniform plans at matched bits.

Rows per model: fp16; without calibration (min-max and NeUQI fits, the `--no-self-calib` path): q4 (G=128) vs q4s
(G=256: 4.5 b, Q4_K's and Q4_0's price) vs llama.cpp Q4_0 and Q4_K, and q3 (G=128) vs q3s (G=256: 3.5 b) vs Q3_K;
with self-calibration (text the model writes itself, error feedback: the default `convert` path) the same
wqedge rows and llama.cpp with an importance matrix from that text. Our files go plan -> GGUF -> read back ->
PyTorch reference; llama.cpp's through llama-cpp-python; one perplexity definition (wqedge.perplexity).

    nice python bench/subscale.py [--windows 8] [--models llama-s,smol-s] [--calib none|self|both] [--append]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from wqedge.alloc.uniform import model_bits, uniform_plan
from wqedge.bench.report import write_markdown
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity
from wqedge.pipeline import write_gguf
from wqedge.reference import load_reference, logits_fn
from wqedge.runtime.gguf_reader import WqGGUF

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures"
SMOL = Path.home() / ".cache" / "wqedge" / "fixtures"


def models(fix: Path, smol: Path) -> dict:
    return {"llama-s": (fix / "llama-s", fix / "text" / "eval.txt"), "smol-s": (smol / "smol-s", smol / "text" / "eval.txt")}
OURS = [("q4", 128), ("q4s", 256), ("q3", 128), ("q3s", 256)]
THEIRS = ["Q4_0", "Q4_K", "Q3_K"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-s,smol-s")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ours", default=",".join(f"{a}@{g}" for a, g in OURS))
    ap.add_argument("--calib", choices=("none", "self", "both"), default="both",
                    help="rows without calibration, with self-calibration, or both")
    ap.add_argument("--fixtures", default=str(FIX), help="folder with llama-s and text/eval.txt")
    ap.add_argument("--smol", default=str(SMOL), help="folder with smol-s and text/eval.txt")
    ap.add_argument("--engines", default="wqedge,llamacpp", help="whose rows: wqedge, llamacpp or both")
    ap.add_argument("--device", default=None, help="torch device for calibration and error feedback (e.g. cuda)")
    ap.add_argument("--append", action="store_true", help="add the rows to the table already in --out")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "subscale.md"))
    args = ap.parse_args()
    ours = [(a, int(g)) for a, g in (x.split("@") for x in args.ours.split(","))]
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.windows} windows of 512 tokens per model "
             "(second half scored, llama.cpp's definition); uniform plans, every decoder linear one kind; bits = "
             "stored bits per weight of the decoder linears, measured in the file. `self-calib`: 32x256 tokens "
             "the model samples itself; ours fitted with error feedback on them, llama.cpp with an importance "
             "matrix (diag XᵀX) from them. llama.cpp falls back to another type where rows do not fit its "
             "super-block (hidden 576 is not a multiple of 256: see the bits).", "",
             "| model | calibration | quantizer | kind | G | bits | perplexity | vs fp16 | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    if args.append:
        lines = Path(args.out).read_text().rstrip("\n").split("\n")
    for name in args.models.split(","):
        lines += run_model(name, *models(Path(args.fixtures), Path(args.smol))[name], args.windows,
                           ours if "wqedge" in args.engines else [], args.calib,
                           "llamacpp" in args.engines, args.device)
        write_markdown(lines, args.out)


def run_model(name, model_dir, text, windows, ours, which, llamacpp=True, device=None):
    ckpt = LlamaCheckpoint.open(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    bos = ckpt.spec.bos_token_id
    ids = ([bos] if bos is not None else []) + tok(Path(text).read_text(), add_special_tokens=False)["input_ids"]

    def ppl(fn):
        return perplexity(fn, ids, bos, 512, windows, batch_size=4).perplexity

    rows = []
    base = ppl(logits_fn(ckpt.load_hf_model(torch.float32)))

    def row(calib, quantizer, kind, g, bits, p, dt):
        rows.append(f"| {name} | {calib} | {quantizer} | {kind} | {g} | {bits:.4f} | {p:.4f} | "
                    f"{100 * (p / base - 1):+.1f}% | {dt:.0f} |")
        print(rows[-1], flush=True)

    row("-", "fp16", "-", "-", 16.0, base, 0)
    linears = ckpt.spec.linears()
    calibs = [("none", None)] if which != "self" else []
    if which != "none":
        from wqedge.calib_source import self_generated_text
        calibs.append(("self-calib", self_generated_text(ckpt)))
    with tempfile.TemporaryDirectory() as tmp:
        for calib, text in calibs:
            methods = ["minmax", "neuqi"] if text is None else ["neuqi"]
            for method in methods:
                for action, g in ours:
                    t0 = time.time()
                    plan = uniform_plan(linears, g, model_bits(linears, g, action), method, action=action,
                                        model_fingerprint=ckpt.fingerprint())
                    path = write_gguf(ckpt, plan, Path(tmp) / "m.gguf", text, feedback=text is not None,
                                      device=device)
                    dt = time.time() - t0
                    row(calib, f"wqedge {'error feedback' if text else method}", action, g,
                        WqGGUF(path).measured_bits(), ppl(logits_fn(load_reference(path))), dt)
            if not llamacpp:
                continue
            from wqedge.converters.llamacpp import export_llamacpp
            from wqedge.runtime.llamacpp_eval import llamacpp_logits_fn, measured_linear_bits
            imatrix = None
            if text is not None:
                from wqedge.calib import collect_stats
                imatrix = collect_stats(ckpt, text)
            for t in THEIRS:
                t0 = time.time()
                out = Path(tmp) / f"{t}.gguf"
                export_llamacpp(ckpt, out, tensor_types=lambda nm, n, k, t=t: t, imatrix=imatrix)
                dt = time.time() - t0
                fn = llamacpp_logits_fn(str(out))
                row(calib, "llama.cpp" + (" + imatrix" if imatrix is not None else ""), t, "-",
                    measured_linear_bits(out), ppl(fn), dt)
                fn.close()
    return rows


if __name__ == "__main__":
    main()
