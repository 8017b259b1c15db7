"""The data-free Hadamard rotation (wqedge.residual_rotation, `--rotate hadamard`; issue 15).

- the fast Walsh-Hadamard transform equals the dense Sylvester matrix; every rotation is orthogonal and seeded;
- rotating a model (residual stream, attention heads, norm scales folded, a tied head untied) leaves its logits
  unchanged, for power-of-two and other widths, with GQA and with tied embeddings;
- the checkpoint wrapper reads the same tensors as the rotated model, reports the head untied and keeps the
  source's fingerprint (a plan made on it is a plan for the source);
- end to end: a plan with --rotate hadamard needs no calibration text, the file records the method, its reference
  equals the fp model within the q8 weights' error, and the C++ runtime (identity groups skipped, the down group's
  block Hadamard online) matches the reference at act bits 8 and 4;
- with a pruning: transforms on the kept columns, the file equals the masked model, the runtime the reference;
- what it refuses: --rotate-stage2, the llama.cpp target, a block that is not a power of two.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wqedge.checkpoint import LlamaCheckpoint
from wqedge.plan import PlanError
from wqedge.residual_rotation import (ResidualRotatedCheckpoint, ResidualRotation, Rotation, block_hadamard,
                                      hadamard_config, hadamard_transform)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ruquant_runtime import (A4_TOL, CPP_TOL, _reference_logits, _rel, _windows,  # noqa: E402
                                  assert_cpp_matches_reference)

SHAPE = dict(hidden=160, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=288)   # Haar Q (160, 40); FFN tail 32
Q8_TOL = 0.05   # mean |Δlogit| / std of q8 weights against the fp model (measured 0.011 on this model)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fast_hadamard_equals_dense(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ _sylvester(n).double() / n ** 0.5)


def test_fast_hadamard_refuses_other_lengths():
    with pytest.raises(ValueError, match="not a power of two"):
        hadamard_transform(torch.zeros(2, 12))


@pytest.mark.parametrize("n", [64, 40])
def test_rotations_are_orthogonal_and_seeded(n):
    r = Rotation(n, 3).matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(Rotation(n, 3).matrix(), r)
    assert not torch.allclose(Rotation(n, 4).matrix(), r)
    x = torch.randn(5, n)
    torch.testing.assert_close(Rotation(n, 3).right(x) @ r.T, x, atol=1e-5, rtol=0)   # right() is x R


@pytest.mark.parametrize("hidden,heads,kv,tied", [(128, 4, 2, False), (96, 4, 2, True), (72, 3, 1, False)])
def test_rotated_model_computes_the_same_function(hidden, heads, kv, tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=hidden // heads, intermediate_size=160, vocab_size=300, tie_word_embeddings=tied)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():   # norm scales away from 1, so that folding them matters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        want = m(ids).logits
        embed = m.model.embed_tokens.weight.clone()
        rot = ResidualRotation(hidden, hidden // heads, seed=3)
        rot.rotate_model(m)
        got = m(ids).logits
        assert not m.config.tie_word_embeddings
        assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
        # the norm scales were folded, and the rotation did move the weights (an identity Q would keep the logits too)
        assert (m.model.norm.weight == 1).all() and (m.model.layers[0].input_layernorm.weight == 1).all()
        assert float((m.model.embed_tokens.weight - embed).abs().max()) > 0.1 * float(embed.abs().max())
    assert float((got - want).abs().max() / want.std()) < 1e-5


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(**SHAPE))


def test_checkpoint_wrapper_reads_the_rotated_model(tiny_model_factory):
    src = LlamaCheckpoint.open(tiny_model_factory(hidden=64, n_heads=4, n_kv_heads=2, intermediate=96,
                                                  tie_embeddings=True))
    rc = ResidualRotatedCheckpoint(src, seed=1)
    assert src.spec.tie_word_embeddings and not rc.spec.tie_word_embeddings
    assert "lm_head.weight" in rc.tensor_names() and rc.fingerprint() == src.fingerprint()
    model = rc.load_hf_model(torch.float32)
    state = model.state_dict()
    for name in rc.tensor_names():
        torch.testing.assert_close(rc.get(name), state[name].float(), atol=1e-6, rtol=0, msg=name)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        a, b = model(ids).logits, src.load_hf_model(torch.float32)(ids).logits
    assert float((a - b).abs().max() / b.std()) < 1e-4


def test_memory_decisions_count_the_untied_head(tiny_model_factory):
    """A tied source's rotated view holds one more vocab x hidden tensor: the dtype, device and streaming decisions
    count it (at a memory size between the two counts they decide differently), and the model it loads has it."""
    from wqedge.stream import wants_streaming
    src = LlamaCheckpoint.open(tiny_model_factory(hidden=64, n_heads=4, n_kv_heads=2, intermediate=96,
                                                  tie_embeddings=True))
    rc = ResidualRotatedCheckpoint(src, seed=1)
    head = src.spec.vocab_size * src.spec.hidden_size
    assert rc.n_params == src.n_params + head
    model = rc.load_planning_model("cpu")
    assert sum(p.numel() for p in model.parameters()) == rc.n_params
    between = int((2 * src.n_params + head) / 0.4)   # 40%: wqedge.stream's fraction of memory for the 16-bit copy
    assert wants_streaming(rc, "cpu", memory=between) and not wants_streaming(src, "cpu", memory=between)
    between32 = int((4 * src.n_params + 2 * head) / 0.4)
    assert rc.planning_dtype(available_bytes=between32) == torch.bfloat16
    assert src.planning_dtype(available_bytes=between32) == torch.float32
    untied = LlamaCheckpoint.open(tiny_model_factory(hidden=64, n_heads=4, n_kv_heads=2, intermediate=96))
    assert ResidualRotatedCheckpoint(untied).n_params == untied.n_params


def test_block_hadamard_folds_exactly():
    t = block_hadamard(288, 128, seed=7)   # two Hadamard blocks and a Haar-random tail of 32
    assert t.r1.integer and t.r2.is_identity and not t.r1.is_identity
    assert set(t.r1.full_codes.abs().unique().tolist()) == {127}   # ±1/√B: the int8 codes ±127 exactly
    x, w = torch.randn(4, 288, dtype=torch.float64), torch.randn(6, 288, dtype=torch.float64)
    y = t.apply(x.float()).double()
    # the whole blocks are orthogonal (Hadamard); the tail's int8 codes only nearly (the fold uses their inverse)
    torch.testing.assert_close(y[:, :256].norm(dim=1), x[:, :256].norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(t.fold_into_weight(w.float()).double() @ y.T, w @ x.T, rtol=0, atol=1e-4)
    assert not torch.allclose(y, x)


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    from wqedge import pipeline
    d = tmp_path_factory.mktemp("hadamard")
    out = {}
    for bits in (8, 4):
        plan = pipeline.make_plan(ckpt, 0, preset="q8", rotate="hadamard", act_bits=bits, progress=False)
        out[bits] = pipeline.convert(ckpt, plan, d / f"q8a{bits}.gguf", feedback=False).path
    return out


def test_plan_and_file_record_the_method(ckpt, files):
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(files[4])
    assert f.rotation == "hadamard" and f.act_bits == 4 and f.format_version == 3   # int8 matrices
    from wqedge.rotation import from_stored
    for (li, gi), st in f.transforms().items():
        t = from_stored(st)
        assert t.r2.is_identity and t.r1.is_identity == (gi != 3), (li, gi)   # only down_proj's input online
        assert not st.householder.any() and st.smooth is None
        assert np.array_equal(st.perm, np.arange(st.dim))


def test_reference_equals_fp_model(ckpt, files):
    w = _windows()
    a, b = _reference_logits(files[8], w), None
    with torch.no_grad():
        from wqedge.reference import logits_fn
        b = logits_fn(ckpt.load_hf_model())(w)
    assert np.abs(a - b).mean() / b.std() < Q8_TOL and (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("bits,tol", [(8, CPP_TOL), (4, A4_TOL)])
def test_cpp_runtime_matches_reference(files, bits, tol):
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native
    native.set_activations("f32")
    assert_cpp_matches_reference(files[bits], bits, tol)


def test_cpp_int8_activations_match_reference(files):
    """The library's default int8 activations on the A8 file: within test_cpp_parity's int8 bars."""
    from cpp_support import ensure_library
    ensure_library()
    from test_ruquant_runtime import Q8_ROT_TOL, _cpp_logits
    from wqedge.runtime import native
    native.set_activations("q8")
    try:
        w = _windows()
        ref = _reference_logits(files[8], w)
        for (prefill, decode), lr in zip(_cpp_logits(files[8], w), ref):
            for got in (prefill, decode):
                assert _rel(got, lr) < Q8_ROT_TOL[0] and np.abs(got - lr).mean() / lr.std() < Q8_ROT_TOL[1]
    finally:
        native.set_activations("f32")


def test_refusals(ckpt, tmp_path):
    from wqedge import pipeline
    with pytest.raises(PlanError, match="needs --rotate ruquant"):
        pipeline.make_plan(ckpt, 0, preset="q8", rotate="hadamard", rotate_stage2=5, progress=False)
    plan = pipeline.make_plan(ckpt, 0, preset="q8", rotate="hadamard", progress=False)
    with pytest.raises(pipeline.ConvertError, match="llama.cpp has no operator"):
        pipeline.convert(ckpt, plan, tmp_path / "x.gguf", target="llamacpp")
    with pytest.raises(pipeline.ConvertError, match="power of two"):
        pipeline.rotated(ckpt, {**hadamard_config(), "block": 100}, None)
    with pytest.raises(pipeline.ConvertError, match="int8"):
        pipeline.rotated(ckpt, {**hadamard_config(), "block": 1024}, None)
    with pytest.raises(pipeline.ConvertError, match="unknown field"):
        pipeline.rotated(ckpt, {**hadamard_config(), "smooth_alpha": 0.5}, None)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_and_inspect(ckpt, tmp_path):
    from click.testing import CliRunner

    from wqedge.cli import main
    out = tmp_path / "h.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt.path), "--preset", "q8", "--rotate", "hadamard",
                                  "--act-bits", "6", "--no-check", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "input transforms: hadamard" in r.output, r.output
    assert "2 not the identity, the rest skipped" in r.output, r.output   # the down groups of 2 layers


@pytest.mark.engine("onnxruntime")
@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_export_matches_reference(files, tmp_path, bits):
    """The portable ONNX export of a hadamard file (identity groups lowered as any transform) against the
    reference, prefill and KV-cache decode, with tests/test_onnx_rotated.py's bounds: at act bits 8 every position
    within PARITY; at 4 every position within FLIP_BOUND and at least MIN_EXACT of them (prefill and decode
    positions pooled: a 4-bit grid flip moves the rest of its window, and a window has only N_DECODE decode
    positions, so the decode positions alone can fall below MIN_EXACT on two flips; measured 0.84 pooled)."""
    pytest.importorskip("onnx")
    from test_onnx_rotated import (FLIP_BOUND, MIN_EXACT, N_DECODE, PARITY, WIN, _onnx_logits, _per_position,
                                   _variant_path)
    from test_onnx_rotated import _windows as onnx_windows
    path = _variant_path(files[bits], "portable", tmp_path)
    w = onnx_windows()
    lr = _reference_logits(files[bits], w)
    prefill, decode = _onnx_logits(path, w)
    err = np.concatenate([_per_position(prefill, lr).ravel(),
                          _per_position(decode, lr[:, WIN - N_DECODE:]).ravel()])
    if bits >= 8:
        assert err.max() < PARITY
    else:
        assert (err < PARITY).mean() >= MIN_EXACT and err.max() < FLIP_BOUND, err


def test_tied_model_with_a_budget_and_distillation(tiny_model_factory, tmp_path):
    """A tied model through the whole pipeline (greedy plan at 3 bits on calibration text, error feedback,
    distillation): the file stores the head as its own tensor and its reference follows the fp model."""
    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.reference import logits_fn
    from wqedge.runtime.gguf_reader import WqGGUF
    from wqedge.tinymodel import tiny_corpus
    src = LlamaCheckpoint.open(tiny_model_factory(hidden=128, intermediate=352, tie_embeddings=True))
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(tiny_corpus(600)))
    out = tmp_path / "t.gguf"
    r = CliRunner().invoke(main, ["convert", str(src.path), "--bits", "3", "--rotate", "hadamard", "--calib",
                                  str(calib), "--distill", "4", "--no-check", "-o", str(out)])
    assert r.exit_code == 0, r.output
    f = WqGGUF(out)
    assert f.rotation == "hadamard" and not f.spec.tie_word_embeddings
    w = _windows()
    a, b = _reference_logits(out, w), logits_fn(src.load_hf_model())(w)
    # 3 bits on a random tiny model: measured top-1 agreement 0.96, mean |Δ| / std 0.13 (a wrong rotation: ~1)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9 and np.abs(a - b).mean() / b.std() < 0.25


def test_pruned_model(tiny_model_factory, tmp_path):
    """With a pruning (tests/test_pruned_shapes.py's uneven one): the down transforms cover the kept FFN channels,
    the rotated masked checkpoint computes the masked model, a plan at 4.25 bits with the pruning fills its budget,
    and the file's reference equals the masked fp model within the fp16 weights' rounding while the C++ runtime
    equals the reference (float activations)."""
    from cpp_support import ensure_library
    from test_pruned_shapes import CPP_TOL as PRUNED_CPP_TOL
    from test_pruned_shapes import LAYERS, SHAPE as PRUNED_SHAPE
    from test_rotated_pruned import FOLD_TOL, FP16_TOL, _fp16_plan

    from wqedge import pipeline
    from wqedge.masked import MaskedCheckpoint
    from wqedge.pruning import Pruning
    from wqedge.reference import load_reference, logits_fn
    from wqedge.tinymodel import tiny_corpus
    src = LlamaCheckpoint.open(tiny_model_factory(**PRUNED_SHAPE))
    pruning = Pruning.for_spec(src.spec, 32, LAYERS)
    rc, stored = pipeline.rotated(src, hadamard_config(), None, pruning=pruning)
    spec = pruning.pruned_spec(src.spec)
    for li in range(spec.n_layers):
        assert stored[(li, 3)].dim == spec.ff(li) and stored[(li, 1)].dim == spec.heads(li) * spec.head_dim
    w = _windows()
    masked = logits_fn(MaskedCheckpoint(src, pruning).load_hf_model())(w)
    assert _rel(logits_fn(rc.load_hf_model())(w), masked) < FOLD_TOL

    fp16 = _fp16_plan(src, pruning)
    fp16.rotation = hadamard_config()
    path = pipeline.convert(src, fp16.validate(), tmp_path / "fp16.gguf", feedback=False).path
    ref = logits_fn(load_reference(path))(w)
    assert _rel(ref, masked) < FP16_TOL
    ensure_library()
    from wqedge.runtime import native
    native.set_activations("f32")
    m = native.Model(path)
    for row, lr in zip(w, ref):
        got = native.Context(m, n_ctx=64, n_threads=2).eval(row.tolist(), all_logits=True)
        assert _rel(got, lr) < PRUNED_CPP_TOL

    plan = pipeline.make_plan(src, 4.25, calib_text=" ".join(tiny_corpus(600)), rotate="hadamard",
                              fixed_pruning=pruning, progress=False)
    assert plan.rotation["method"] == "hadamard" and plan.pruning.to_dict() == pruning.to_dict()
    assert plan.budget_bits - 0.05 < plan.effective_bits() <= plan.budget_bits + 1e-9


def test_views_tell_their_statistics_apart(ckpt):
    """Rotated views keep the source's fingerprint (plans stay valid for it), so the planner's resumable
    statistics (--resume-dir) are keyed by stats_view too: equal for equal views, different otherwise."""
    from wqedge import pipeline
    a, _ = pipeline.rotated(ckpt, hadamard_config(seed=0), None)
    b, _ = pipeline.rotated(ckpt, hadamard_config(seed=0), None)
    c, _ = pipeline.rotated(ckpt, hadamard_config(seed=1), None)
    assert a.fingerprint() == ckpt.fingerprint() and not hasattr(ckpt, "stats_view")
    assert a.stats_view() == b.stats_view() != c.stats_view()
