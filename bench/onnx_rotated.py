"""ONNX export of rotated (RUQuant) files: perplexity through ONNX Runtime against the PyTorch reference of the
same GGUF, and what the transforms cost a decode step (issue 15; docs/onnx.md "Rotated files").

For each given GGUF (made by `wqedge convert MODEL --rotate --act-bits B ...`):
  ppl ref    wqedge.reference.load_reference (transforms online, per-token fake quantization at act bits < 8)
  ppl ref64  (--spread) the reference with its transforms computed in float64: how far the quantized model itself
             moves under float rounding of its inputs (at act bits < 8 a value next to a rounding boundary of the
             activation grid takes the other code, and the change spreads through later layers), i.e. the spread any
             two correct fp32 implementations can show
  ppl cpp    (--spread) the C++ runtime with float activations into the linears (WQEDGE_ACT=f32)
  ppl onnx   the portable export (converters/onnx_export.py; --native adds the native variant) in onnxruntime
Perplexity: wqedge.perplexity (llama.cpp's definition), the first --windows windows of 512 tokens of --text.
Exactness (--exactness): the reference's own group inputs on the first window, captured, fed to the ONNX
group-input graph (converters/onnx_rotation.group_input_model): deviations in grid steps, and flips (exactly one step).
Decode (--speed): tokens/s of single-token steps after a 128-token prefill, best of --repeats, of the export as
written ("block"), of the same graph with each full-block product lowered as one dense d x d block-diagonal
MatMul instead ("dense", the alternative the exporter did not take), and of the graph with the group inputs
left out ("none": wrong logits, same weights: the cost of the linears alone).

    python bench/onnx_rotated.py FILE.gguf [FILE.gguf ...] [--windows 8] [--speed] [--native] [--spread] [--exactness]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from wqedge.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def eval_tokens(model_dir: Path, text: str) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    from wqedge.calib import tokenize_text
    from wqedge.checkpoint import LlamaCheckpoint
    bos = LlamaCheckpoint.open(model_dir).spec.bos_token_id
    return tokenize_text(AutoTokenizer.from_pretrained(str(model_dir)), text, bos), bos


def ppl_reference(path, tokens, bos, windows) -> float:
    from wqedge.reference import load_reference, logits_fn
    return perplexity(logits_fn(load_reference(path)), tokens, bos, 512, windows).perplexity


def ppl_reference64(path, tokens, bos, windows) -> float:
    """ppl_reference with Transform.apply in float64 (cast back to float32 before the quantizer)."""
    from wqedge import rotation
    orig = rotation.Transform.apply
    rotation.Transform.apply = lambda self, x: orig(self, x.double()).to(x.dtype)
    try:
        return ppl_reference(path, tokens, bos, windows)
    finally:
        rotation.Transform.apply = orig


def ppl_cpp(path, tokens, bos, windows, threads) -> float:
    from wqedge.runtime import native
    native.set_activations("f32")
    ev = native.NativeEvaluator(native.Model(path), n_ctx=512, n_threads=threads)
    return perplexity(ev, tokens, bos, 512, windows).perplexity


def ppl_onnx(onnx_path, tokens, bos, windows, threads) -> float:
    from wqedge.runtime.onnx_session import OnnxDecoder
    dec = OnnxDecoder(onnx_path, threads)
    return perplexity(dec.logits, tokens, bos, 512, windows).perplexity


def group_input_exactness(path, tokens, bos, threads) -> dict:
    """Values, flips and the largest non-flip deviation (in grid steps) of the ONNX group inputs against the
    reference's, on the reference's own inputs of every group for the first 512-token window."""
    import onnxruntime as ort
    import torch

    from wqedge.actquant import GroupInput
    from wqedge.converters.onnx_rotation import group_input_model
    from wqedge.perplexity import make_windows
    from wqedge.reference import load_reference
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(path)
    sts, bits = f.transforms(), f.act_bits
    m = load_reference(path)
    seen: dict[int, tuple] = {}
    orig = GroupInput.forward

    def capture(self, x):
        y = orig(self, x)
        seen.setdefault(id(self), (x.detach().numpy().copy(), y.detach().numpy().copy()))
        return y
    GroupInput.forward = capture
    try:
        with torch.inference_mode():
            m(torch.from_numpy(make_windows(tokens, bos, 512, 1).astype(np.int64)))
    finally:
        GroupInput.forward = orig
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    out = {"values": 0, "flips": 0, "max_nonflip_steps": 0.0, "max_transform_rel": 0.0}
    for li, layer in enumerate(m.model.layers):
        for gi, mod in enumerate((layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj,
                                  layer.mlp.down_proj)):
            x, yr = seen[id(mod.group_input)]
            sess = ort.InferenceSession(group_input_model(sts.get((li, gi)), bits).SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": x})[0]
            if bits >= 8:
                out["max_transform_rel"] = max(out["max_transform_rel"], float(np.abs(y - yr).max() / np.abs(yr).max()))
                continue
            step = (yr.max(-1, keepdims=True) - yr.min(-1, keepdims=True)) / ((1 << bits) - 1)
            dq = np.abs(y - yr) / step
            flip = dq > 0.5
            out["values"] += y.size
            out["flips"] += int(flip.sum())
            out["max_nonflip_steps"] = max(out["max_nonflip_steps"], float(dq[~flip].max()))
            out["flips_not_one_step"] = out.get("flips_not_one_step", 0) + int((np.abs(dq[flip] - 1) > 1e-3).sum())
    return out


def _dense_block_product(g, x, full, tail, dim, stem):
    """The rejected lowering: R as one dense block-diagonal [d, d] MatMul (d^2 values stored and multiplied)."""
    b = full.shape[0]
    nf = dim // b
    r = np.zeros((dim, dim), np.float32)
    for i in range(nf):
        r[i * b:(i + 1) * b, i * b:(i + 1) * b] = full
    if tail is not None:
        r[nf * b:, nf * b:] = tail
    return g.op("MatMul", [x, g.init(stem + "_dense", np.ascontiguousarray(r.T))])


def export(gguf, out, variant="portable", group_inputs="block") -> dict:
    """export_onnx with the group inputs as written ("block"), as dense block-diagonal products ("dense"), or
    left out ("none")."""
    from unittest import mock

    from wqedge.converters import onnx_export, onnx_rotation
    from wqedge.converters.onnx_export import export_onnx
    if group_inputs == "block":
        return export_onnx(gguf, out, variant=variant)
    if group_inputs == "dense":
        with mock.patch.object(onnx_rotation, "_block_product", _dense_block_product):
            return export_onnx(gguf, out, variant=variant)
    with mock.patch.object(onnx_export._Exporter, "group_input", lambda self, x, layer, group: x):
        return export_onnx(gguf, out, variant=variant)


def decode_speed(onnx_path, threads, repeats, prefill=128, steps=32) -> float:
    from wqedge.runtime.onnx_session import OnnxDecoder
    dec = OnnxDecoder(onnx_path, threads)
    ids = np.random.default_rng(0).integers(3, 1000, (1, prefill + steps))
    best = 0.0
    for _ in range(repeats):
        _, past = dec.step(ids[:, :prefill], dec.empty_past(1))
        t0 = time.perf_counter()
        for i in range(prefill, prefill + steps):
            _, past = dec.step(ids[:, i:i + 1], past)
        best = max(best, steps / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, default=FIXTURES / "llama-s", help="tokenizer of the evaluation text")
    ap.add_argument("--text", type=Path, default=FIXTURES / "text" / "eval.txt")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--native", action="store_true", help="also the native variant (needs libwqedge_ort)")
    ap.add_argument("--spread", action="store_true", help="also ref64 and the C++ runtime (float activations)")
    ap.add_argument("--exactness", action="store_true", help="also the group-input graph on the reference's inputs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wqedge_onnx_rotated"))
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per file here")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    tokens, bos = eval_tokens(a.model, a.text.read_text(encoding="utf-8"))
    from wqedge.runtime.gguf_reader import WqGGUF
    for gguf in a.gguf:
        f = WqGGUF(gguf)
        row = {"file": str(gguf), "act_bits": f.act_bits, "rotation": f.rotation, "windows": a.windows}
        t0 = time.time()
        row["ppl_ref"] = ppl_reference(gguf, tokens, bos, a.windows)
        row["ref_s"] = round(time.time() - t0, 1)
        if a.spread:
            row["ppl_ref64"] = ppl_reference64(gguf, tokens, bos, a.windows)
            row["ppl_cpp_f32"] = ppl_cpp(gguf, tokens, bos, a.windows, a.threads)
            row["rel_ref64"], row["rel_cpp_f32"] = (row["ppl_ref64"] / row["ppl_ref"] - 1,
                                                     row["ppl_cpp_f32"] / row["ppl_ref"] - 1)
        if a.exactness:
            row["exactness"] = group_input_exactness(gguf, tokens, bos, a.threads)
        variants = ["portable"] + (["native"] if a.native else [])
        for v in variants:
            info = export(gguf, a.work / f"{gguf.stem}_{v}.onnx", v)
            row[f"onnx_{v}_mb"] = round(info["bytes"] / 1e6, 2)
            row[f"rotation_{v}_mb"] = round(info["linear_bytes_by_kind"].get("rotation", 0) / 1e6, 2)
            t0 = time.time()
            row[f"ppl_onnx_{v}"] = ppl_onnx(info["path"], tokens, bos, a.windows, a.threads)
            row[f"onnx_{v}_s"] = round(time.time() - t0, 1)
            row[f"rel_{v}"] = row[f"ppl_onnx_{v}"] / row["ppl_ref"] - 1
        if a.speed:
            for gi in ("block", "dense", "none"):
                info = export(gguf, a.work / f"{gguf.stem}_speed_{gi}.onnx", "portable", gi)
                row[f"decode_{gi}_tok_s"] = round(decode_speed(info["path"], a.threads, a.repeats), 1)
                row[f"onnx_{gi}_mb"] = round(info["bytes"] / 1e6, 2)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
