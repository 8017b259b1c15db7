"""The quantized output head (wqedge.head, docs/format.md "Output head"): written by the converter as a quantized
linear (output.weight, or token_embd.weight when the embeddings are tied), read back and dequantized by the Python
reader and the PyTorch reference, run by the C++ runtime with the linear kernels (float and int8 activations,
prefill and decode), and files with a dense head unchanged.

Tolerances: float activations against the reference on the same dequantized weights, max |d| / std(ref) < 1e-4 on
random-init tiny models (measured 2-4e-6) and the fixture bars of tests/test_cpp_parity.py (TOL_REL, TOP1); int8
activations the q8 bars of that file (Q8_TOL_REL, Q8_MEAN_REL, Q8_TOP1, perplexity within Q8_PPL_REL).
"""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ensure_library  # noqa: E402

torch = pytest.importorskip("torch")

from wqedge import pipeline  # noqa: E402
from wqedge.alloc.uniform import uniform_plan  # noqa: E402
from wqedge.checkpoint import LlamaCheckpoint  # noqa: E402
from wqedge.head import HEAD_KINDS, check_head, head_actions  # noqa: E402
from wqedge.runtime.gguf_reader import WqGGUF  # noqa: E402

TINY_TOL = 1e-4


def _plan(ckpt, action="q4", method="neuqi"):
    from wqedge.alloc.uniform import model_bits
    linears = ckpt.spec.linears()
    return uniform_plan(linears, 64, model_bits(linears, 64, action), method, action=action,
                        model_fingerprint=ckpt.fingerprint())


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tiny_model_factory, tmp_path_factory):
    """(ckpt, {head kind: file}) of a tiny model (hidden 96: chunks of 64 + a ragged 32), one file per head kind."""
    ckpt = LlamaCheckpoint.open(tiny_model_factory(hidden=96, intermediate=160, tie_embeddings=request.param))
    d = tmp_path_factory.mktemp("head")
    plan = _plan(ckpt)
    files = {h: pipeline.write_gguf(ckpt, plan, d / f"{h}.gguf", head=h) for h in HEAD_KINDS}
    return ckpt, files


def test_file_layout(tiny):
    """The head is one quantized linear of its kind, keyed like a decoder linear; tied files keep one tensor; the
    effective bits and the decoder linears do not change; stock GGUF readers still open the file."""
    ckpt, files = tiny
    tied = ckpt.spec.tie_word_embeddings
    dense = WqGGUF(files["fp16"])
    assert dense.head_kind == "fp16" and not dense.is_quantized(dense.head_tensor)
    for kind in ("q8", "q4"):
        f = WqGGUF(files[kind])
        name = "token_embd.weight" if tied else "output.weight"
        assert f.head_tensor == name and f.head_kind == kind and f.is_quantized(name)
        assert ("output.weight" in f.tensors) == (not tied)
        assert f.spec.tie_word_embeddings == tied
        assert not f.is_quantized("token_embd.weight") or tied
        lay = f.layout(name)
        assert (lay.out_features, lay.in_features) == (ckpt.spec.vocab_size, ckpt.spec.hidden_size)
        assert lay.actions == head_actions(96, 64, kind) == [kind, kind] and sum(lay.protected_counts) == 0
        assert f.effective_bits == dense.effective_bits and f.measured_bits() == dense.measured_bits()
        for lin in f.linear_names():
            np.testing.assert_array_equal(f.dequantize_linear(lin), dense.dequantize_linear(lin))
        # the dequantized head is close to the checkpoint's: relative RMS error of a 256- / 16-level grid (NeUQI
        # may clip a row's range, so no per-weight bound; measured 0.45% q8, 7.7% q4 on random-init weights)
        w = ckpt.get("model.embed_tokens.weight" if tied else "lm_head.weight").float().numpy()
        wq = f.dense(name)
        assert wq.shape == w.shape and wq.dtype == np.float32
        err = float(np.linalg.norm(wq - w) / np.linalg.norm(w))
        print(f"{kind}: relative RMS error {err:.4f}")
        assert err < (0.01 if kind == "q8" else 0.12), (kind, err)
        r = gguf.GGUFReader(files[kind])    # a stock reader lists it as an I8 tensor
        t = {t.name: t for t in r.tensors}[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.I8
        assert files[kind].stat().st_size < files["fp16"].stat().st_size


def test_reference_uses_dequantized_head(tiny):
    """The PyTorch reference runs the file's dequantized head (and, tied, the same dequantized embeddings)."""
    from wqedge.reference import load_reference
    ckpt, files = tiny
    f = WqGGUF(files["q4"])
    model = load_reference(files["q4"])
    head = f.dense(f.head_tensor)
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), head)
    if ckpt.spec.tie_word_embeddings:
        np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), head)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_cpp_parity(tiny, kind):
    """C++ logits on the same file as the reference: float activations within 1e-4 of the spread (prefill and
    decode steps, 1 and 3 threads); int8 activations (the decode default) close to float; tiled (the AVX2 default)
    and row layouts agree."""
    ensure_library()
    from wqedge.reference import load_reference, logits_fn
    from wqedge.runtime import native
    _, files = tiny
    path = files[kind]
    toks = np.random.default_rng(1).integers(0, 512, (2, 48)).astype(np.int32)
    lr = logits_fn(load_reference(path))(toks)
    native.set_activations("f32")
    try:
        for threads in (1, 3):
            lc = native.logits_fn(path, n_threads=threads)(toks)
            assert np.abs(lc - lr).max() / lr.std() < TINY_TOL, (kind, threads)
        m = native.Model(path)
        with native.Context(m, n_ctx=64, n_threads=2) as ctx:
            steps = np.stack([ctx.eval(toks[0, i:i + 1]) for i in range(toks.shape[1])])
        assert np.abs(steps - lr[0]).max() / lr.std() < TINY_TOL
        native.set_activations("q8")
        with native.Context(m, n_ctx=64, n_threads=2) as ctx:
            q8 = np.stack([ctx.eval(toks[0, i:i + 1]) for i in range(toks.shape[1])])
        assert np.abs(q8 - lr[0]).max() / lr.std() < 0.3   # random-init models: measured 0.13-0.19 (prefill)
    finally:
        native.set_activations("f32")


