"""Two-level (subscale) block kinds q4s, q3s, q2s (issue 13): format, price, fitting, kernels, runtime parity.

- pack/unpack round trip of every field (d, dmin, 6-bit sub-scale and sub-min codes, codes, residuals) at chunk
  widths that are and are not multiples of 32, and the sub-scale byte layout of docs/format.md on a worked example;
- the price is exact: bits per weight from the traits table (4.625 / 3.625 / 2.625 at G = 128, 4.5 / 3.5 / 2.5 at
  G = 256) equal 8 x the bytes of a written file's linears over their weights;
- the fitters (min-max, NeUQI; error feedback) put the codes on the stored two-level grid and beat the one-scale kind
  of the same code width on weights with outliers;
- C++ kernels: dequantization bit-identical to blocks.unpack_chunk (scalar and AVX2), float dots within 1e-5 of the
  magnitude of their terms of the numpy dot, int8 dots within that of a numpy model of the same arithmetic
  (activations quantized per 32 columns, sub-block mins times the quantized block sum); NEON runs the same C++
  kernel tests under qemu (tests/test_aarch64.py, cpp/tests/test_kernels.cpp cover every kind id);
- the C++ runtime's logits equal the PyTorch reference's on a small random model quantized with the new kinds
  (ragged chunks of 64 and 4 columns), scalar and AVX2, float and int8 activations.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wqedge import blocks
from wqedge.blocks import ChunkData, block_type, pack_chunk, unpack_chunk

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUBS = ("q4s", "q3s", "q2s")
WIDTHS = (1, 17, 32, 100, 128, 256)


def random_sub_chunk(action, n, g, rng, n_prot=0, mode="random"):
    bt = block_type(action)
    k = blocks.n_sub(blocks.padded(g))
    c = ChunkData(action, g, codes=rng.integers(0, bt.levels, (n, g)).astype(np.uint8),
                  d=rng.uniform(1e-4, 3e-3, n).astype(np.float16), m=rng.uniform(0, 3e-3, n).astype(np.float16),
                  sc=rng.integers(0, 64, (n, k)).astype(np.uint8), mn=rng.integers(0, 64, (n, k)).astype(np.uint8))
    if mode == "extreme":
        c.d[:] = 65504
        c.m[:] = -65504
        c.sc[:] = 63
        c.mn[:] = 63
    elif mode == "zero":
        c.d[:] = 0
        c.m[:] = 0
    if n_prot:
        c.protected = np.sort(rng.choice(g, n_prot, replace=False))
        c.residuals = rng.normal(0, 0.01, (n, n_prot)).astype(np.float16)
    return c


# ---------------------------------------------------------------- format

@pytest.mark.parametrize("action", SUBS)
def test_pack_unpack_round_trip(action):
    rng = np.random.default_rng(1)
    for g in WIDTHS:
        for n_prot in (0, min(3, g)):
            c = random_sub_chunk(action, 7, g, rng, n_prot)
            rb = pack_chunk(c)
            assert rb.shape == (7, block_type(action).row_bytes(g, n_prot))
            back = blocks.decode_chunk(rb, action, g, c.protected)
            for f in ("codes", "sc", "mn"):
                np.testing.assert_array_equal(getattr(back, f), getattr(c, f))
            np.testing.assert_array_equal(back.d, c.d.astype(np.float32))
            np.testing.assert_array_equal(back.m, c.m.astype(np.float32))
            if n_prot:
                np.testing.assert_array_equal(back.residuals, c.residuals)
            w = unpack_chunk(rb, action, g, c.protected)
            np.testing.assert_array_equal(w.view(np.uint32), blocks.dequantize_chunk(c).view(np.uint32))


def test_subscale_byte_layout_and_formula():
    # 3 sub-blocks (g = 96): 3 low-nibble bytes, then 2 bytes of high nibbles (sub-block 2 in the low nibble of byte 1)
    sc = np.array([[0x3F, 0x12, 0x25]], np.uint8)
    mn = np.array([[0x01, 0x30, 0x2A]], np.uint8)
    b = blocks.pack_subscales(sc, mn)
    assert b.tolist() == [[0x1F, 0x02, 0xA5, (0x3 | 0x0 << 2) | (0x1 | 0x3 << 2) << 4, 0x2 | 0x2 << 2]]
    s2, m2 = blocks.unpack_subscales(b, 3)
    assert s2.tolist() == sc.tolist() and m2.tolist() == mn.tolist()
    c = ChunkData("q4s", 96, codes=np.full((1, 96), 3, np.uint8), d=np.array([0.5], np.float16),
                  m=np.array([0.25], np.float16), sc=sc, mn=mn)
    w = blocks.dequantize_chunk(c)
    assert w[0, 0] == 0.5 * 63 * 3 - 0.25 * 1 and w[0, 40] == 0.5 * 18 * 3 - 0.25 * 48 and w[0, 95] == 0.5 * 37 * 3 - 0.25 * 42
    with pytest.raises(ValueError, match="sub-scale codes out of range"):
        blocks.pack_subscales(np.array([[64]], np.uint8), np.array([[0]], np.uint8))
    with pytest.raises(ValueError, match="needs sc and mn"):
        pack_chunk(ChunkData("q3s", 96, codes=np.zeros((1, 96), np.uint8), d=c.d, m=c.m))


def test_price_is_exact():
    assert [blocks.effective_bits(a, 128) for a in SUBS] == [4.625, 3.625, 2.625]
    assert [blocks.effective_bits(a, 256) for a in SUBS] == [4.5, 3.5, 2.5]
    # a ragged chunk pays its sub-scales and header over fewer columns, exactly
    assert blocks.chunk_bits("q4s", 10, 100, 2) == 8 * 10 * (4 + 6 + 64 + 4) + 32
    assert blocks.block_type("q4s").code == 7 and blocks.block_type("q2s").code == 9
    assert not set(SUBS) & set(blocks.ALLOCATOR_ACTIONS)     # offered by name (measured: bench/results/subscale.md)


# ---------------------------------------------------------------- fitting

def _outlier_weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.01] *= 12       # sparse outliers, as in trained checkpoints
    return w


@pytest.mark.parametrize("method", ["minmax", "neuqi"])
def test_two_level_fit_beats_one_scale(method):
    from wqedge.quant.fit import dequantize_chunk, fit_linear
    w = _outlier_weights(64, 512)
    for one, two in (("q4", "q4s"), ("q3", "q3s"), ("q2", "q2s")):
        e1 = float((torch.cat([dequantize_chunk(c) for c in fit_linear(w, [one] * 4, 128, method)], 1) - w).square().sum())
        cs = fit_linear(w, [two] * 2, 256, method)
        e2 = float((torch.cat([dequantize_chunk(c) for c in cs], 1) - w).square().sum())
        assert e2 < 0.8 * e1, (one, two, e1, e2)
        for c in cs:   # codes are the nearest levels of the stored grid: requantizing changes nothing
            back = blocks.unpack_chunk(pack_chunk(c), two, c.g)
            np.testing.assert_array_equal(back, blocks.dequantize_chunk(c))
            assert c.sc.max() <= 63 and c.mn.max() <= 63


def test_ragged_and_constant_rows_fit():
    from wqedge.quant.fit import dequantize_chunk, fit_chunk
    w = _outlier_weights(6, 100)
    w[2] = -0.125        # constant rows are stored exactly
    w[3] = 0.0625
    for a in SUBS:
        for method in ("minmax", "neuqi"):
            c = fit_chunk(w, a, method, protected=[0, 99])
            deq = dequantize_chunk(c)
            assert torch.equal(deq[2], w[2]) and torch.equal(deq[3], w[3])
            assert torch.allclose(deq[:, [0, 99]], w[:, [0, 99]], rtol=0, atol=1e-4)   # fp16 residuals
            back = blocks.unpack_chunk(pack_chunk(c), a, 100, c.protected)
            np.testing.assert_array_equal(back, deq.numpy())


def test_error_feedback_rounds_onto_the_sub_block_grid():
    from wqedge.quant.fit import dequantize_chunk, fit_linear
    from wqedge.quant.gptq import gptq_linear
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 320, generator=g) @ (torch.eye(320) + 0.3 * torch.randn(320, 320, generator=g) / 18)
    xtx = X.T @ X
    w = _outlier_weights(48, 320, seed=2)
    for a in SUBS:
        acts = [a] * 2          # G = 256: one full chunk and a ragged one of 64 columns
        fb = gptq_linear(w, xtx, acts, 256, "neuqi")
        plain = fit_linear(w, acts, 256, "neuqi", h=torch.diag(xtx))

        def loss(cs):
            e = (torch.cat([dequantize_chunk(c) for c in cs], 1) - w).double()
            return float(torch.einsum("ik,kl,il->", e, xtx.double(), e))
        assert loss(fb) < loss(plain), a
        for c in fb:        # the file holds exactly what error feedback computed
            np.testing.assert_array_equal(blocks.unpack_chunk(pack_chunk(c), a, c.g), blocks.dequantize_chunk(c))


# ---------------------------------------------------------------- C++ kernels

@pytest.fixture(scope="module")
def native():
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native as n
    return n


def _kernels(native):
    return ["scalar"] + (["avx2"] if "avx2+fma+f16c=1" in native.system_info() else [])


def _x8(x, g):
    """Activations as the int8 kernels see them: per 32 columns d = max|x| / 127, q = rint(x / d)."""
    xp = np.zeros(blocks.padded(g), np.float32)
    xp[:g] = x
    v = xp.reshape(-1, 32)
    amax = np.abs(v).max(1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(v * inv[:, None]), -127, 127)
    return (d[:, None].astype(np.float64) * q).reshape(-1)[:g], d


@pytest.mark.parametrize("action", SUBS)
def test_kernels_match_numpy(native, action):
    rng = np.random.default_rng(11)
    code = block_type(action).code
    for g in WIDTHS:
        for n_prot in (0, min(3, g)):
            for mode in ("random", "extreme", "zero"):
                c = random_sub_chunk(action, 9, g, rng, n_prot, mode)
                rb = pack_chunk(c)
                ref_w = unpack_chunk(rb, action, g, c.protected)
                x = rng.standard_normal(g).astype(np.float32) * (1e3 if mode == "extreme" else 1.0)
                if g > 40:
                    x[37] *= 50
                # |terms| of the two-level sums: |D q x| + |M x| <= (|w| + 2 |M|) |x| per column
                M = np.abs(c.m.astype(np.float64))[:, None] * 63
                mag = (np.abs(ref_w.astype(np.float64)) + 2 * M) @ np.abs(x.astype(np.float64))
                tol = 1e-5 * mag + 1e-30
                ref = ref_w.astype(np.float64) @ x.astype(np.float64)
                xh, db = _x8(x, g)
                wq = ref_w.astype(np.float64)
                if n_prot:                   # residuals meet the float activations
                    wq[:, c.protected] -= c.residuals.astype(np.float64)
                    res = c.residuals.astype(np.float64) @ x[c.protected].astype(np.float64)
                    resmag = np.abs(c.residuals.astype(np.float64)) @ np.abs(x[c.protected].astype(np.float64))
                else:
                    res = resmag = 0.0
                model8 = wq @ xh + res
                mag8 = (np.abs(wq) + 2 * M) @ (np.abs(x) + db[np.arange(g) // 32]) + resmag + 1e-30
                for k in _kernels(native):
                    w = native.chunk_dequant(code, g, c.protected, rb, kernels=k)
                    assert np.array_equal(w.view(np.uint32), ref_w.view(np.uint32)), (action, g, mode, k)
                    y = native.chunk_matvec(code, g, c.protected, rb, x, kernels=k).astype(np.float64)
                    assert np.all(np.abs(y - ref) <= tol), (action, g, n_prot, mode, k)
                    y8 = native.chunk_matvec(code, g, c.protected, rb, x, kernels=k, act="q8").astype(np.float64)
                    assert np.all(np.abs(y8 - model8) <= 1e-5 * mag8), (action, g, n_prot, mode, k)


# ---------------------------------------------------------------- runtime parity on a small random model

@pytest.fixture(scope="module")
def sub_model(tmp_path_factory):
    """A random model (GQA, D = 64, F = 100: chunks of 64 and of 96 + 4 columns at G = 96) quantized by the fitters
    with the three subscale kinds (and a q4 chunk beside them), with protected columns."""
    from cpp_support import write_wq
    from wqedge.quant.fit import fit_chunk
    rng = np.random.default_rng(5)
    D, L, H, KV, hd, F, V, G = 64, 2, 4, 2, 16, 100, 96, 96
    dense = {"token_embd.weight": rng.normal(0, 1.0, (V, D)).astype(np.float16),
             "output_norm.weight": rng.uniform(0.8, 1.2, D).astype(np.float32),
             "output.weight": rng.normal(0, 0.1, (V, D)).astype(np.float16)}
    for i in range(L):
        dense[f"blk.{i}.attn_norm.weight"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
        dense[f"blk.{i}.ffn_norm.weight"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
    acts = SUBS + ("q4",)

    def linear(name, N, K, c, s, e, a, n_p):
        w = torch.from_numpy(rng.normal(0, 0.15, (N, e - s)).astype(np.float32))
        return fit_chunk(w, a, "minmax", protected=list(range(n_p)) or None)

    path = write_wq(tmp_path_factory.mktemp("sub") / "sub.gguf", D=D, layers=L, H=H, KV=KV, hd=hd, F=F, V=V, G=G,
                    dense=dense, linear=linear, action_fn=lambda name, c: acts[(len(name) + c) % 4],
                    protect_fn=lambda name, c, g: 2 if "ffn_up" in name else 0, ctx_len=256)
    return path


def test_file_bits_are_the_price(sub_model):
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(sub_model)
    stored = weights = 0
    seen = set()
    for name in f.linear_names():
        lay = f.layout(name)
        for c in f.chunks(name):
            stored += blocks.chunk_bits(c.action, lay.out_features, c.g, c.n_protected)
            seen.add(c.action)
        weights += lay.out_features * lay.in_features
    assert set(SUBS) <= seen
    assert f.measured_bits() == stored / weights


def test_runtime_matches_reference(native, sub_model):
    from wqedge.reference import load_reference, logits_fn
    toks = np.random.default_rng(0).integers(0, 96, (2, 48)).astype(np.int32)
    ref = logits_fn(load_reference(sub_model))(toks)
    try:
        for k in _kernels(native):
            native.set_kernels(k)
            for act, tol, top1 in (("f32", 1e-2, 0.999), ("q8", 0.3, 0.95)):
                native.set_activations(act)
                lc = native.logits_fn(sub_model, n_threads=2)(toks)
                rel = float(np.abs(lc - ref).max() / ref.std())
                agree = float((lc.argmax(-1) == ref.argmax(-1)).mean())
                assert rel < tol and agree >= top1, (k, act, rel, agree)
    finally:
        native.set_kernels("auto")
        native.set_activations("f32")


def test_llamacpp_projection_maps_to_the_nearest_k_quant():
    from wqedge.alloc.llamacpp_types import plan_targets, project_types
    from wqedge.alloc.uniform import model_bits, uniform_plan
    from wqedge.spec import ModelSpec
    spec = ModelSpec(hidden_size=512, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=64, intermediate_size=1024,
                     vocab_size=64)
    shapes = {lin.gguf_name: (lin.out_features, lin.in_features) for lin in spec.linears()}
    for action, want in (("q4s", "Q4_K"), ("q3s", "Q3_K")):
        plan = uniform_plan(spec.linears(), 256, model_bits(spec.linears(), 256, action), action=action)
        types = project_types(shapes, plan.effective_bits(), plan_targets(plan, spec))
        # the largest type within each tensor's bits (q3s: 3.5 b -> Q3_K, 3.4375 b; spare bits may lift a small one)
        big = [nm for nm, (n, k) in shapes.items() if n * k >= 512 * 512]
        assert {types[nm] for nm in big} == {want}, (action, types)


def test_portable_onnx_export_refuses_two_level_kinds(sub_model, tmp_path):
    from wqedge.converters.onnx_export import export_onnx
    with pytest.raises(ValueError, match="does not lower two-level block kinds"):
        export_onnx(sub_model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_preset_q4s(tiny_model_factory, tmp_path, native):
    """`convert --preset q4s` (hidden 576: chunks of 256, 256 and a ragged 64 at G = 256) writes q4s everywhere at
    its exact price, and the C++ runtime reads it as the reference does."""
    from click.testing import CliRunner
    from wqedge.alloc.uniform import model_bits
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.cli import main
    from wqedge.reference import load_reference, logits_fn
    from wqedge.runtime.gguf_reader import WqGGUF
    model = tiny_model_factory(hidden=576, n_layers=1, n_heads=9, n_kv_heads=3, intermediate=1536)
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(main, ["convert", str(model), "-o", str(out), "--preset", "q4s", "--group", "256",
                                    "--method", "minmax", "--no-self-calib"])
    assert res.exit_code == 0, res.output
    f = WqGGUF(out)
    spec = LlamaCheckpoint.open(model).spec
    assert all(set(f.layout(lin.gguf_name).actions) == {"q4s"} for lin in spec.linears())
    assert f.measured_bits() == pytest.approx(model_bits(spec.linears(), 256, "q4s"), abs=1e-9)
    toks = np.random.default_rng(1).integers(0, spec.vocab_size, (1, 32)).astype(np.int32)
    ref = logits_fn(load_reference(out))(toks)
    prev = native.get_activations()
    native.set_activations("f32")       # the reference-parity criterion is for float activations
    try:
        lc = native.logits_fn(out, n_threads=2)(toks)
    finally:
        native.set_activations(prev)
    assert float(np.abs(lc - ref).max() / ref.std()) < 1e-2


def test_greedy_allocator_takes_subscale_kinds_when_offered(tiny_model_factory):
    """Not in the default action list, but offered on request (actions=...) beside today's kinds."""
    from wqedge.alloc.planner import make_plan
    from wqedge.checkpoint import LlamaCheckpoint
    ckpt = LlamaCheckpoint.open(tiny_model_factory(hidden=128, n_layers=1, n_heads=4, n_kv_heads=2, intermediate=256))
    base = make_plan(ckpt, 4.7, "greedy", group_size=128, progress=False)
    assert not {a for t in base.tensors for a in t.actions} & set(SUBS)
    plan = make_plan(ckpt, 4.7, "greedy", group_size=128, progress=False, actions=blocks.ACTION_NAMES)
    used = {a for t in plan.tensors for a in t.actions}
    assert "q4s" in used and plan.effective_bits() <= 4.7


