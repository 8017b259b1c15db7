"""ONNX export (issue 6): the portable variant run by stock onnxruntime, and the native variant run with
our custom-op library libwqedge_ort, against the PyTorch reference and the C++ runtime.

Criteria: max |logits_onnx - logits_ref| / std(logits_ref) < 1e-2 and top-1 agreement >= 99.9%
- on the trained fixture model over 1,024 tokens of eval.txt (2 windows of 512) for a mixed plan using
  every action with protected columns (also lowering="widen" and "int4"); greedy KV-cache generation
  gives the C++ runtime's tokens;
- on random tiny models (GQA with tied embeddings and ragged chunks; G = 64 with llama3 RoPE and F32
  embeddings); KV-cache decoding == prefill; left padding through attention_mask; external data.
Native variant: the same parity criteria (fixture and tiny models), greedy tokens == the runtime's, one
ChunkLinear node per linear holding exactly the GGUF tensor's bytes, a single node == x W^T for any leading
dims, and clear errors for a missing library and for malformed nodes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ALL_ACTIONS, mixed_action, write_llama_s, write_tiny

onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.engine("onnxruntime")  # run in a child pytest (tests/conftest.py)
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from wqedge.converters import onnx_export
from wqedge.converters.onnx_export import export_onnx
from wqedge.runtime import onnx_session
from wqedge.runtime.gguf_reader import WqGGUF
from wqedge.runtime.onnx_session import OnnxDecoder, make_session

TOL_REL = 1e-2
TOP1 = 0.999


def OrtDecoder(path, threads=2) -> OnnxDecoder:
    """The exported model in onnxruntime (make_session registers libwqedge_ort for a native model)."""
    return OnnxDecoder(path, threads)


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
    _check_kv_cache_decode(OrtDecoder(onnx_path), tokens)


def _check_kv_cache_decode(dec, tokens):
    """Prefill 60 tokens, 10 single-token steps, then a multi-token step == one prefill of everything."""
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


def test_exporter_does_not_import_torch(tiny, tmp_path, ort_lib):
    """Exporting (both variants) and opening a native model with make_session need neither torch nor transformers."""
    import os
    import subprocess
    _, gguf_path, _, _, _ = tiny
    code = ("import sys; from wqedge.converters.onnx_export import export_onnx; "
            "from wqedge.runtime.onnx_session import make_session; "
            f"export_onnx({str(gguf_path)!r}, {str(tmp_path / 'x.onnx')!r}); "
            f"export_onnx({str(gguf_path)!r}, {str(tmp_path / 'n.onnx')!r}, variant='native'); "
            f"make_session({str(tmp_path / 'n.onnx')!r}); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    env = dict(os.environ, WQEDGE_ORT_LIB=str(ort_lib))
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", env=env)  # the installed package
    assert (tmp_path / "x.onnx").is_file() and (tmp_path / "n.onnx").is_file()


def test_variants_and_errors(tiny, tmp_path):
    _, gguf_path, _, _, _ = tiny
    with pytest.raises(ValueError, match="portable variant"):
        export_onnx(gguf_path, tmp_path / "n.onnx", variant="native", lowering="int4")
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
    before = native.get_activations()
    native.set_activations("f32")  # token equality holds for the float reference path (int8 is the default)
    try:
        with native.Context(m, n_ctx=256, n_threads=2) as ctx:
            ours = ctx.generate(prompt, n_new, stop_at_eos=False)
    finally:
        native.set_activations(before)
    got = OrtDecoder(info["path"]).greedy(prompt, n_new)
    print("greedy:", got)
    assert got == list(ours)


# ---------------------------------------------------------------- native variant (libwqedge_ort)
def _ensure_ort_library() -> Path:
    """libwqedge_ort from an existing build or install; otherwise build its CMake target in cpp/build."""
    import os
    import shutil
    import subprocess

    from cpp_support import BUILD, ROOT
    try:
        return onnx_session.custom_ops_library()
    except onnx_session.CustomOpsLibraryNotFound:
        pass
    if not shutil.which("cmake"):
        pytest.skip("libwqedge_ort not built and cmake not available")
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                    "-DWQEDGE_BUILD_ORT_OPS=ON"], check=True, stdout=subprocess.DEVNULL, cwd="/")
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target", "wqedge_ort"],
                   check=True, stdout=subprocess.DEVNULL, cwd="/")
    return onnx_session.custom_ops_library()


@pytest.fixture(scope="module")
def ort_lib():
    return _ensure_ort_library()


@pytest.fixture(scope="module")
def tiny_native(tiny, ort_lib):
    name, gguf_path, onnx_path, tokens, lr = tiny
    info = export_onnx(gguf_path, onnx_path.with_name(f"{name}_native.onnx"), variant="native")
    return name, gguf_path, info, tokens, lr


def _linear_rows(m, node):
    return onnx.numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == node.input[1]))


def _native_rows(f, lin) -> np.ndarray:
    """The rows a ChunkLinear holds: the GGUF tensor's, or, where compact-header chunks occur, the same chunks
    repacked as their fp16-header base kinds (the op reads those)."""
    from wqedge import blocks
    if any(blocks.block_type(a).compact for a in f.layout(lin).actions):
        return np.concatenate([blocks.pack_chunk(blocks.expanded(c)) for c in f.chunks(lin)], axis=1).ravel()
    return np.asarray(f.tensors[lin].data).view(np.uint8).ravel()


def test_tiny_native_graph_is_compact_and_checked(tiny_native):
    """One ChunkLinear per linear, whose weight is byte for byte the GGUF tensor (compact-header chunks expanded
    into their base kinds); nothing else quantized."""
    name, gguf_path, info, _, _ = tiny_native
    onnx.checker.check_model(info["path"], full_check=True)
    m, ops = _ops(info["path"])
    assert {d for d, _ in ops} == {"", "wqedge"} and ("", "BitShift") not in ops
    assert {o.domain: o.version for o in m.opset_import}["wqedge"] == 1
    f = WqGGUF(gguf_path)
    nodes = {n.name: n for n in m.graph.node if n.op_type == "ChunkLinear"}
    assert sorted(nodes) == sorted(f.linear_names())
    for lin, node in nodes.items():
        np.testing.assert_array_equal(_linear_rows(m, node).ravel(), _native_rows(f, lin))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert list(attrs.get("protected_columns", [])) == f.protected_indices(lin).tolist()
    linear_bytes = sum(_native_rows(f, n).size for n in f.linear_names())
    assert info["linear_bytes_by_kind"]["rows"] == linear_bytes
    expansion = linear_bytes - sum(int(f.tensors[n].n_bytes) for n in f.linear_names())   # compact headers widened
    assert info["bytes"] < 1.03 * (info["gguf_bytes"] + expansion)  # the rest: the same dense tensors and a small graph
    assert onnx_session.model_domains(info["path"]) == {"", "wqedge"}


def test_tiny_native_parity_with_reference(tiny_native):
    name, _, info, tokens, lr = tiny_native
    rel, top1 = _compare(OrtDecoder(info["path"]).logits(tokens), lr)
    print(f"{name} native: max|d|/std = {rel:.2e}, top-1 = {top1:.5f}")
    assert rel < 1e-4 and top1 == 1.0


def test_tiny_native_kv_cache_decode_matches_prefill(tiny_native):
    _, _, info, tokens, _ = tiny_native
    _check_kv_cache_decode(OrtDecoder(info["path"]), tokens)


def _single_node_model(node, rows, **override) -> bytes:
    """A model of one ChunkLinear (attributes of `node`, changed by `override`) with weight `rows`."""
    from onnx import TensorProto, helper, numpy_helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.update(override)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    n = helper.make_node("ChunkLinear", ["x", "w"], ["y"], domain="wqedge", name=node.name, **attrs)
    g = helper.make_graph([n], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ascontiguousarray(rows), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("wqedge", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def _native_session(model_bytes, ort_lib, threads=2):
    so = ort.SessionOptions()
    so.add_session_config_entry(onnx_session.THREADS_KEY, str(threads))
    so.register_custom_ops_library(str(ort_lib))
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def test_native_node_is_x_times_dequantized_weights(tiny_native, ort_lib):
    """Y = X W^T with W as the format defines it (WqGGUF.dequantize_linear), for any leading dims:
    one row (the runtime's matvec), many rows (its matmul), 1-D and 3-D X, and zero rows."""
    _, gguf_path, info, _, _ = tiny_native
    f = WqGGUF(gguf_path)
    m = onnx.load(info["path"])
    rng = np.random.default_rng(0)
    for node in m.graph.node:
        if node.op_type != "ChunkLinear" or not node.name.startswith("blk.0."):
            continue
        w = f.dequantize_linear(node.name)
        sess = _native_session(_single_node_model(node, _linear_rows(m, node)), ort_lib)
        for shape in [(w.shape[1],), (1, w.shape[1]), (2, 3, w.shape[1]), (37, w.shape[1]), (0, w.shape[1])]:
            x = rng.normal(0, 1, shape).astype(np.float32)
            y = sess.run(None, {"x": x})[0]
            ref = x.astype(np.float64) @ w.T.astype(np.float64)
            assert y.shape == shape[:-1] + (w.shape[0],)
            if x.size:
                np.testing.assert_allclose(y, ref, atol=1e-5 * float(np.abs(ref).max()), rtol=0)


def test_native_malformed_nodes_are_errors(tiny_native, ort_lib):
    """Bad attributes, weights or inputs give onnxruntime errors with our message (the process survives)."""
    _, _, info, _, _ = tiny_native
    m = onnx.load(info["path"])
    node = next(n for n in m.graph.node if n.op_type == "ChunkLinear" and n.name.endswith("ffn_up.weight"))
    rows = _linear_rows(m, node)
    n_chunks = len(next(a.ints for a in node.attribute if a.name == "chunk_actions"))
    cases = [
        (dict(chunk_actions=[99] * n_chunks), "unknown block type 99"),
        (dict(chunk_actions=[1]), "chunk actions"),
        (dict(N=0), "attribute 'N' = 0 is out of range"),
        (dict(K=None), "attribute 'K'"),
        (dict(chunk_protected=[1] + [0] * (n_chunks - 1), protected_columns=[100000]), "is not inside chunk 0"),
        (dict(protected_columns=[1, 2, 3]), "protected column indices"),
    ]
    for override, message in cases:
        with pytest.raises(Exception, match=message):
            _native_session(_single_node_model(node, rows, **override), ort_lib)
    with pytest.raises(Exception, match=r"input W has shape \[3, 4\]"):
        _native_session(_single_node_model(node, np.zeros((3, 4), np.uint8)), ort_lib)
    with pytest.raises(Exception, match="expected a thread count"):
        _native_session(_single_node_model(node, rows), ort_lib, threads="many")
    sess = _native_session(_single_node_model(node, rows), ort_lib)
    with pytest.raises(Exception, match="last dimension is 5"):
        sess.run(None, {"x": np.zeros((2, 5), np.float32)})
    K = next(a.i for a in node.attribute if a.name == "K")
    assert sess.run(None, {"x": np.zeros((1, K), np.float32)})[0].shape == (1, rows.shape[0])  # still usable


def test_native_external_data(tiny_native, tmp_path, monkeypatch):
    """Weights in <model>.onnx.data: ChunkLinear reads them from onnxruntime's buffer just the same."""
    _, gguf_path, _, tokens, lr = tiny_native
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    info = export_onnx(gguf_path, tmp_path / "ext.onnx", variant="native")
    assert info["external_data"] and (tmp_path / "ext.onnx.data").is_file()
    assert onnx_session.model_domains(info["path"]) == {"", "wqedge"}
    rel, top1 = _compare(OrtDecoder(info["path"]).logits(tokens[:1]), lr[:1])
    assert rel < 1e-4 and top1 == 1.0


def test_native_without_library_says_how_to_get_it(tiny_native, monkeypatch, tmp_path):
    _, _, info, _, _ = tiny_native
    with pytest.raises(Exception, match="wqedge"):  # onnxruntime alone does not know the domain
        ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_session, "candidate_paths", lambda: [tmp_path / "absent" / onnx_session.ORT_LIBNAME])
    with pytest.raises(onnx_session.CustomOpsLibraryNotFound, match="WQEDGE_ORT_LIB") as e:
        make_session(info["path"])
    assert "portable variant" in str(e.value) and "cmake" in str(e.value)
    portable = Path(info["path"]).with_name(info["path"].rsplit("/", 1)[1].replace("_native", ""))
    make_session(portable)  # a portable model does not need the library


