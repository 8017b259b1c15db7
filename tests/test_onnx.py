"""ONNX export (issue 6): the portable variant run by stock onnxruntime against the PyTorch reference
and the C++ runtime.

Criteria: max |logits_onnx - logits_ref| / std(logits_ref) < 1e-2 and top-1 agreement >= 99.9%
- on the trained fixture model over 1,024 tokens of eval.txt (2 windows of 512) for a mixed plan using
  every action with protected columns (also lowering="widen" and "int4"); greedy KV-cache generation
  gives the C++ runtime's tokens;
- on random tiny models (GQA with tied embeddings and ragged chunks; G = 64 with llama3 RoPE and F32
  embeddings); KV-cache decoding == prefill; left padding through attention_mask; external data.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ALL_ACTIONS, mixed_action, write_llama_s, write_tiny

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from wqedge.converters import onnx_export
from wqedge.converters.onnx_export import export_onnx
from wqedge.runtime.gguf_reader import WqGGUF

TOL_REL = 1e-2
TOP1 = 0.999


class OrtDecoder:
    """Runs an exported model with onnxruntime, GenAI-style: prefill, then one token at a time."""

    def __init__(self, path, threads=2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        shape = next(i.shape for i in self.sess.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch):
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def step(self, ids, past, mask=None, positions=None):
        """ids int64[B, S]; past from empty_past or a previous step -> (logits [B, S, V], present)."""
        ids = np.asarray(ids, np.int64)
        b, s = ids.shape
        p = next(iter(past.values())).shape[2]
        mask = np.ones((b, p + s), np.int64) if mask is None else np.asarray(mask, np.int64)
        if positions is None:
            positions = np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1))
        outs = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
        names = [o.name for o in self.sess.get_outputs()]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}
        return outs[0], present

    def logits(self, windows):
        windows = np.asarray(windows, np.int64)
        return self.step(windows, self.empty_past(len(windows)))[0]

    def greedy(self, prompt, n_new):
        logits, past = self.step(np.asarray([prompt]), self.empty_past(1))
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            logits, past = self.step(np.asarray([[tok]]), past)
        return out


def _reference_logits(path, windows) -> np.ndarray:
    from wqedge.reference import load_reference, logits_fn
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return logits_fn(load_reference(path))(windows)


def _compare(lo, lr):
    assert lo.shape == lr.shape and np.isfinite(lo).all()
    return float(np.abs(lo - lr).max() / lr.std()), float((lo.argmax(-1) == lr.argmax(-1)).mean())


def _ops(model_path):
    m = onnx.load(str(model_path), load_external_data=False)
    return m, [(n.domain, n.op_type) for n in m.graph.node]


# ---------------------------------------------------------------- random tiny models
TINY = {  # every one uses every action (write_tiny's default mix) and protected columns
    # GQA (6 heads over 2), tied embeddings, K = 228 -> chunks 128 + 100, F = 356 -> 128, 128, 100.
    "gqa_tied_ragged": dict(D=228, H=6, KV=2, hd=16, F=356, V=300, G=128, tied=True, layers=3),
    # G = 64, ragged g = 8 (F = 200), llama3 RoPE scaling (rope_freqs), F32 untied embeddings, every chunk protected.
    "llama3_rope_f32": dict(D=96, H=4, KV=4, hd=24, F=200, V=200, G=64, emb_dtype=np.float32,
                            protect=lambda n, c, g: 3,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # G = 96 (not a power of two: MatMulNBits blocks of 32), chunks 96 + 96 + 8, multi-query attention.
    "g96_mqa": dict(D=200, H=4, KV=1, hd=32, F=300, V=150, G=96, layers=2),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_tiny")
    kw = dict(TINY[request.param])
    path = write_tiny(d / f"{request.param}.gguf", seed=3, **kw)
    info = export_onnx(path, d / f"{request.param}.onnx")
    tokens = np.random.default_rng(5).integers(0, kw["V"], size=(2, 96))
    return request.param, path, Path(info["path"]), tokens, _reference_logits(path, tokens)


def test_tiny_parity_with_reference(tiny):
    name, gguf_path, onnx_path, tokens, lr = tiny
    f = WqGGUF(gguf_path)
    assert {a for n in f.linear_names() for a in f.layout(n).actions} == set(ALL_ACTIONS)
    dec = OrtDecoder(onnx_path)
    rel, top1 = _compare(dec.logits(tokens), lr)
    print(f"{name}: max|d|/std = {rel:.2e}, top-1 = {top1:.5f}")
    assert rel < 1e-4 and top1 == 1.0


def test_tiny_graph_is_stock_and_checked(tiny):
    name, gguf_path, onnx_path, _, _ = tiny
    onnx.checker.check_model(str(onnx_path), full_check=True)
    m, ops = _ops(onnx_path)
    domains = {d for d, _ in ops}
    assert domains <= {"", "com.microsoft"}
    nbits = sorted({next(a.i for a in n.attribute if a.name == "bits")
                    for n in m.graph.node if n.op_type == "MatMulNBits"})
    assert nbits == [2, 4, 8]  # q2, q4, q8 groups; q3 / ternary / q1 are unpacked with standard operators
    assert ("", "BitShift") in ops
    names_in = [i.name for i in m.graph.input]
    names_out = [o.name for o in m.graph.output]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in names_in and "present.0.value" in names_out and names_out[0] == "logits"
    assert (onnx_path.parent / "genai_config.json").is_file()


def test_tiny_kv_cache_decode_matches_prefill(tiny):
    name, _, onnx_path, tokens, lr = tiny
    dec = OrtDecoder(onnx_path)
    full = dec.logits(tokens)
    logits, past = dec.step(tokens[:, :60], dec.empty_past(2))
    steps = [logits[:, -1]]
    for i in range(60, 70):
        logits, past = dec.step(tokens[:, i:i + 1], past)
        steps.append(logits[:, -1])
    logits, past = dec.step(tokens[:, 70:], past)  # a multi-token step on top of a cache
    assert next(iter(past.values())).shape[2] == tokens.shape[1]
    got = np.concatenate([np.stack(steps, axis=1), logits], axis=1)
    np.testing.assert_allclose(got, full[:, 59:], atol=1e-4 * float(full.std()), rtol=0)


def test_tiny_left_padding_through_attention_mask(tiny):
    """A left-padded row (mask 0, positions from the first real token) gives the unpadded row's logits."""
    name, _, onnx_path, tokens, _ = tiny
    dec = OrtDecoder(onnx_path)
    seq = tokens[0, :40]
    ref = dec.logits(seq[None])[0]
    pad = 7
    ids = np.stack([np.concatenate([np.zeros(pad, np.int64), seq]), tokens[1, :40 + pad]])
    mask = np.ones_like(ids)
    mask[0, :pad] = 0
    pos = np.stack([np.concatenate([np.zeros(pad, np.int64), np.arange(40)]), np.arange(40 + pad)])
    logits, past = dec.step(ids, dec.empty_past(2), mask=mask, positions=pos)
    np.testing.assert_allclose(logits[0, pad:], ref, atol=1e-4 * float(ref.std()), rtol=0)
    # and one decode step on top of the padded cache
    nxt = np.array([[5], [6]])
    step, _ = dec.step(nxt, past, mask=np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
                       positions=np.array([[40], [40 + pad]]))
    alone = dec.logits(np.concatenate([seq, [5]])[None])[0, -1]
    np.testing.assert_allclose(step[0, -1], alone, atol=1e-4 * float(alone.std()), rtol=0)