def test_cli_two_level_offers_the_subscale_kinds(tiny_model_factory, tmp_path):
    """`plan --two-level` puts q4s/q3s/q2s in the greedy allocator's actions (weight-only without calibration:
    greedy, not the uniform default); on this model at 4.5 bits it takes q4s for some chunks and meets the budget.
    It does not go with a preset."""
    from click.testing import CliRunner
    from wqedge.cli import main
    from wqedge.plan import Plan
    model = str(tiny_model_factory(hidden=128, n_layers=3, n_heads=8, n_kv_heads=2, intermediate=320, vocab_size=512))
    out = tmp_path / "p.json"
    res = CliRunner().invoke(main, ["plan", model, "--bits", "4.5", "--two-level", "-o", str(out)])
    assert res.exit_code == 0, res.output
    p = Plan.load(out)
    hist = p.action_histogram()
    assert p.allocator == "greedy" and hist.get("q4s", 0) > 0 and p.effective_bits() <= 4.5, hist
    res = CliRunner().invoke(main, ["plan", model, "--bits", "4.5", "--two-level", "--preset", "q4",
                                    "-o", str(tmp_path / "q.json")])
    assert res.exit_code != 0 and "--two-level offers the two-level kinds to the greedy allocator" in res.output
    assert not (tmp_path / "q.json").exists()


