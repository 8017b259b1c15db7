"""Quantized KV cache (issue 15): perplexity of W4 llama-s with a float, 8-bit and 4-bit KV cache, with and without
the Hadamard rotation of K, through the PyTorch reference and the C++ runtime; KV cache memory at 4096 tokens
(arithmetic and measured RSS) for llama-s and a TinyLlama-1.1B shape; decode speed of float vs 4-bit cache at a
long context. One run; writes bench/results/kv_cache.md (and .json).

W4: `--preset q4` (uniform q4, NeUQI fits weighted by the calibration statistics, as bench/ruquant_runtime.py), made
by the convert pipeline once; the KV4 row's file carries `wqedge.kv_cache.bits = 4` (the file's key), the other rows
run the same weights with the runtime's override (`kv_bits`, `kv_rotation`; the CLI's `--kv-bits`). Rows:
  ref       wqedge.reference.load_reference(path, KVCacheSpec) (wqedge.kvquant: the same quantize/dequantize)
  cpp-f32   the C++ runtime, float activations into the linears (WQEDGE_ACT=f32: the reference's arithmetic)
  cpp-q8    the C++ runtime's default int8 activations
Design table (reference only, 4 bits, same file): asymmetric vs symmetric codes, groups of 16 vs 32 vs one per head,
rotating V as well as K.
Decode: --ctx-tokens of prompt (one prefill), then --decode-tokens single-token steps timed; float and KV4 cache
alternate, best of --repeats; the ratio is the figure (same run, same machine).

    python bench/kv_cache.py [--windows 16] [--threads 2] [--ctx-tokens 2048]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from wqedge import pipeline
from wqedge.bench.report import add_fixture_args, write_markdown
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.kv_format import KVCacheSpec
from wqedge.perplexity import perplexity
from wqedge.quantize import convert_to_gguf

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("f32", None, "hadamard"), ("kv8", 8, "hadamard"), ("kv8 no rotation", 8, "none"),
            ("kv4", 4, "hadamard"), ("kv4 no rotation", 4, "none"))
DESIGN = (("asym g16, K rotated (the format)", dict()), ("asym g16, K and V rotated", dict(rotate_values=True)),
          ("asym g32, K rotated", dict(group_size=32)), ("asym g32, K and V rotated", dict(group_size=32, rotate_values=True)),
          ("asym per head, K rotated", dict(group_size=0)), ("sym g16, K rotated", dict(symmetric=True)),
          ("sym g32, K rotated", dict(group_size=32, symmetric=True)))
TINYLLAMA = dict(hidden=256, n_layers=22, n_heads=4, n_kv_heads=4, intermediate=256, vocab_size=512)  # its KV shape


def eval_tokens(model_dir: Path, text: str) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    from wqedge.calib import tokenize_text
    bos = LlamaCheckpoint.open(model_dir).spec.bos_token_id
    return tokenize_text(AutoTokenizer.from_pretrained(str(model_dir)), text, bos), bos


def ppl_reference(path, tokens, bos, windows, kv: KVCacheSpec) -> float:
    from wqedge.reference import load_reference, logits_fn
    return perplexity(logits_fn(load_reference(path, kv)), tokens, bos, 512, windows, batch_size=4).perplexity


def ppl_cpp(path, tokens, bos, windows, act, threads, bits, rotation) -> float:
    from wqedge.runtime import native
    native.set_activations(act)
    ev = native.NativeEvaluator(native.Model(path), n_ctx=512, n_threads=threads,
                                kv_bits="f32" if bits is None else bits, kv_rotation=rotation)
    return perplexity(ev, tokens, bos, 512, windows).perplexity


def make_w4(ckpt, calib: str, out: Path) -> tuple[Path, Path]:
    """W4 (preset q4) with no KV key, and the same chunks with the key kv_cache = 4 bits."""
    plan = pipeline.make_plan(ckpt, 0, preset="q4")
    fits = pipeline.prepare_fits(ckpt, plan, calib, feedback=False)
    fitted = fits.fitted
    if fitted is None:
        from wqedge.quantize import quantize_linears
        fitted = {lin.hf_name: ch for lin, ch in quantize_linears(ckpt, plan, fits.stats)}
    a = convert_to_gguf(ckpt, plan.validate(), out / "w4.gguf", fitted=fitted)
    plan.kv_cache = KVCacheSpec(4).to_plan()
    b = convert_to_gguf(ckpt, plan.validate(), out / "w4-kv4.gguf", fitted=fitted)
    return Path(a), Path(b)


_RSS = r"""
import sys
from wqedge.runtime import native
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
m = native.Model(sys.argv[1]); a = rss()
c = native.Context(m, n_ctx=int(sys.argv[2]), n_threads=1, kv_bits=sys.argv[3])
print(rss() - a, c.kv_cache['bytes'])
"""


def measured_rss(path: Path, n_ctx: int, bits: str) -> tuple[int, int]:
    """(RSS growth when the context is made, the runtime's own count of its cache bytes), in a fresh process."""
    p = subprocess.run([sys.executable, "-c", _RSS, str(path), str(n_ctx), bits], capture_output=True, text=True,
                       check=True)
    a, b = p.stdout.split()
    return int(a), int(b)


def tinyllama_file(out: Path) -> Path:
    """A random model with TinyLlama-1.1B's KV shape (22 layers, 4 KV heads x 64), q8: its cache is TinyLlama's."""
    from wqedge.plan import Plan
    from wqedge.tinymodel import build_tiny_model
    from wqedge.units import chunk_bounds
    ckpt = LlamaCheckpoint.open(build_tiny_model(out / "tinyllama-kv-shape", **TINYLLAMA))
    acts = {lin.hf_name: ["q8"] * len(chunk_bounds(lin.in_features, 128)) for lin in ckpt.spec.linears()}
    plan = Plan.from_actions(ckpt.spec.linears(), 128, 16.0, "uniform", acts, model_fingerprint=ckpt.fingerprint())
    plan.budget_bits = plan.effective_bits()
    return Path(convert_to_gguf(ckpt, plan.validate(), out / "tinyllama-kv-shape.gguf"))


def decode_speed(path: Path, n_prompt: int, n_decode: int, threads: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of n_decode single-token steps after an n_prompt prefill (int8 activations, the default),
    float vs 4-bit cache: bench/kv_decode_speed.py's loop at one context length."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kv_decode_speed import speed
    from wqedge.runtime import native
    native.set_activations("q8")
    best = speed(native.Model(path), n_prompt, n_decode, threads, repeats, ("f32", 4))
    return {"f32": best["f32"], "kv4": best[4]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-tokens", type=int, default=2048, help="prompt length before the timed decode steps")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-design", action="store_true", help="skip the reference-only design table")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "wqedge" / "kv_cache"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_cache.md"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cmd = (f"python bench/kv_cache.py --windows {args.windows} --threads {args.threads} --ctx-tokens {args.ctx_tokens} "
           f"--decode-tokens {args.decode_tokens} --repeats {args.repeats}" + (" --no-design" if args.no_design else ""))
    lines = [f"# Quantized KV cache: W4 llama-s, reference vs C++ runtime ({datetime.date.today()})", "", f"`{cmd}`; "
             f"llama-s, first {args.windows} windows of 512 tokens of eval.txt; perplexity as llama.cpp defines it.", ""]
    raw: dict = {"command": cmd}
    ckpt = LlamaCheckpoint.open(args.model)
    tokens, bos = eval_tokens(Path(args.model), Path(args.eval).read_text())
    t0 = time.time()
    w4, w4kv4 = make_w4(ckpt, Path(args.calib).read_text(), work)
    lines.append(f"W4 files (preset q4, NeUQI stats fits) made in {time.time() - t0:.0f} s.")
    lines += ["", "| KV cache | ref | cpp-f32 | cpp-q8 | ref vs W4 float cache | cpp-f32 vs ref | cpp-q8 vs ref |",
              "|---|---|---|---|---|---|---|"]
    rows = []
    base = None
    for label, bits, rot in SETTINGS:
        path = w4kv4 if (bits, rot) == (4, "hadamard") else w4  # the KV4 row runs from the file's key
        r = ppl_reference(path, tokens, bos, args.windows, KVCacheSpec(bits, rot))
        c32 = ppl_cpp(path, tokens, bos, args.windows, "f32", args.threads, bits, rot)
        c8 = ppl_cpp(path, tokens, bos, args.windows, "q8", args.threads, bits, rot)
        base = r if base is None else base
        row = dict(kv=label, bits=bits, rotation=rot, ref=r, cpp_f32=c32, cpp_q8=c8, file=path.name)
        rows.append(row)
        print(json.dumps(row), flush=True)
        lines.append(f"| {label} | {r:.4f} | {c32:.4f} | {c8:.4f} | {100 * (r / base - 1):+.2f}% | "
                     f"{100 * (c32 / r - 1):+.3f}% | {100 * (c8 / r - 1):+.3f}% |")
    raw["perplexity"] = rows
    if not args.no_design:
        lines += ["", "Design choices at 4 bits (reference only, same W4 file and windows; the runtime implements the "
                  "first row):", "", "| 4-bit variant | ref | vs W4 float cache |", "|---|---|---|"]
        raw["design"] = []
        for label, kw in DESIGN:
            r = ppl_reference(w4, tokens, bos, args.windows, KVCacheSpec(4, "hadamard", **kw))
            raw["design"].append(dict(variant=label, ref=r))
            print(label, r, flush=True)
            lines.append(f"| {label} | {r:.4f} | {100 * (r / base - 1):+.2f}% |")

    # memory at 4096 tokens
    tiny = tinyllama_file(work)
    lines += ["", "KV cache at 4096 tokens (K and V, all layers): arithmetic (wqedge.kv_format.KVCacheSpec.cache_bytes), "
              "the runtime's allocation (wqe_context_kv_cache) and the RSS growth of a fresh process when the context "
              "is made (the cache is zero-filled, so every page is resident):", "",
              "| model (layers, KV heads x head_dim) | cache | arithmetic MiB | runtime MiB | measured RSS MiB |",
              "|---|---|---|---|---|"]
    raw["memory"] = []
    for name, path, spec in (("llama-s (8, 4 x 64)", w4, ckpt.spec),
                             ("TinyLlama-1.1B shape (22, 4 x 64)", tiny, None)):
        n_layers, kv_heads, hd = (spec.n_layers, spec.n_kv_heads, spec.head_dim) if spec else (22, 4, 64)
        for label, bits in (("f32", None), ("8-bit", 8), ("4-bit", 4)):
            arith = KVCacheSpec(bits).cache_bytes(4096, [kv_heads] * n_layers, hd)
            rss, alloc = measured_rss(path, 4096, "f32" if bits is None else str(bits))
            raw["memory"].append(dict(model=name, cache=label, arithmetic=arith, runtime=alloc, rss=rss))
            lines.append(f"| {name} | {label} | {arith / 2**20:.2f} | {alloc / 2**20:.2f} | {rss / 2**20:.2f} |")

    sp = decode_speed(w4, args.ctx_tokens, args.decode_tokens, args.threads, args.repeats)
    raw["decode"] = dict(sp, ctx_tokens=args.ctx_tokens, decode_tokens=args.decode_tokens, threads=args.threads)
    lines += ["", f"Decode at {args.ctx_tokens} tokens of context ({args.threads} threads, {args.decode_tokens} "
              f"single-token steps after one prefill, int8 activations, best of {args.repeats} alternating runs): "
              f"float cache {sp['f32']:.1f} tok/s, 4-bit cache {sp['kv4']:.1f} tok/s: ratio kv4/f32 = "
              f"{sp['kv4'] / sp['f32']:.3f}."]
    write_markdown(lines, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
