"""Resuming a killed job from its per-layer checkpoints (`--resume-dir`, wqedge.resume, issue 18): plans and
conversions of one process and of 2 gloo processes under torchrun are killed after their first checkpoint files
(WQEDGE_RESUME_FAULT_AFTER), leave no output, and a rerun loads what was saved, computes the rest and gives the plan
or file of an uninterrupted run; other inputs get another checkpoint folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CALIB = " ".join(f"entry {i} says {i * 5 % 11} and then it goes on." for i in range(1500))
TIMEOUT_S = 600


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
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WQEDGE_RESUME_FAULT_AFTER")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if fault_after is not None:
        env["WQEDGE_RESUME_FAULT_AFTER"] = str(fault_after)
    pre = [sys.executable, "-m", "wqedge"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "wqedge"]
    args = ["plan", model_dir, "--bits", "3.25", "--calib", calib_file, "--device", "cpu", "-o", out, *extra]
    return subprocess.run(pre + [str(a) for a in args] + (["--distributed"] if nproc > 1 else []), cwd=out.parent,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def reference(model_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "plan.json"
    r = _plan(model_dir, calib_file, out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


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
    r = _plan(model_dir, calib_file, out, 1, "--resume-dir", ck)     # everything saved: nothing recomputed
    assert "resumed from checkpoints: inputs-0, inputs-1, gradients, table" in r.stdout + r.stderr
    _same_plan(reference, json.loads(out.read_text()))


def test_other_inputs_get_another_folder(model_dir, calib_file, tmp_path):
    """A checkpoint is only read by a job with the same inputs: another seed (other calibration windows) or another
    group size writes a folder of its own and resumes nothing."""
    ck = tmp_path / "ck"
    for extra in ([], ["--seed", "1"], ["--group", "64"]):
        r = _plan(model_dir, calib_file, tmp_path / "plan.json", 1, "--resume-dir", ck, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed" not in r.stdout + r.stderr
    assert len(list(ck.iterdir())) == 3


def _convert(model_dir, calib_file, plan: Path, out: Path, nproc: int, *extra, fault_after: int | None = None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WQEDGE_RESUME_FAULT_AFTER")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if fault_after is not None:
        env["WQEDGE_RESUME_FAULT_AFTER"] = str(fault_after)
    pre = [sys.executable, "-m", "wqedge"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "wqedge"]
    args = ["convert", model_dir, "--plan", plan, "--calib", calib_file, "--device", "cpu", "--no-check", "-o", out,
            *extra] + (["--distributed"] if nproc > 1 else [])
    return subprocess.run(pre + [str(a) for a in args], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_conversion_resumes_error_feedback(model_dir, calib_file, tmp_path, nproc):
    """convert --resume-dir saves each layer's error-feedback fits; killed after layer 0's, it leaves no file, and the
    rerun loads layer 0, fits layer 1 on inputs that went through the loaded layer, and writes the file of an
    uninterrupted conversion: the same bytes with one process, the same decoder weights with two (a rounding may
    flip in a reduced statistic's fit: at most 0.1% of values, as in test_distributed)."""
    plan = tmp_path / "plan.json"
    r = _plan(model_dir, calib_file, plan, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, out, ck = tmp_path / "ref.gguf", tmp_path / "model.gguf", tmp_path / "ck"
    r = _convert(model_dir, calib_file, plan, ref, nproc)
    assert r.returncode == 0, r.stderr[-3000:]
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
        from wqedge.runtime.gguf_reader import WqGGUF
        a, b = WqGGUF(ref), WqGGUF(out)
        assert a.linear_names() == b.linear_names()
        differ = sum(int((a.dequantize_linear(n) != b.dequantize_linear(n)).sum()) for n in a.linear_names())
        total = sum(a.dequantize_linear(n).size for n in a.linear_names())
        assert differ <= 1e-3 * total, f"{differ} of {total}"
