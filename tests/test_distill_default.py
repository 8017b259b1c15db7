"""Light distillation by default at <= 2.5 bits (3.5 on a GPU; pipeline.settle_distill): when it switches on, how it
is turned off, that `plan` records the choice so `convert --plan` does what one `convert` does, and that the default
never turns a command that runs into one that is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from wqedge import distributed, pipeline
from wqedge.cli import main
from wqedge.runtime.gguf_reader import WqGGUF

CALIB = " ".join(f"item {i} of the list is {i * 7 % 13} and the next one follows." for i in range(400))
STEPS = 3   # the default's CPU steps, made small so each conversion takes seconds


@pytest.fixture(autouse=True)
def few_steps(monkeypatch):
    monkeypatch.setattr(pipeline, "DISTILL_STEPS_CPU", STEPS)


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(CALIB)
    return str(p)


def cli(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def convert(model, out, *args) -> tuple[str, dict, WqGGUF]:
    """Run `wqedge convert` on the CPU; (output, the file's plan fit record, the file)."""
    text = cli("convert", model, "-o", out, "--no-check", "--device", "cpu", *args)
    f = WqGGUF(out)
    return text, json.loads(f.plan_json)["meta"].get("fit", {}), f


def tensors(f: WqGGUF) -> dict[str, bytes]:
    return {name: np.asarray(t.data).tobytes() for name, t in f.tensors.items()}


def norms(f: WqGGUF) -> dict[str, np.ndarray]:
    """The decoder layers' RMSNorm weights (the block stage trains them; the final norm only the end-to-end one)."""
    return {n: f.dense(n) for n in f.tensors if n.startswith("blk.") and n.endswith("norm.weight")}


def test_default_on_at_low_bits(tiny_model_dir, tmp_path, calib):
    """At 2.25 bits with calibration text the file is distilled (steps recorded, norms and scales moved) and the
    CLI says so and how to turn it off; --no-distill and --distill 0 write the undistilled file."""
    text, fit, on = convert(tiny_model_dir, tmp_path / "on.gguf", "--bits", "2.25", "--calib", calib)
    assert "light distillation on by default" in text and "--no-distill" in text
    assert fit["distill_steps"] == STEPS and "2.5" in fit["distill_default"]
    text, fit, off = convert(tiny_model_dir, tmp_path / "off.gguf", "--bits", "2.25", "--calib", calib, "--no-distill")
    assert "distillation" not in text and not fit.get("distill_steps")
    _, _, zero = convert(tiny_model_dir, tmp_path / "zero.gguf", "--bits", "2.25", "--calib", calib, "--distill", "0")
    assert tensors(zero) == tensors(off)
    n_on, n_off = norms(on), norms(off)
    assert n_on.keys() == n_off.keys() and len(n_on) >= 2 and all(not np.array_equal(n_on[k], n_off[k]) for k in n_on)
    lin = off.linear_names()[0]
    d_on = np.concatenate([c.d for c in on.chunks(lin) if c.d is not None])
    d_off = np.concatenate([c.d for c in off.chunks(lin) if c.d is not None])
    assert d_on.shape == d_off.shape and not np.array_equal(d_on, d_off)
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(on.chunks(lin), off.chunks(lin)))   # codes frozen


def test_default_off_above_threshold(tiny_model_dir, tmp_path, calib):
    text, fit, f = convert(tiny_model_dir, tmp_path / "m.gguf", "--bits", "4.25", "--calib", calib)
    assert f.effective_bits > pipeline.DISTILL_DEFAULT_MAX_BITS
    assert "distill" not in text and "distill_steps" not in fit


def test_no_distill_with_explicit_steps_refused(tiny_model_dir, tmp_path, calib):
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "m.gguf"), "--bits", "2.25",
                                  "--calib", calib, "--distill", "4", "--no-distill", "--no-check"])
    assert r.exit_code != 0 and "give one of them" in r.output and not (tmp_path / "m.gguf").exists()


def test_plan_records_choice_and_convert_plan_equals_one_step(tiny_model_dir, tmp_path, calib):
    """`plan` at 2.25 bits records the default's choice; `convert --plan` then writes the tensors one `convert`
    writes. A plan made with --no-distill records the opt-out and is converted without distillation."""
    plan = tmp_path / "p.json"
    text = cli("plan", tiny_model_dir, "-o", plan, "--bits", "2.25", "--calib", calib, "--device", "cpu")
    assert "light distillation on by default" in text
    fit = json.loads(plan.read_text())["meta"]["fit"]
    assert fit["distill_steps"] == STEPS and fit["distill_default"]
    text, _, two = convert(tiny_model_dir, tmp_path / "two.gguf", "--plan", plan, "--calib", calib)
    assert "the plan distils by default" in text
    _, _, one = convert(tiny_model_dir, tmp_path / "one.gguf", "--bits", "2.25", "--calib", calib)
    assert tensors(two) == tensors(one)

    cli("plan", tiny_model_dir, "-o", plan, "--bits", "2.25", "--calib", calib, "--device", "cpu", "--no-distill")
    assert json.loads(plan.read_text())["meta"]["fit"]["distill_steps"] == 0
    _, _, off = convert(tiny_model_dir, tmp_path / "off.gguf", "--plan", plan, "--calib", calib)
    _, _, ref = convert(tiny_model_dir, tmp_path / "ref.gguf", "--bits", "2.25", "--calib", calib, "--no-distill")
    assert tensors(off) == tensors(ref)


