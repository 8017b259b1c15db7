"""RUQuant through written files (issue 15, part 2): perplexity of rotated weight-and-activation quantized
llama-s in the PyTorch reference and the C++ runtime, and decode speed of rotated vs unrotated files.

Files are made by the convert pipeline itself (wqedge.pipeline: `--rotate` transforms from the calibration
text, folded before fitting; preset plans; chunks fitted as --fit says) and differ between act-bit rows only
in their `wqedge.act_bits` key (the same fitted chunks are written once per act bits). Each row's perplexity:
  ref      wqedge.reference.load_reference (transforms online, per-token fake quantization at 6/4 bits)
  cpp-f32  the C++ runtime with float activations into the linears (WQEDGE_ACT=f32): the reference's arithmetic
  cpp-q8   the C++ runtime's default int8 activation path (the 6/4-bit grid values re-quantized per 32 columns)
  ref64    (6/4 bits only) the reference with its transforms computed in float64: how much the quantized model
           itself moves under float rounding of its inputs (a value next to a rounding boundary of the activation
           grid takes the other code), i.e. the spread any two correct implementations can show
Perplexity: wqedge.perplexity (llama.cpp's definition), the first --windows windows of 512 tokens of the
evaluation text. Decode speed (--speed): tokens/s of single-token steps, rotated vs unrotated q4 files,
alternating runs, best of --repeats. Writes Markdown (and the raw per-row JSON) to --out.

    python bench/ruquant_runtime.py [--windows 32] [--fit stats|feedback] [--speed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path


from wqedge import pipeline
from wqedge.bench.report import add_fixture_args, write_markdown
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.perplexity import perplexity
from wqedge.quantize import convert_to_gguf
from wqedge.rotation import BLOCK, rotation_config

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("q4", True, (8, 6, 4)), ("q8", True, (6, 4)), ("q4", False, (8, 4)))  # weights, rotated, act bits


def eval_tokens(model_dir: Path, text: str) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    from wqedge.calib import tokenize_text
    ckpt = LlamaCheckpoint.open(model_dir)
    bos = ckpt.spec.bos_token_id
    return tokenize_text(AutoTokenizer.from_pretrained(str(model_dir)), text, bos), bos


def ppl_reference(path, tokens, bos, windows):
    from wqedge.reference import load_reference, logits_fn
    return perplexity(logits_fn(load_reference(path)), tokens, bos, 512, windows)


def ppl_reference64(path, tokens, bos, windows):
    """ppl_reference with Transform.apply in float64 (cast back to float32 before the quantizer)."""
    from wqedge import rotation
    orig = rotation.Transform.apply
    rotation.Transform.apply = lambda self, x: orig(self, x.double()).to(x.dtype)
    try:
        return ppl_reference(path, tokens, bos, windows)
    finally:
        rotation.Transform.apply = orig


def ppl_cpp(path, tokens, bos, windows, act: str, threads: int):
    from wqedge.runtime import native
    native.set_activations(act)
    ev = native.NativeEvaluator(native.Model(path), n_ctx=512, n_threads=threads)
    return perplexity(ev, tokens, bos, 512, windows)


def change(pair) -> str:
    """(relative change %, its paired standard error %) as the table prints it."""
    return "{:+.3f}% ± {:.3f}".format(*pair)


def decode_speed(paths: dict[str, Path], n_tokens: int, threads: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of n_tokens single-token steps (int8 activations, the default), files alternating."""
    from wqedge.runtime import native
    native.set_activations("q8")
    models = {k: native.Model(p) for k, p in paths.items()}
    best = {k: 0.0 for k in paths}
    for _ in range(repeats):
        for k, m in models.items():
            c = native.Context(m, n_ctx=n_tokens + 8, n_threads=threads)
            c.eval([1])
            t0 = time.perf_counter()
            tok = 1
            for i in range(n_tokens):
                c.eval([tok])
                tok = 100 + i % 500
            best[k] = max(best[k], n_tokens / (time.perf_counter() - t0))
    return best