def test_row_layout_matches_tiles(tiny, tmp_path):
    """WQEDGE_REPACK=0 (the file's row layout, NEON's default) gives the tiled runtime's logits for a q4 head."""
    import os
    import subprocess
    ensure_library()
    _, files = tiny
    code = ("import sys, numpy as np; from wqedge.runtime import native; native.set_activations('f32'); "
            "t = np.arange(1, 33, dtype=np.int32)[None]; np.save(sys.argv[2], native.logits_fn(sys.argv[1], n_threads=2)(t))")
    out = {}
    for rep in ("0", "1"):
        env = dict(os.environ, WQEDGE_REPACK=rep)
        # cwd: not the checkout, whose wqedge/ (without runtime/) would shadow the installed package
        subprocess.run([sys.executable, "-c", code, str(files["q4"]), str(tmp_path / f"r{rep}.npy")], env=env,
                       check=True, cwd=tmp_path)
        out[rep] = np.load(tmp_path / f"r{rep}.npy")
    assert np.abs(out["0"] - out["1"]).max() / out["1"].std() < 1e-5


def test_fixture_model_parity(llama_s_dir, tmp_path):
    """llama-s (untied) at q4 with a q8 head: float activations at test_cpp_parity's fixture bars over 2 x 512
    tokens, and int8 decode steps at its q8 bars (logits and perplexity)."""
    ensure_library()
    from test_cpp_parity import (Q8_MEAN_REL, Q8_PPL_REL, Q8_TOL_REL, Q8_TOP1, TOL_REL, TOP1, _compare,
                                 _reference_logits, q8_decode_vs_reference)
    from transformers import AutoTokenizer

    from wqedge.perplexity import make_windows
    from wqedge.runtime import native
    ckpt = LlamaCheckpoint.open(llama_s_dir)
    plan = uniform_plan(ckpt.spec.linears(), 128, 4.25, "minmax", action="q4", model_fingerprint=ckpt.fingerprint())
    path = pipeline.write_gguf(ckpt, plan, tmp_path / "q4.q8head.gguf", head="q8")
    assert WqGGUF(path).head_kind == "q8"
    text = (llama_s_dir.parent / "text" / "eval.txt").read_text(encoding="utf-8")[:40000]
    tok = AutoTokenizer.from_pretrained(llama_s_dir)
    win = make_windows(tok(text)["input_ids"], tok.bos_token_id, n_ctx=512, n_windows=2)
    lr = _reference_logits(path, win)
    native.set_activations("f32")
    rel, top1 = _compare(native.logits_fn(path)(win), lr)
    print(f"q4 + q8 head, f32: max|d|/std = {rel:.2e}, top-1 = {top1:.5f}")
    assert rel < TOL_REL and top1 >= TOP1
    rel, mean, top1, pq, pr = q8_decode_vs_reference(path, win, lr, "q4 + q8 head")
    assert rel < Q8_TOL_REL and mean < Q8_MEAN_REL and top1 >= Q8_TOP1
    assert abs(pq / pr - 1) < Q8_PPL_REL