def test_default_yields_where_distillation_is_refused(tiny_model_dir, tmp_path, calib):
    """Where an explicit --distill is refused (streamed layers) or impossible (no calibration text), the default
    stays off and the command runs, also for a plan that recorded the default's choice."""
    text, fit, _ = convert(tiny_model_dir, tmp_path / "s.gguf", "--bits", "2.25", "--calib", calib, "--stream-layers")
    assert "not distilling" in text and "--stream-layers" in text and not fit.get("distill_steps")
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "x.gguf"), "--bits", "2.25",
                                  "--calib", calib, "--stream-layers", "--distill", "2", "--no-check"])
    assert r.exit_code != 0 and "--stream-layers" in r.output      # the explicit request is still refused
    text, fit, _ = convert(tiny_model_dir, tmp_path / "n.gguf", "--bits", "2.25", "--no-self-calib")
    assert "not distilling" in text and "calibration text" in text and not fit.get("distill_steps")

    plan = tmp_path / "p.json"
    cli("plan", tiny_model_dir, "-o", plan, "--bits", "2.25", "--calib", calib, "--device", "cpu")
    text, fit, _ = convert(tiny_model_dir, tmp_path / "ps.gguf", "--plan", plan, "--calib", calib, "--stream-layers")
    assert "not distilling, which the plan chose by default" in text and not fit.get("distill_steps")


def test_default_yields_to_llamacpp_target(tiny_model_dir, tmp_path, calib, monkeypatch):
    """--target llamacpp (which refuses --distill) runs at <= 2.5 bits, also from a plan that recorded the
    default's choice: the command reaches llama.cpp's export (stubbed here; the tiny model is below what its
    types can reach) instead of being refused."""
    def export(ckpt, plan, output, calib_text, device, head=pipeline.DEFAULT_HEAD):
        assert head == pipeline.DEFAULT_HEAD   # the llama.cpp file stores the head as our GGUF would
        raise pipeline.ConvertError("reached the llama.cpp export")
    monkeypatch.setattr(pipeline, "_convert_llamacpp", export)
    plan = tmp_path / "p.json"
    cli("plan", tiny_model_dir, "-o", plan, "--bits", "2.25", "--calib", calib, "--device", "cpu")
    for how in (["--bits", "2.25"], ["--plan", plan]):
        r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "m.gguf"), *map(str, how),
                                      "--calib", calib, "--target", "llamacpp", "--no-check", "--device", "cpu"])
        assert "not distilling" in r.output and "reached the llama.cpp export" in r.output, r.output
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.plan import Plan
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    p = Plan.load(plan, ckpt.spec, ckpt.fingerprint())          # the library path, without the CLI's settling
    with pytest.raises(pipeline.ConvertError, match="reached the llama.cpp export"):
        pipeline.convert(ckpt, p, tmp_path / "m.gguf", target="llamacpp", calib_text=CALIB)
    with pytest.raises(pipeline.ConvertError, match="--target llamacpp quantizes"):   # an explicit request is not
        pipeline.convert(ckpt, p, tmp_path / "m.gguf", target="llamacpp", calib_text=CALIB, distill=2)


