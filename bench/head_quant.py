#!/usr/bin/env python3
"""The quantized output head (wqedge.head, `wqedge convert --head`): perplexity of fp16 / q8 / q4 heads, and files for
the decode-speed comparison (bench/decode_ab.py). Results: bench/results/head_quant.md.

    python bench/head_quant.py quality [--model DIR ...] [--calib calib.txt] [--eval eval.txt] [--windows 32]
        [--plan 2.5=plan.json]
    python bench/head_quant.py rehead SRC.gguf --head q8 [-o OUT.gguf]

quality: per model and decoder (uniform q4; the greedy 2.5-bit plan made on --calib, or the --plan given for it),
the decoder's chunks are fitted once (as `wqedge convert` fits them: statistics for q4, error feedback for the greedy
plan) and written with each head kind (pipeline.write_gguf(head=...)), so only the head differs between the files;
perplexity over --windows windows of 512 tokens of --eval by the C++ runtime (int8 activations, its default) and by
the PyTorch reference on the same dequantized weights (float).
rehead: a copy of a wqedge GGUF with its dense head refitted as `--head` (the same fit as `wqedge convert --head`:
the F16 head is the checkpoint's fp16 weights, fitted with the plan's method): the decoder files of a benchmark
cache get quantized heads without being planned and fitted again.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rehead(src: Path, head: str, out: Path) -> Path:
    """Copy `src` with its dense output head (output.weight, or token_embd.weight when tied) quantized as `head`."""
    import torch

    from wqedge.blocks import block_type, pack_chunk
    from wqedge.converters.gguf_writer import QuantizedHead, tensor_key
    from wqedge.head import head_actions, is_quantized
    from wqedge.quant.fit import fit_linear
    from wqedge.quantize import HEAD_GRID
    from wqedge.runtime.gguf_reader import WqGGUF
    if not is_quantized(head):
        raise SystemExit("rehead writes a quantized head (q8, q4)")
    f = WqGGUF(src)
    name = f.head_tensor
    if f.is_quantized(name):
        raise SystemExit(f"{src}: the head is quantized already ({f.head_kind})")
    plan = json.loads(f.plan_json)
    m = plan["tensors"][0]["methods"] if "tensors" in plan else "neuqi"
    method = m if isinstance(m, str) else m[0]
    V, D = f.spec.vocab_size, f.spec.hidden_size
    actions = head_actions(D, f.group_size, head)
    chunks = fit_linear(torch.from_numpy(f.dense(name)), actions, f.group_size, method, neuqi_grid=HEAD_GRID)
    qh = QuantizedHead(name, V, D, actions, lambda: chunks)
    rows = np.concatenate([pack_chunk(c) for c in chunks], axis=1)
    assert rows.shape == (V, qh.row_bytes(f.group_size))

    r = f.reader
    w = gguf.GGUFWriter(out, "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        t = field.types
        w.add_key_value(key, field.contents(), t[0], sub_type=t[-1] if t[0] == gguf.GGUFValueType.ARRAY else None)
    w.add_uint32(tensor_key(name, "in_features"), D)
    w.add_array(tensor_key(name, "chunk_actions"), [block_type(a).code for a in actions])
    for t in r.tensors:
        if t.name == name:
            w.add_tensor(name, rows.view(np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quality(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from wqedge import pipeline
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.head import HEAD_KINDS
    from wqedge.perplexity import perplexity
    from wqedge.plan import Plan
    from wqedge.reference import load_reference, logits_fn
    from wqedge.runtime import native
    calib_text = Path(args.calib).read_text()
    given = dict(p.split("=", 1) for p in args.plan)
    out_dir = Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for model in args.model:
        ckpt = LlamaCheckpoint.open(model)
        tok = AutoTokenizer.from_pretrained(model)
        ids = [tok.bos_token_id] + tok(Path(args.eval).read_text(), add_special_tokens=False)["input_ids"]
        bos = ckpt.spec.bos_token_id
        print(f"## {Path(model).name} (tied: {ckpt.spec.tie_word_embeddings}, vocab {ckpt.spec.vocab_size}, "
              f"hidden {ckpt.spec.hidden_size})", flush=True)
        for dec in args.decoders.split(","):
            t0 = time.time()
            if dec == "q4":
                plan = pipeline.make_plan(ckpt, 4.25, preset="q4", progress=False)
            elif dec in given:
                plan = Plan.load(given[dec], ckpt.spec, ckpt.fingerprint())
            else:
                plan = pipeline.make_plan(ckpt, float(dec), calib_text=calib_text, progress=False)
            fits = pipeline.prepare_fits(ckpt, plan, calib_text)
            fitted = fits.fitted
            if fitted is None:   # fit the decoder once; the files differ in their head only
                from wqedge.quantize import quantize_linears
                fitted = {lin.hf_name: ch for lin, ch in quantize_linears(ckpt, plan, fits.stats)}
            print(f"{dec}: plan {plan.allocator}, {plan.effective_bits():.3f} bits, fit {fits.mode} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            for head in HEAD_KINDS:
                from wqedge.quantize import convert_to_gguf
                path = out_dir / f"{Path(model).name}.{dec}.{head}.gguf"
                t1 = time.time()
                convert_to_gguf(fits.source(ckpt), plan, path, fitted=fitted, head=head)
                tw = time.time() - t1
                native.set_activations("q8")
                p_q8 = perplexity(native.logits_fn(str(path), n_threads=2), ids, bos, 512, args.windows,
                                  batch_size=1).perplexity
                p_ref = perplexity(logits_fn(load_reference(path)), ids, bos, 512, args.windows,
                                   batch_size=2).perplexity
                print(f"| {Path(model).name} | {dec} | {head} | {path.stat().st_size / 2**20:.2f} | {p_q8:.4f} | "
                      f"{p_ref:.4f} | {tw:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    fix = ROOT.parent / "shared" / "fixtures"
    q.add_argument("--model", action="append", default=None)
    q.add_argument("--calib", default=str(fix / "text" / "calib.txt"))
    q.add_argument("--eval", default=str(fix / "text" / "eval.txt"))
    q.add_argument("--windows", type=int, default=32)
    q.add_argument("--decoders", default="q4,2.5", help="q4 (uniform preset) and/or bit budgets for greedy plans")
    q.add_argument("--plan", action="append", default=[], metavar="BITS=plan.json",
                   help="use this plan for that budget instead of planning (same calibration text)")
    q.add_argument("--work", default="/tmp/head_quant", help="folder for the written files")
    r = sub.add_parser("rehead")
    r.add_argument("src")
    r.add_argument("--head", required=True)
    r.add_argument("-o", "--output")
    args = ap.parse_args()
    if args.cmd == "rehead":
        src = Path(args.src)
        out = Path(args.output) if args.output else src.with_name(f"{src.stem}.head-{args.head}.gguf")
        t0 = time.time()
        rehead(src, args.head, out)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s")
        return
    args.model = args.model or [str(ROOT.parent / "shared" / "fixtures" / "llama-s"),
                                 str(Path.home() / ".cache" / "wqedge" / "fixtures" / "smol-s")]
    quality(args)


if __name__ == "__main__":
    main()