def command_line(args) -> str:
    """The options that decide the table (the fixture paths and --out left out), as they would be typed."""
    opts = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("windows", "fit", "threads", "method")]
    opts += [f"--rows {args.rows}"] if args.rows else []
    opts += ["--no-plain"] if args.no_plain else []
    opts += [f"--block {args.block}"] if args.block else []
    opts += [f"--seed {args.seed}"] if args.seed else []
    return " ".join(opts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--fit", choices=("stats", "feedback"), default="stats",
                    help="NeUQI weighted by diag(XᵀX) (stats) or GPTQ-style error feedback")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "wqedge" / "ruquant"))
    ap.add_argument("--speed", action="store_true", help="also decode speed, rotated vs unrotated q4 (A8)")
    ap.add_argument("--speed-only", action="store_true", help="only decode speed, of files already in --workdir")
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", choices=("ruquant", "hadamard"), default="ruquant",
                    help="rotation method of the rotated rows (wqedge.rotation / wqedge.residual_rotation)")
    ap.add_argument("--no-plain", action="store_true", help="skip the unrotated rows")
    ap.add_argument("--rows", default=None,
                    help="only these rows, as WEIGHTS:ACT_BITS[:plain] (e.g. q4:4,q8:4); default: every row")
    ap.add_argument("--block", type=int, default=None, help="RUQuant's block size B (default: wqedge.rotation.BLOCK)")
    ap.add_argument("--seed", type=int, default=0, help="the transforms' seed (their random targets and Givens pairs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ruquant_runtime.md"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"# RUQuant through files: reference vs C++ runtime ({datetime.date.today()})", "",
             f"`python bench/ruquant_runtime.py {command_line(args)}`"
             f"{' --speed' if args.speed else ''}; llama-s, first {args.windows} windows of 512 tokens of eval.txt.", ""]
    rows = []
    speed_files = {"q4 rotated": work / "q4-rot-a8.gguf", "q4 plain": work / "q4-plain-a8.gguf"}
    if not args.speed_only:
        ckpt = LlamaCheckpoint.open(args.model)
        calib = Path(args.calib).read_text()
        tokens, bos = eval_tokens(Path(args.model), Path(args.eval).read_text())
        t0 = time.time()
        fp = ckpt.load_hf_model()
        from wqedge.reference import logits_fn
        fp_ppl = perplexity(logits_fn(fp), tokens, bos, 512, args.windows)
        del fp
        lines += [f"fp16 (PyTorch, same windows): **{fp_ppl.perplexity:.4f}**", "",
                  "Differences are paired over the windows: relative change of perplexity ± its standard error (the "
                  "spread of the per-window mean NLL differences / √windows), so a gap is judged against its own noise.", ""]
        t0 = time.time()
        from wqedge.residual_rotation import hadamard_config
        config = rotation_config(args.seed, block=args.block or BLOCK) if args.method == "ruquant" else hadamard_config()
        pipeline.rotated(ckpt, config, calib)
        t_rot = time.time() - t0
        lines += [f"stage-1 transforms (calibration activations + construction, {config['n_seqs']} x "
                  f"{config['seqlen']} tokens, CPU, {args.threads} threads): {t_rot:.1f} s" if args.method == "ruquant"
                  else f"hadamard transforms (data-free; residual rotation folded on reading): {t_rot:.1f} s", "",
                  "| weights | rotated | act bits | ref | ref64 | cpp-f32 | cpp-q8 | ref vs fp16 | ref64 vs ref | cpp-f32 vs ref | "
                  "cpp-q8 vs ref | cpp-f32 vs ref64 | cpp-q8 vs ref64 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        wanted = None if args.rows is None else {tuple(r.split(":")) for r in args.rows.split(",")}
        for action, rot, bits_list in ROWS:
            if args.no_plain and not rot:
                continue
            if wanted is not None:
                bits_list = tuple(b for b in bits_list if (action, str(b)) + (() if rot else ("plain",)) in wanted)
                if not bits_list:
                    continue
            plan = pipeline.make_plan(ckpt, 0, preset=action)
            plan.rotation = config if rot else None
            src, stored = pipeline.rotated(ckpt, plan.rotation, calib)
            t0 = time.time()
            fits = pipeline.prepare_fits(src, plan, calib, feedback=args.fit == "feedback")
            fitted = fits.fitted
            if fitted is None:
                from wqedge.quantize import quantize_linears
                fitted = {lin.hf_name: ch for lin, ch in quantize_linears(src, plan, fits.stats)}
            t_fit = time.time() - t0
            for bits in bits_list:
                plan.act_bits = bits
                name = ("rot" if args.method == "ruquant" else args.method) if rot else "plain"
                path = work / f"{action}-{name}-a{bits}.gguf"
                convert_to_gguf(src, plan.validate(), path, fitted=fitted, transforms=stored)
                r = ppl_reference(path, tokens, bos, args.windows)
                r64 = ppl_reference64(path, tokens, bos, args.windows) if bits < 8 else r
                c32 = ppl_cpp(path, tokens, bos, args.windows, "f32", args.threads)
                c8 = ppl_cpp(path, tokens, bos, args.windows, "q8", args.threads)
                vs_ref = {k: list(v.change_vs(r)) for k, v in (("ref64", r64), ("cpp_f32", c32), ("cpp_q8", c8))}
                vs_64 = {k: list(v.change_vs(r64)) for k, v in (("cpp_f32", c32), ("cpp_q8", c8))}
                row = dict(weights=action, rotated=args.method if rot else False, act_bits=bits, ref=r.perplexity,
                           ref64=r64.perplexity, cpp_f32=c32.perplexity, cpp_q8=c8.perplexity, fp16=fp_ppl.perplexity,
                           fit=args.fit, fit_seconds=t_fit,
                           paired=vs_ref, cpp_vs_ref64=vs_64)
                rows.append(row)
                print(json.dumps(row), flush=True)
                lines.append(f"| {action} | {args.method if rot else 'no'} | {bits} | {r.perplexity:.4f} | "
                             f"{r64.perplexity:.4f} | {c32.perplexity:.4f} | {c8.perplexity:.4f} | "
                             f"{100 * (r.perplexity / fp_ppl.perplexity - 1):+.2f}% | {change(vs_ref['ref64'])} | "
                             f"{change(vs_ref['cpp_f32'])} | {change(vs_ref['cpp_q8'])} | {change(vs_64['cpp_f32'])} | "
                             f"{change(vs_64['cpp_q8'])} |")
    if args.speed or args.speed_only:
        sp = decode_speed(speed_files, args.speed_tokens, args.threads, args.repeats)
        rows.append({"decode_tokens_per_s": sp, "threads": args.threads, "tokens": args.speed_tokens})
        a, b = sp["q4 rotated"], sp["q4 plain"]
        lines += ["", f"Decode ({args.threads} threads, {args.speed_tokens} single-token steps, int8 activations, best of "
                  f"{args.repeats} alternating runs): q4 rotated {a:.1f} tok/s, q4 unrotated {b:.1f} tok/s: "
                  f"rotated takes {100 * (b / a - 1):+.1f}% more time per token."]
    write_markdown(lines, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