def test_pipeline_offers_the_two_level_kinds_by_default_at_4_bits_and_up(tiny_model_factory):
    """The default (two_level=None, pipeline.default_two_level): greedy budget plans of >= 4 bits are offered
    q4s/q3s beside the one-scale kinds (plan.meta["actions"] says what the allocator was offered; q2s, which the
    allocator never took there, only below 4 bits: pipeline.offered_actions); below 4 bits, with
    two_level=False, with pruning, uniform plans and presets they are not."""
    from wqedge import pipeline
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.tinymodel import tiny_corpus
    ckpt = LlamaCheckpoint.open(tiny_model_factory(hidden=128, n_layers=1, n_heads=4, n_kv_heads=2, intermediate=256))
    text = "\n".join(tiny_corpus(300))

    def offered(**kw):
        p = pipeline.make_plan(ckpt, progress=False, calib_text=text, **kw)
        return set(p.meta.get("actions", [])), p
    acts, p = offered(bits=4.5)
    assert {"q4s", "q3s"} <= acts and "q2s" not in acts and p.allocator == "greedy" and p.effective_bits() <= 4.5
    assert {a for t in p.tensors for a in t.actions} & set(SUBS)      # and here the allocator takes some
    for kw in ({"bits": 3.5}, {"bits": 4.5, "two_level": False}):
        acts, p = offered(**kw)
        assert acts and not acts & set(SUBS) and not {a for t in p.tensors for a in t.actions} & set(SUBS), kw
    acts, p = offered(bits=3.5, two_level=True)
    assert set(SUBS) <= acts and p.effective_bits() <= 3.5
    assert pipeline.offered_actions(3.99, True)[-3:] == SUBS and "q2s" not in pipeline.offered_actions(4.0, True)
    assert pipeline.offered_actions(3.99, False) == pipeline.offered_actions(3.99, True)[:-3]
    assert pipeline.default_two_level("greedy", 4.25, None) and not pipeline.default_two_level("greedy", 3.99, None)
    assert not pipeline.default_two_level("rl", 4.5, None) and not pipeline.default_two_level("uniform", 4.5, None)
    assert not pipeline.default_two_level("greedy", 4.5, "q4") and not pipeline.default_two_level("greedy", 4.5, None,
                                                                                                   ("ffn",))