@pytest.fixture(scope="module")
def fixture_native(fixture_mixed, ort_lib):
    path, info = fixture_mixed
    return path, export_onnx(path, Path(info["path"]).with_name("mixed_native.onnx"), variant="native")


def test_fixture_native_parity(fixture_native, fixture_windows):
    """The mixed plan (every action, protected columns) through libwqedge_ort: same criteria as portable."""
    path, info = fixture_native
    lr = _reference_logits(path, fixture_windows)
    rel, top1 = _compare(OrtDecoder(info["path"]).logits(fixture_windows), lr)
    print(f"llama-s mixed, native: max|d|/std = {rel:.2e}, top-1 = {top1:.5f}; gguf {info['gguf_bytes']} B, "
          f"onnx {info['bytes']} B")
    assert rel < TOL_REL and top1 >= TOP1
    assert info["bytes"] < 1.01 * info["gguf_bytes"]


def test_fixture_native_greedy_generation_matches_runtime(fixture_native, fixture_windows):
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native
    path, info = fixture_native
    prompt = fixture_windows[0, :24].tolist()
    before = native.get_activations()
    native.set_activations("f32")  # the custom op computes in float: compare with the float decode path
    try:
        with native.Context(native.Model(path), n_ctx=256, n_threads=2) as ctx:
            ours = ctx.generate(prompt, 32, stop_at_eos=False)
    finally:
        native.set_activations(before)
    got = OrtDecoder(info["path"]).greedy(prompt, 32)
    print("greedy native:", got)
    assert got == list(ours)