@pytest.mark.parametrize("lowering,bits", [("widen", [2, 4, 8]), ("int4", [4])])
def test_tiny_other_lowerings(tiny, tmp_path, lowering, bits):
    """widen: q3 in 4-bit, ternary and q1 in 2-bit MatMulNBits; int4: one 4-bit MatMulNBits per linear
    (q8 as two nibble planes). Neither unpacks codes in the graph."""
    name, gguf_path, _, tokens, lr = tiny
    export_onnx(gguf_path, tmp_path / "w.onnx", lowering=lowering)
    m, ops = _ops(tmp_path / "w.onnx")
    assert ("", "BitShift") not in ops
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert sorted({next(a.i for a in n.attribute if a.name == "bits") for n in nodes}) == bits
    if lowering == "int4":
        n_layers = sum(1 for i in m.graph.input if i.name.endswith(".key"))
        assert len(nodes) <= 7 * n_layers  # at most one per linear
    rel, top1 = _compare(OrtDecoder(tmp_path / "w.onnx").logits(tokens), lr)
    print(f"{name} {lowering}: max|d|/std = {rel:.2e}")
    assert rel < 1e-4 and top1 == 1.0


def test_int4_lowering_pads_ragged_q8_planes(tmp_path):
    """All-q8 with a ragged chunk (K = 228 -> 128 + 100): the lo and hi nibble planes of the ragged chunk
    are not last in the node's K, so they are padded to G with a zero column."""
    path = write_tiny(tmp_path / "q8.gguf", D=228, H=6, KV=2, hd=16, F=356, V=300, G=128, layers=1, seed=4,
                      actions=lambda n, c: "q8" if c % 2 == 0 else "q2")
    tokens = np.random.default_rng(1).integers(0, 300, size=(1, 40))
    lr = _reference_logits(path, tokens)
    export_onnx(path, tmp_path / "q8.onnx", lowering="int4")
    m, ops = _ops(tmp_path / "q8.onnx")
    assert ("", "Pad") in ops
    rel, top1 = _compare(OrtDecoder(tmp_path / "q8.onnx").logits(tokens), lr)
    assert rel < 1e-4 and top1 == 1.0


