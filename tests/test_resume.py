"""Resuming a killed job from its per-layer checkpoints (`--resume-dir`, wqedge.resume, issue 18): plans and
conversions of one process and of 2 gloo processes under torchrun are killed after their first checkpoint files
(WQEDGE_RESUME_FAULT_AFTER), leave no output, and a rerun loads what was saved, computes the rest and gives the plan
or file of an uninterrupted run; other inputs get another checkpoint folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from torchrun_cli import assert_weights_equal, run_wqedge
from wqedge.cli import main
from wqedge.runtime.gguf_reader import WqGGUF

CALIB = " ".join(f"entry {i} says {i * 5 % 11} and then it goes on." for i in range(1500))


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory(n_layers=2, hidden=160, intermediate=256, vocab_size=512)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("resume") / "calib.txt"
    p.write_text(CALIB)
    return p


def _plan(model_dir, calib_file, out: Path, nproc: int, *extra, fault_after: int | None = None):
    """`wqedge plan` (under torchrun with --distributed when nproc > 1); the completed process."""
    return run_wqedge(["plan", model_dir, "--bits", "3.25", "--calib", calib_file, "--device", "cpu", "-o", out, *extra],
                      nproc, out.parent, _fault(fault_after), check=False)


def _fault(after: int | None) -> dict:
    return {} if after is None else {"WQEDGE_RESUME_FAULT_AFTER": str(after)}


@pytest.fixture(scope="module")
def reference_plan(model_dir, calib_file, tmp_path_factory) -> Path:
    """The plan of an uninterrupted one-process run (also the plan the conversion tests convert)."""
    out = tmp_path_factory.mktemp("ref") / "plan.json"
    r = _plan(model_dir, calib_file, out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(reference_plan):
    return json.loads(reference_plan.read_text())


def _same_plan(a: dict, b: dict) -> None:
    assert [(t["name"], t["actions"]) for t in a["tensors"]] == [(t["name"], t["actions"]) for t in b["tensors"]]
    assert abs(a["meta"]["predicted_damage"] - b["meta"]["predicted_damage"]) <= 1e-6 * abs(a["meta"]["predicted_damage"])


@pytest.mark.parametrize("nproc, fault_after, saved", [
    (1, 2, ["inputs-0", "inputs-1"]),   # killed after both layers: the rerun runs no layer
    (2, 1, ["inputs-0"]),               # killed after layer 0: the rerun runs layer 0 to feed layer 1
])
def test_killed_job_resumes_to_the_same_plan(model_dir, calib_file, reference, tmp_path, nproc, fault_after, saved):
    out, ck = tmp_path / "plan.json", tmp_path / "ck"
    r = _plan(model_dir, calib_file, out, nproc, "--resume-dir", ck, fault_after=fault_after)
    assert r.returncode != 0
    assert not out.exists()
    (folder,) = ck.iterdir()
    assert sorted(p.stem for p in folder.glob("*.pt")) == saved
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]       # no torn file
    r = _plan(model_dir, calib_file, out, nproc, "--resume-dir", ck)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoints: {', '.join(saved)}" in r.stdout + r.stderr
    _same_plan(reference, json.loads(out.read_text()))
    assert sorted(p.stem for p in folder.glob("*.pt")) == ["gradients", "inputs-0", "inputs-1", "table"]
    if nproc == 1:     # everything saved: nothing recomputed (one process reads what 2 saved too: test_distributed)
        r = _plan(model_dir, calib_file, out, 1, "--resume-dir", ck)
        assert "resumed from checkpoints: inputs-0, inputs-1, gradients, table" in r.stdout + r.stderr
        _same_plan(reference, json.loads(out.read_text()))


def test_other_inputs_get_another_folder(model_dir, calib_file, tmp_path):
    """A checkpoint is only read by a job with the same inputs: another seed (other calibration windows) or another
    group size writes a folder of its own and resumes nothing (in this process: the CLI's own arguments)."""
    ck = tmp_path / "ck"
    for extra in ([], ["--seed", "1"], ["--group", "64"]):
        r = CliRunner().invoke(main, ["plan", str(model_dir), "--bits", "3.25", "--calib", str(calib_file), "--device",
                                      "cpu", "-o", str(tmp_path / "plan.json"), "--resume-dir", str(ck), *extra])
        assert r.exit_code == 0, r.output
        assert "resumed" not in r.output
    assert len(list(ck.iterdir())) == 3


def _convert(model_dir, calib_file, plan: Path, out: Path, nproc: int, *extra, fault_after: int | None = None):
    return run_wqedge(["convert", model_dir, "--plan", plan, "--calib", calib_file, "--device", "cpu", "--no-check",
                       "-o", out, *extra], nproc, out.parent, _fault(fault_after), check=False)


@pytest.fixture(scope="module")
def reference_file(model_dir, calib_file, reference_plan, tmp_path_factory) -> Path:
    """The file of an uninterrupted one-process conversion of the reference plan."""
    ref = tmp_path_factory.mktemp("ref_file") / "ref.gguf"
    r = _convert(model_dir, calib_file, reference_plan, ref, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return ref


@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_conversion_resumes_error_feedback(model_dir, calib_file, reference_plan, reference_file, tmp_path, nproc):
    """convert --resume-dir saves each layer's error-feedback fits; killed after layer 0's, it leaves no file, and the
    rerun loads layer 0, fits layer 1 on inputs that went through the loaded layer, and writes the file of an
    uninterrupted one-process conversion: the same bytes with one process, the same decoder weights with two (a
    rounding may flip in a reduced statistic's fit: at most 0.1% of values, as in test_distributed)."""
    plan, ref, out, ck = reference_plan, reference_file, tmp_path / "model.gguf", tmp_path / "ck"
    r = _convert(model_dir, calib_file, plan, out, nproc, "--resume-dir", ck, fault_after=1)
    assert r.returncode != 0 and not out.exists()
    (folder,) = ck.iterdir()
    assert sorted(p.stem for p in folder.glob("*.pt")) == ["fits-0"]
    r = _convert(model_dir, calib_file, plan, out, nproc, "--resume-dir", ck)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 1/2 loaded from its checkpoint" in r.stdout + r.stderr
    assert "layer 2/2 fitted" in r.stdout + r.stderr
    if nproc == 1:
        assert out.read_bytes() == ref.read_bytes()
    else:
        assert_weights_equal(WqGGUF(ref), WqGGUF(out))