def test_head_kind_per_target():
    """Our GGUF and the llama.cpp GGUF take the head asked for (DEFAULT_HEAD when none); ONNX keeps its dense head
    and says so."""
    said = []
    assert pipeline.head_kind("gguf") == pipeline.DEFAULT_HEAD
    assert pipeline.head_kind("gguf", "q4") == "q4"
    assert pipeline.head_kind("llamacpp", None, said.append) == pipeline.DEFAULT_HEAD
    assert pipeline.head_kind("llamacpp", "q4", said.append) == "q4" and not said
    assert pipeline.head_kind("onnx", "q8", said.append) == "fp16"
    assert len(said) == 1 and "--head q8 ignored for --target onnx" in said[0]
    assert pipeline.head_kind("onnx", None, said.append) == "fp16" and len(said) == 1   # the default: no message
    assert set(pipeline.LLAMACPP_HEAD_TYPES) == set(HEAD_KINDS)
    with pytest.raises(pipeline.ConvertError, match="unknown output head kind 'q5'"):
        pipeline.head_kind("gguf", "q5")
    with pytest.raises(ValueError):
        check_head("q2")


def test_cli_head_option(tiny_model_factory, tmp_path):
    """`wqedge convert --head` reaches the file and `wqedge inspect` reports it."""
    from click.testing import CliRunner

    from wqedge.cli import main
    src = tiny_model_factory()
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(src), "--preset", "q4", "--no-self-calib", "--no-check",
                                  "--head", "q4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert WqGGUF(out).head_kind == "q4"
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "output head: output.weight (q4;" in r.output
    r = CliRunner().invoke(main, ["convert", "--help"])
    assert "--head" in r.output
    # without --head: the default (q8 since bench/results/head_quant.md)
    r = CliRunner().invoke(main, ["convert", str(src), "--preset", "q4", "--no-self-calib", "--no-check",
                                  "-o", str(tmp_path / "d.gguf")])
    assert r.exit_code == 0, r.output
    assert WqGGUF(tmp_path / "d.gguf").head_kind == pipeline.DEFAULT_HEAD == "q8"


def test_malformed_head_is_refused(tiny, tmp_path):
    """A quantized head whose keys disagree with its rows is a format error in both readers."""
    ensure_library()
    from wqedge.runtime import native
    from wqedge.runtime.gguf_check import FormatError
    ckpt, files = tiny
    name = "token_embd.weight" if ckpt.spec.tie_word_embeddings else "output.weight"
    data = bytearray(files["q8"].read_bytes())
    key = f"wqedge.tensors.{name}.in_features".encode()
    i = data.find(key)
    assert i > 0
    # the value follows the key and its u32 type tag: 96 -> 64 columns
    at = i + len(key) + 4
    assert int.from_bytes(data[at:at + 4], "little") == 96
    data[at:at + 4] = (64).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(native.NativeError, match="in_features"):
        native.Model(bad)
    with pytest.raises(FormatError):
        WqGGUF(bad).dense(name)


def test_nonfinite_quantized_head_names_the_tensor(tiny, tmp_path):
    """A non-finite scale in the quantized head: the logits check names the tensor and the row (cpp/README.md
    "Non-finite values"); tied, the embedding row is also refused when looked up (other tokens' rows still run)."""
    import shutil
    import struct
    ensure_library()
    from wqedge.runtime import native
    ckpt, files = tiny
    tied = ckpt.spec.tie_word_embeddings
    name = "token_embd.weight" if tied else "output.weight"
    p = tmp_path / "poisoned.gguf"
    shutil.copy(files["q8"], p)
    rb = WqGGUF(p).layout(name).row_bytes
    t = {t.name: t for t in gguf.GGUFReader(p).tensors}[name]
    raw = bytearray(p.read_bytes())
    struct.pack_into("<H", raw, int(t.data_offset) + 9 * rb, 0x7C00)   # row 9, first chunk's d = +Inf
    p.write_bytes(bytes(raw))
    m = native.Model(p)
    with native.Context(m, n_ctx=16, n_threads=1) as ctx:
        if tied:   # the lookup of token 9 is refused before anything runs; other tokens' rows are fine
            ctx.eval([1, 5, 7], want_logits=False)
            with pytest.raises(native.NativeError, match=r"'token_embd.weight' holds a non-finite value in row 9"):
                ctx.eval([3, 9], want_logits=False)
            assert ctx.position == 3
        with pytest.raises(native.NativeError, match=rf"non-finite logits.*'{name}'.*row 9"):
            ctx.eval([1, 5, 7])
