"""Light distillation of a rotated plan (issue 15 with wqedge.quant.distill).

The chunks of a rotated plan are fitted on folded weights W' = W diag(s) Mᵀ, which give the model's outputs only
on rotated inputs x' = M (x / s), and at act bits below 8 the runtime quantizes x' per token. The distillation's
student must compute the same, or it tunes scales for a model nobody runs. The tiny random model and transforms of
tests/test_ruquant_runtime.py (ragged blocks, one smoothed group), a q3 plan at act bits 4 and 8, error-feedback
fits through the pipeline, then distillation:

- the student (`student_model`) is the model of the file written from the distilled chunks and norms: logits equal
  the PyTorch reference's within 1e-4 at act bits 8, within test_ruquant_runtime's A4 tolerance at 4; a student
  that dropped the input transforms (the swap before this change) is far off;
- distillation lowers each layer's held-out output error, and the distilled file's KL to the fp model on the
  calibration windows is below the undistilled file's;
- the file round-trips (codes kept, transforms stored) and the C++ runtime matches the reference;
- `wqedge convert --rotate --act-bits 4 --distill` runs end to end.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_ruquant_runtime import A4_TOL, CPP_TOL, SHAPE, _cpp_logits, _plan, _rel, _windows
from test_ruquant_runtime import transforms as transforms  # noqa: F401  (the module fixture)
from wqedge import pipeline
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.rotation import RotatedCheckpoint, to_stored

STEPS = 16


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(**SHAPE))


@pytest.fixture(scope="module")
def text():
    from wqedge.tinymodel import tiny_corpus
    return " ".join(tiny_corpus(3000))


@pytest.fixture(scope="module", params=[4, 8])
def run(request, ckpt, transforms, text, tmp_path_factory):  # noqa: F811
    """For act bits 4 and 8: the rotated checkpoint, its q3 plan, error-feedback chunks, their distillation
    (block stage, STEPS steps per layer) and the two files (undistilled, distilled)."""
    from wqedge.quant.distill import distill_checkpoint
    from wqedge.quantize import convert_to_gguf
    act_bits = request.param
    d = tmp_path_factory.mktemp(f"distill_rot{act_bits}")
    rck = RotatedCheckpoint(ckpt, transforms)
    plan = _plan(ckpt, "q3", act_bits)
    pipeline.set_feedback_windows(plan, 4)
    fits = pipeline.prepare_fits(rck, plan, text, feedback=True, device="cpu")
    res = distill_checkpoint(rck, fits.fitted, text, STEPS, device="cpu", n_seqs=8, seqlen=64,
                             act_bits=None if act_bits == 8 else act_bits)
    stored = {k: to_stored(t) for k, t in transforms.items()}
    plain = convert_to_gguf(rck, plan, d / "plain.gguf", fitted=fits.fitted, transforms=stored)
    tuned = convert_to_gguf(pipeline.Fits("feedback", fitted=res.chunks, norms=res.norms).source(rck), plan,
                            d / "tuned.gguf", fitted=res.chunks, transforms=stored)
    return {"act_bits": act_bits, "rck": rck, "plan": plan, "fitted": fits.fitted, "res": res, "plain": plain,
            "tuned": tuned}


def _calib_windows(ckpt, text, n=8, seqlen=64):
    from transformers import AutoTokenizer

    from wqedge.calib import calibration_tokens
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    return calibration_tokens(tok, text, n, seqlen, 0, bos_id=ckpt.spec.bos_token_id).train


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def test_student_is_the_files_model(run, ckpt):
    """What distillation trains (student_model on the rotated planning model) is what the written file's reference
    computes; without the rotated model's input hooks it is not."""
    from wqedge.quant.distill import student_model
    from wqedge.reference import load_reference
    res, bits = run["res"], run["act_bits"]
    w = _windows()
    ref = _logits(load_reference(run["tuned"]), w)
    student = student_model(run["rck"].load_planning_model("cpu"), res.chunks, res.norms, "cpu",
                            None if bits == 8 else bits)
    got = _logits(student, w)
    if bits == 8:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    else:   # a per-token grid: float sums in another order may move a value across a rounding boundary
        assert _rel(got, ref) < A4_TOL and np.abs(got - ref).mean() / ref.std() < 5e-3
    unrotated = student_model(ckpt.load_hf_model(torch.float32), res.chunks, res.norms, "cpu",
                              None if bits == 8 else bits)
    assert _rel(_logits(unrotated, w), ref) > 10 * max(_rel(got, ref), 1e-3)


def test_distillation_lowers_block_error_and_kl(run, ckpt, text):
    """Each layer's held-out output error falls; on the calibration windows the distilled file's reference is
    closer (KL per token) to the fp model than the undistilled file's."""
    from wqedge.reference import load_reference
    res = run["res"]
    assert len(res.layers) == 2 and all(x["after"] < x["before"] for x in res.layers), res.layers
    toks = _calib_windows(ckpt, text)
    fp = torch.log_softmax(torch.from_numpy(_logits(ckpt.load_hf_model(torch.float32), toks)), -1)

    def kl(path):
        lq = torch.log_softmax(torch.from_numpy(_logits(load_reference(path), toks)), -1)
        return float((fp.exp() * (fp - lq)).sum(-1).mean())
    assert kl(run["tuned"]) < kl(run["plain"])


def test_file_round_trip_and_runtime(run, transforms):  # noqa: F811
    """Distilled file: same codes as the undistilled one, other scales and norms, the transforms stored exactly;
    the C++ runtime's logits (prefill and decode, float activations) equal the reference's."""
    from cpp_support import ensure_library

    from wqedge import blocks
    from wqedge.reference import load_reference
    from wqedge.runtime.gguf_reader import WqGGUF
    ensure_library()
    from wqedge.runtime import native
    plain, tuned = WqGGUF(run["plain"]), WqGGUF(run["tuned"])
    assert tuned.format_version == 3 and tuned.act_bits == run["act_bits"]
    changed = 0
    for lin in plain.spec.linears():
        for c0, c1 in zip(plain.chunks(lin.gguf_name), tuned.chunks(lin.gguf_name)):
            assert not blocks.block_type(c0.action).is_float
            np.testing.assert_array_equal(c0.codes, c1.codes)
            changed += int(not np.array_equal(c0.d, c1.d))
    assert changed > 10
    assert not np.array_equal(plain.dense("blk.0.attn_norm.weight"), tuned.dense("blk.0.attn_norm.weight"))
    for k, st in tuned.transforms().items():
        for name, a in to_stored(transforms[k]).arrays().items():
            np.testing.assert_array_equal(st.arrays()[name], a)
    native.set_activations("f32")
    w = _windows()
    ref = _logits(load_reference(run["tuned"]), w)
    tol = CPP_TOL if run["act_bits"] == 8 else A4_TOL
    for (prefill, decode), lr in zip(_cpp_logits(run["tuned"], w), ref):
        assert _rel(prefill, lr) < tol and _rel(decode, lr) < tol


def test_cli_rotate_with_distill(ckpt, text, tmp_path):
    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.runtime.gguf_reader import WqGGUF
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt.path), "--preset", "q3", "--rotate", "--act-bits", "4",
                                  "--distill", "2", "--feedback-windows", "4", "--calib", str(calib), "--no-check",
                                  "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "distillation:" in r.output
    f = WqGGUF(out)
    assert f.format_version == 3 and f.act_bits == 4 and len(f.transforms()) == 8
    assert json.loads(f.plan_json)["meta"]["fit"]["distill_steps"] == 2
