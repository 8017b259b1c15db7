"""RUQuant rotation together with structured pruning (issues 15 and 16): transforms built on the kept structures.

The model: tests/test_pruned_shapes.py's tiny random LLaMA (hidden 128, 3 layers, 8 query heads in 2 KV groups of
head_dim 16, FFN 320 = 10 groups of 32) with its uneven pruning (layer 0: two FFN groups and one query head per KV
group; layer 1: a whole KV group; layer 2: one FFN group and two query heads per group). Criteria:
- the masked checkpoint (wqedge.masked: removed structures zeroed, unpruned shapes) computes what the pruned model
  computes: its logits equal a model of the pruned per-layer shapes built from the kept weights (< 1e-5 of std);
- the transforms of the o and down inputs are built on the kept columns (their widths are the pruned model's
  per-layer widths), and the rotated masked model computes the masked model (< 1e-4: the folded inverse);
- a rotated pruned file (plan with both, `pipeline.convert`): its reference equals the masked fp model up to the
  fp16 rounding of the folded weights (FP16_TOL; the same model's unrotated logits are 3 std away); the C++ runtime (float
  activations, prefill and decode) equals the reference within CPP_TOL; ONNX Runtime (portable export, in a child
  process) within ONNX_TOL; the file measures the plan's effective bits exactly;
- `wqedge plan --prune --rotate` (refused before) plans: the structures by the joint search on the unrotated model,
  recorded in the plan's meta, then the bits on the rotated pruned model; `wqedge convert --plan` writes a plan
  with both, and `inspect` shows the pruned shapes and the transforms;
- stage 2 and 4-bit activations with pruning: the runtime runs the W4A4 file as its reference computes it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wqedge import pipeline  # noqa: E402
from wqedge.checkpoint import LlamaCheckpoint  # noqa: E402
from wqedge.masked import MaskedCheckpoint  # noqa: E402
from wqedge.plan import Plan  # noqa: E402
from wqedge.pruning import Pruning  # noqa: E402
from wqedge.rotation import rotation_config  # noqa: E402
from wqedge.units import chunk_bounds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pruned_shapes import CPP_TOL, GROUP, LAYERS, ONNX_TOL, SHAPE  # noqa: E402  (the same pruned model)

MASK_TOL = 1e-5
FOLD_TOL = 1e-4
FP16_TOL = 5e-2   # the folded weights stored as fp16: 2.1e-2 measured for this model's rotated unpruned file, 2.3e-2 pruned


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(**SHAPE))


@pytest.fixture(scope="module")
def pruning(ckpt):
    return Pruning.for_spec(ckpt.spec, 32, LAYERS)


@pytest.fixture(scope="module")
def calib():
    from wqedge.tinymodel import tiny_corpus
    return " ".join(tiny_corpus(2000))


def _windows(n=2, length=24):
    return np.random.default_rng(0).integers(0, 256, (n, length))


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all()
    return float(np.abs(a - b).max() / b.std())


def _logits(model, windows):
    from wqedge.reference import logits_fn
    return logits_fn(model)(windows)


def test_masked_checkpoint_computes_the_pruned_model(ckpt, pruning):
    from wqedge.reference import build_model
    from wqedge.spec import other_tensors
    masked = MaskedCheckpoint(ckpt, pruning)
    assert masked.fingerprint() == ckpt.fingerprint()          # a plan made on it is a plan for ckpt
    spec = pruning.pruned_spec(ckpt.spec)
    state = {hf: ckpt.get(hf).float() for hf, _, _ in other_tensors(spec)}
    for orig, lin in zip(ckpt.spec.linears(), spec.linears()):
        w = ckpt.linear_weight(orig).float()
        m = masked.linear_weight(orig).float()
        kept = pruning.prune_weight(orig.layer, orig.proj, w)
        assert torch.equal(pruning.prune_weight(orig.layer, orig.proj, m), kept)
        assert int((m != 0).sum()) <= kept.numel()               # nothing outside the kept part survives
        state[lin.hf_name] = kept
    w = _windows()
    small = _logits(build_model(spec, state), w)
    assert _rel(_logits(masked.load_hf_model(), w), small) < MASK_TOL
    assert _rel(_logits(ckpt.load_hf_model(), w), small) > 0.1   # the pruning matters on this model


def test_transforms_are_built_on_the_kept_columns(ckpt, pruning, calib):
    src, stored = pipeline.rotated(ckpt, rotation_config(), calib, pruning=pruning)
    spec = pruning.pruned_spec(ckpt.spec)
    for li in range(spec.n_layers):
        widths = (spec.hidden_size, spec.heads(li) * spec.head_dim, spec.hidden_size, spec.ff(li))
        assert [stored[(li, gi)].dim for gi in range(4)] == list(widths)
    assert stored[(0, 1)].dim == 96 and stored[(1, 1)].dim == 64 and stored[(2, 3)].dim == 288
    w = _windows()
    masked = _logits(MaskedCheckpoint(ckpt, pruning).load_hf_model(), w)
    assert _rel(_logits(src.load_hf_model(), w), masked) < FOLD_TOL
    # a removed structure stays removed in the rotated weights the plan slices
    o = src.linear_weight("model.layers.0.self_attn.o_proj.weight")
    gone = [c for c in range(128) if c not in set(pruning.kept(0, "o_proj")[1].tolist())]
    assert len(gone) == 32 and float(o[:, gone].abs().max()) == 0.0


def _fp16_plan(ckpt, pruning) -> Plan:
    spec = pruning.pruned_spec(ckpt.spec)
    acts = {lin.hf_name: ["fp16"] * len(chunk_bounds(lin.in_features, GROUP)) for lin in spec.linears()}
    plan = Plan.from_actions(spec.linears(), GROUP, 16.0, "uniform", acts, pruning=pruning,
                             model_fingerprint=ckpt.fingerprint())
    plan.budget_bits = plan.effective_bits()
    plan.rotation = rotation_config()
    return plan.validate(ckpt.spec, ckpt.fingerprint())


@pytest.fixture(scope="module")
def files(ckpt, pruning, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("rotated_pruned")
    fp16 = pipeline.convert(ckpt, _fp16_plan(ckpt, pruning), d / "fp16.gguf", calib_text=calib).path
    plan = pipeline.make_plan(ckpt, 4.25, calib_text=calib, rotate=True, fixed_pruning=pruning, progress=False)
    mixed = pipeline.convert(ckpt, plan, d / "mixed.gguf", calib_text=calib).path
    return {"fp16": Path(fp16), "mixed": Path(mixed), "plan": plan}


def test_plan_with_a_given_pruning_fills_the_budget(ckpt, pruning, files):
    plan = files["plan"]
    assert plan.pruning is not None and plan.pruning.to_dict() == pruning.to_dict()
    assert plan.rotation is not None and plan.act_bits == 8
    assert plan.budget_bits - 0.05 < plan.effective_bits() <= plan.budget_bits + 1e-9
    assert {"q2", "q3", "q4", "q8"} & {a for t in plan.tensors for a in t.actions}
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back.pruning.to_dict() == pruning.to_dict() and back.rotation == plan.rotation


def test_reference_of_rotated_pruned_file_equals_masked_model(ckpt, pruning, files):
    from wqedge.reference import load_reference
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(files["fp16"])
    assert f.rotation is not None and f.spec.uneven
    w = _windows()
    masked = _logits(MaskedCheckpoint(ckpt, pruning).load_hf_model(), w)
    assert _rel(_logits(load_reference(files["fp16"]), w), masked) < FP16_TOL


def test_file_measures_the_plans_effective_bits(files):
    from wqedge.runtime.gguf_reader import WqGGUF
    assert WqGGUF(files["mixed"]).measured_bits() == files["plan"].effective_bits()


@pytest.mark.parametrize("which", ["fp16", "mixed"])
def test_cpp_runtime_matches_reference(files, which):
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.reference import load_reference
    from wqedge.runtime import native
    native.set_activations("f32")
    w = _windows()
    ref = _logits(load_reference(files[which]), w)
    m = native.Model(files[which])
    for row, lr in zip(w, ref):
        prefill = native.Context(m, n_ctx=64, n_threads=2).eval(row.tolist(), all_logits=True)
        c = native.Context(m, n_ctx=64, n_threads=1)
        decode = np.stack([c.eval([t]) for t in row.tolist()])
        assert _rel(prefill, lr) < CPP_TOL and _rel(decode, lr) < CPP_TOL


ONNX_CHILD = """
import json, sys
import numpy as np
from wqedge.converters.onnx_export import export_onnx
from wqedge.runtime.onnx_session import OnnxDecoder
path = export_onnx(sys.argv[1], sys.argv[2], variant="portable")["path"]
w = np.array(json.loads(sys.argv[3]))
np.save(sys.argv[4], OnnxDecoder(path, 2).logits(w))
"""


def test_onnx_runtime_runs_the_rotated_pruned_file(files, tmp_path):
    """Portable ONNX export of the rotated pruned file, run by ONNX Runtime in a child process (a crash there is
    reported, not fatal), against the reference."""
    pytest.importorskip("onnxruntime")
    from wqedge.reference import load_reference
    w = _windows()
    out = tmp_path / "logits.npy"
    p = subprocess.run([sys.executable, "-c", ONNX_CHILD, str(files["mixed"]), str(tmp_path / "m.onnx"),
                        json.dumps(w.tolist()), str(out)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)   # not the checkout's folder: `python -c` would import its wqedge/ before the installed one
    assert p.returncode == 0, p.stderr[-3000:]
    assert _rel(np.load(out), _logits(load_reference(files["mixed"]), w)) < ONNX_TOL


def test_cli_plans_prune_with_rotate_and_converts_the_plan(ckpt, pruning, files, calib, tiny_model_factory, tmp_path):
    """`plan --prune --rotate` (refused before this) plans: the joint search's record says where the structures
    were chosen; `convert --plan` of a plan with both writes the pruned rotated file, which `inspect` describes."""
    from click.testing import CliRunner

    from wqedge.cli import main
    model = str(tiny_model_factory(**SHAPE))
    text = tmp_path / "calib.txt"
    text.write_text(calib)
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["plan", model, "--bits", "2.5", "--prune", "ffn,heads", "--rotate", "ruquant",
                                  "--calib", str(text), "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.rotation is not None and "chosen_on" in plan.meta["pruning"]
    assert plan.effective_bits() <= 2.5 + 1e-9 and "RUQuant stage 1" in r.output
    both = tmp_path / "both.json"
    both.write_text(files["plan"].to_json())
    gguf = tmp_path / "both.gguf"
    r = CliRunner().invoke(main, ["convert", model, "--plan", str(both), "--calib", str(text), "-o", str(gguf),
                                  "--no-check"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(gguf)])
    assert r.exit_code == 0, r.output
    assert "pruned, per layer (ffn, heads/kv heads): 0: 256, 6/2, 1: 320, 4/1, 2: 288, 4/2" in r.output
    assert "ruquant" in r.output.lower()


def test_stage2_and_4_bit_activations_with_pruning(ckpt, pruning, calib, tmp_path):
    """Stage 2 learns the reflections of the narrowed groups on their kept columns too, and a W4A4 pruned rotated file
    runs in the C++ runtime as its reference computes it (float activations; tests/test_ruquant_runtime.py's grid
    check: a value on a 4-bit rounding boundary may take the neighbouring code in one of them)."""
    from cpp_support import ensure_library
    from test_ruquant_runtime import A4_TOL, assert_grid_close
    ensure_library()
    from wqedge.reference import load_reference
    from wqedge.runtime import native
    plan = pipeline.make_plan(ckpt, 4.25, calib_text=calib, rotate=True, rotate_stage2=3, act_bits=4,
                              fixed_pruning=pruning, progress=False)
    assert plan.rotation["stage2"]["steps"] == 3 and plan.act_bits == 4 and plan.pruning is not None
    path = pipeline.convert(ckpt, plan, tmp_path / "a4.gguf", calib_text=calib).path
    w = np.random.default_rng(0).integers(0, 256, (8, 6))
    ref = _logits(load_reference(path), w)
    native.set_activations("f32")
    m = native.Model(path)
    got = [native.Context(m, n_ctx=64, n_threads=2).eval(row.tolist(), all_logits=True) for row in w]
    assert_grid_close(got, ref, A4_TOL)