def test_default_under_distributed(tiny_model_dir, monkeypatch):
    """Under --distributed the default decides as in one process (rank 0 distils after the shared fits), so N
    processes write the file one process writes."""
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.plan import Plan
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    linears = ckpt.spec.linears()
    plan = Plan.from_actions(linears, 128, 16.0, "greedy",
                             {lin.hf_name: ["q2"] * -(-lin.in_features // 128) for lin in linears}, "neuqi")
    assert plan.effective_bits() <= pipeline.DISTILL_DEFAULT_MAX_BITS
    alone = pipeline.default_distill(plan, CALIB, device="cpu")
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert pipeline.default_distill(plan, CALIB, device="cpu") == alone and alone[0] == STEPS


@pytest.mark.parametrize("extra", [["--prune", "ffn"], ["--rotate"], ["--target", "onnx"]],
                         ids=["prune", "rotate", "onnx"])
def test_default_distils_with_other_options(tiny_model_dir, tmp_path, calib, extra):
    """Pruning, RUQuant and the ONNX target take distillation (explicitly as by default): at 2.25 bits the GGUF
    written (the ONNX graph's source) is distilled."""
    out = tmp_path / ("m.onnx" if "onnx" in extra else "m.gguf")
    text = cli("convert", tiny_model_dir, "-o", out, "--no-check", "--device", "cpu", "--bits", "2.25", "--calib", calib,
               *extra)
    assert "light distillation on by default" in text and out.exists()
    fit = json.loads(WqGGUF(out.with_suffix(".gguf")).plan_json)["meta"]["fit"]
    assert fit["distill_steps"] == STEPS


def test_default_threshold_by_device(tiny_model_dir):
    """A 3-bit plan distils by default when planned on a GPU (up to DISTILL_DEFAULT_MAX_BITS_GPU, where it
    costs seconds) and not on the CPU (up to DISTILL_DEFAULT_MAX_BITS); above both, neither."""
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.plan import Plan
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    linears = ckpt.spec.linears()

    def plan_of(action):
        return Plan.from_actions(linears, 128, 16.0, "greedy",
                                 {lin.hf_name: [action] * -(-lin.in_features // 128) for lin in linears}, "neuqi")
    q3, q4 = plan_of("q3"), plan_of("q4")
    assert pipeline.DISTILL_DEFAULT_MAX_BITS < q3.effective_bits() <= pipeline.DISTILL_DEFAULT_MAX_BITS_GPU
    assert q4.effective_bits() > pipeline.DISTILL_DEFAULT_MAX_BITS_GPU
    assert pipeline.default_distill(q3, CALIB, device="cpu") == (0, "")
    steps, why = pipeline.default_distill(q3, CALIB, device="cuda")   # decides only; nothing runs on the device
    assert steps == pipeline.DISTILL_STEPS and f"<= {pipeline.DISTILL_DEFAULT_MAX_BITS_GPU:g}" in why
    assert pipeline.default_distill(q4, CALIB, device="cuda") == (0, "")


def test_codes_trained_with_enough_windows(tiny_model_dir, tmp_path, calib, monkeypatch):
    """Through `wqedge convert`: with DISTILL_CODES_MIN_WINDOWS training windows (made 16 here: the test text holds
    25 windows of 512 tokens) and held-out ones, distillation trains the codes (the file's codes differ from the
    --freeze-codes file's; 96 steps at 0.03 move some on this tiny model and lower its held-out error); a text that
    leaves no held-out window keeps them frozen, and says why; --freeze-codes and --distill-e2e are recorded in the
    file's plan."""
    monkeypatch.setattr(pipeline, "DISTILL_CODE_LR", 0.03)
    monkeypatch.setattr(pipeline, "DISTILL_CODES_MIN_WINDOWS", 16)
    common = ("--preset", "q2", "--calib", calib, "--distill", "96", "--distill-e2e", "0")
    text, fit, trained = convert(tiny_model_dir, tmp_path / "t.gguf", *common, "--feedback-windows", "20")
    assert "codes trained" in text and "codes frozen" not in text
    assert "distill_freeze_codes" not in fit and fit["distill_e2e"] == 0
    text, fit, frozen = convert(tiny_model_dir, tmp_path / "f.gguf", *common, "--feedback-windows", "20",
                                "--freeze-codes")
    assert "codes frozen" in text and fit["distill_freeze_codes"] is True
    lins = trained.linear_names()
    moved = sum(int((a.codes != b.codes).sum()) for lin in lins
                for a, b in zip(trained.chunks(lin), frozen.chunks(lin)) if a.codes is not None)
    assert moved > 0
    record = json.loads(trained.plan_json)["meta"]["fit"]["distilled"]   # what the distillation did
    assert record["code_lr"] == 0.03 and record["codes_changed"] > 0 and record["layers_codes_trained"] >= 1
    assert json.loads(frozen.plan_json)["meta"]["fit"]["distilled"]["codes_changed"] == 0
    # 128 asked for, 25 in the text, all taken for training: nothing held out to check the codes on
    text, _, few = convert(tiny_model_dir, tmp_path / "few.gguf", *common, "--feedback-windows", "128")
    assert "codes frozen: the calibration text gives 25 training and 0 held-out windows" in text


def test_distillation_out_of_gpu_memory(tiny_model_dir, tmp_path, calib, monkeypatch):
    """Should distillation run out of GPU memory (a 7B model fits a 24 GB GPU, its block stage does not): where the
    default chose it, the file is written as fitted, without it, and its plan and the CLI say why; where it was asked
    for (--distill N), the conversion is refused with what to do, and nothing is written."""
    import torch

    from wqedge.quant import distill as distill_mod

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.50 GiB (test)")
    monkeypatch.setattr(distill_mod, "distill_checkpoint", oom)
    text, fit, f = convert(tiny_model_dir, tmp_path / "d.gguf", "--bits", "2.25", "--calib", calib)
    _, fit0, f0 = convert(tiny_model_dir, tmp_path / "n.gguf", "--bits", "2.25", "--calib", calib, "--no-distill")
    assert "ran out of GPU memory" in text and "--distill-windows" in text
    assert fit["distill_steps"] == 0 and "ran out of GPU memory" in fit["distill_default"]
    assert "distilled" not in fit
    assert tensors(f) == tensors(f0)     # exactly the undistilled file
    out = tmp_path / "asked.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--no-check", "--device", "cpu",
                                  "--bits", "2.25", "--calib", calib, "--distill", "2"])
    assert r.exit_code != 0 and "ran out of GPU memory" in r.output and "--no-distill" in r.output
    assert not out.exists()