def test_option_errors(tiny, tmp_path):
    _, gguf_path, _, _, _ = tiny
    with pytest.raises(ValueError, match="unknown lowering"):
        export_onnx(gguf_path, tmp_path / "x.onnx", lowering="cast")
    with pytest.raises(ValueError, match="accuracy_level"):
        export_onnx(gguf_path, tmp_path / "x.onnx", accuracy_level=7)
    assert list(tmp_path.iterdir()) == []


def test_external_data_when_large(tiny, tmp_path, monkeypatch):
    name, gguf_path, onnx_path, tokens, lr = tiny
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    info = export_onnx(gguf_path, tmp_path / "ext.onnx")
    assert info["external_data"] and (tmp_path / "ext.onnx.data").is_file()
    assert (tmp_path / "ext.onnx").stat().st_size < 200_000
    onnx.checker.check_model(str(tmp_path / "ext.onnx"))
    rel, top1 = _compare(OrtDecoder(tmp_path / "ext.onnx").logits(tokens[:1]), lr[:1])
    assert rel < 1e-4


def test_exporter_does_not_import_torch(tiny, tmp_path):
    import subprocess
    _, gguf_path, _, _, _ = tiny
    code = ("import sys; from wqedge.converters.onnx_export import export_onnx; "
            f"export_onnx({str(gguf_path)!r}, {str(tmp_path / 'x.onnx')!r}); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")  # the installed package, not the checkout
    assert (tmp_path / "x.onnx").is_file()


def test_variants_and_errors(tiny, tmp_path):
    _, gguf_path, _, _, _ = tiny
    with pytest.raises(NotImplementedError, match="C API headers"):
        export_onnx(gguf_path, tmp_path / "n.onnx", variant="native")
    with pytest.raises(ValueError, match="unknown ONNX variant"):
        export_onnx(gguf_path, tmp_path / "n.onnx", variant="fast")
    assert list(tmp_path.iterdir()) == []
    steps = []
    export_onnx(gguf_path, tmp_path / "p.onnx", progress=lambda i, n, what: steps.append((i, n, what)))
    assert steps[-1][0] == steps[-1][1] and len(steps) == steps[-1][1]


# ---------------------------------------------------------------- the trained fixture model
@pytest.fixture(scope="module")
def fixture_mixed(llama_s_dir, fixture_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_llama_s")
    path = write_llama_s(d / "mixed.gguf", llama_s_dir, mixed_action, lambda n, c, g: 4 if c % 3 == 0 else 0)
    info = export_onnx(path, d / "mixed.onnx")
    return path, info


@pytest.fixture(scope="module")
def fixture_windows(llama_s_dir, fixture_dir):
    """2 windows x 512 tokens of eval.txt (BOS first), tokenized by Hugging Face."""
    from transformers import AutoTokenizer

    from wqedge.perplexity import make_windows
    tok = AutoTokenizer.from_pretrained(llama_s_dir)
    text = (fixture_dir / "text" / "eval.txt").read_text(encoding="utf-8")[:20000]
    windows = make_windows(tok(text)["input_ids"], tok.bos_token_id, n_ctx=512, n_windows=2)
    assert windows.size == 1024
    return windows


def test_fixture_mixed_plan_parity(fixture_mixed, fixture_windows):
    path, info = fixture_mixed
    f = WqGGUF(path)
    assert {a for n in f.linear_names() for a in f.layout(n).actions} == set(ALL_ACTIONS)
    assert sum(sum(f.layout(n).protected_counts) for n in f.linear_names()) > 0
    lo = OrtDecoder(info["path"]).logits(fixture_windows)
    lr = _reference_logits(path, fixture_windows)
    rel, top1 = _compare(lo, lr)
    print(f"llama-s mixed: max|d|/std = {rel:.2e}, top-1 = {top1:.5f}; gguf {info['gguf_bytes']} B, "
          f"onnx {info['bytes']} B")
    assert rel < TOL_REL and top1 >= TOP1
    for lowering in ("widen", "int4"):
        other = export_onnx(path, Path(info["path"]).with_name(f"mixed_{lowering}.onnx"), lowering=lowering)
        rel_o, top1_o = _compare(OrtDecoder(other["path"]).logits(fixture_windows), lr)
        print(f"llama-s mixed, lowering={lowering}: max|d|/std = {rel_o:.2e}, top-1 = {top1_o:.5f}; "
              f"onnx {other['bytes']} B")
        assert rel_o < TOL_REL and top1_o >= TOP1


def test_fixture_greedy_generation_matches_runtime(fixture_mixed, fixture_windows):
    """Greedy generation through the ONNX KV cache == the C++ runtime's (wqedge.runtime.native)."""
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native
    path, info = fixture_mixed
    prompt = fixture_windows[0, :24].tolist()
    n_new = 32
    m = native.Model(path)
    with native.Context(m, n_ctx=256, n_threads=2) as ctx:
        ours = ctx.generate(prompt, n_new, stop_at_eos=False)
    got = OrtDecoder(info["path"]).greedy(prompt, n_new)
    print("greedy:", got)
    assert got == list(ours)
