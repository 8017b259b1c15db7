"""End to end: checkpoint -> plan -> quantized GGUF -> PyTorch reference, and the CLI around it."""
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wqedge import blocks
from wqedge.alloc.uniform import uniform_plan
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.cli import main
from wqedge.quant.feedback import FEEDBACK_SEQS, FEEDBACK_SEQS_CPU, feedback_windows
from wqedge.quant.fit import dequantize_chunk
from wqedge.quantize import convert_to_gguf, quantize_linear
from wqedge.reference import load_reference
from wqedge.runtime.gguf_reader import WqGGUF


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    # intermediate 320 with G=128: a ragged last chunk of 64 in gate/up rows' input (down_proj)
    return LlamaCheckpoint.open(tiny_model_factory(intermediate=320))


def _plan(ckpt, **kw):
    return uniform_plan(ckpt.spec.linears(), 128, 16.0, model_fingerprint=ckpt.fingerprint(), **kw)


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


IDS = [1, 17, 250, 3, 99, 400, 12, 7, 8, 300, 45, 46]


def test_fp16_plan_reference_reproduces_the_original_model(ckpt, tmp_path):
    path = convert_to_gguf(ckpt, _plan(ckpt, action="fp16"), tmp_path / "f16.gguf")
    ref = load_reference(path)
    orig = ckpt.load_hf_model(torch.float32)
    torch.testing.assert_close(_logits(ref, IDS), _logits(orig, IDS), atol=1e-5, rtol=1e-5)


def test_file_weights_are_exactly_the_fitted_chunks(ckpt, tmp_path):
    plan = _plan(ckpt)
    for i, t in enumerate(plan.tensors):  # a mixed plan using every action
        t.actions = [blocks.ACTION_NAMES[(i + c) % 7] for c in range(len(t.actions))]
        t.methods = ["minmax"] * len(t.actions)
    plan.validate(ckpt.spec)
    path = convert_to_gguf(ckpt, plan, tmp_path / "mixed.gguf")
    f = WqGGUF(path)
    assert f.measured_bits() == pytest.approx(plan.effective_bits(), rel=1e-12)
    for lin in ckpt.spec.linears():
        chunks = quantize_linear(ckpt.linear_weight(lin), plan, lin.hf_name)
        expect = torch.cat([dequantize_chunk(c) for c in chunks], dim=1).numpy()
        np.testing.assert_array_equal(f.dequantize_linear(lin.gguf_name), expect)
    ref = load_reference(path)
    np.testing.assert_array_equal(ref.model.layers[0].mlp.down_proj.weight.detach().numpy(),
                                  f.dequantize_linear("blk.0.ffn_down.weight"))


def test_plan_for_another_model_is_refused(ckpt, tmp_path):
    plan = _plan(ckpt)
    plan.model_fingerprint = "0" * 64
    with pytest.raises(ValueError, match="different model"):
        convert_to_gguf(ckpt, plan, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_nan_weights_abort_the_convert_and_leave_no_file(tiny_model_factory, copy_model, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_model(tiny_model_factory(seed=1))
    st = load_file(d / "model.safetensors")
    st["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(st, d / "model.safetensors", metadata={"format": "pt"})
    ck = LlamaCheckpoint.open(d)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*(NaN|nan|non-finite)"):
        convert_to_gguf(ck, uniform_plan(ck.spec.linears(), 128, 4.3), tmp_path / "nan.gguf")
    assert list(tmp_path.glob("*nan*")) == []


def test_cli_convert_inspect_eval(ckpt, tmp_path):
    r = CliRunner()
    out = tmp_path / "m.gguf"
    res = r.invoke(main, ["convert", str(ckpt.path), "-o", str(out), "--bits", "2.5", "--method", "minmax",
                          "--save-plan", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    f = WqGGUF(out)
    reported = float(res.output.split("effective bits: ")[1].split(" planned")[0])
    measured = float(res.output.split("planned, ")[1].split(" measured")[0])
    assert reported == pytest.approx(measured, rel=1e-3) and measured == pytest.approx(f.measured_bits(), abs=1e-4)
    assert json.loads((tmp_path / "p.json").read_text())["effective_bits"] == pytest.approx(f.measured_bits())

    res = r.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "blk.1.ffn_down.weight" in res.output and "measured" in res.output
    # one column per kind the file holds, each row's counts summing to the tensor's chunks
    held = {a for n in f.linear_names() for a in f.layout(n).actions}
    header = next(line for line in res.output.splitlines() if line.startswith("tensor")).split()
    assert header[3:-1] == [a for a in blocks.ACTION_NAMES if a in held] and header[-1] == "protected"
    row = next(line for line in res.output.splitlines() if line.startswith("blk.1.ffn_down.weight")).split()
    assert sum(map(int, row[3:-1])) == len(f.layout("blk.1.ffn_down.weight").actions)

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    res_q = r.invoke(main, ["eval", str(out), "--text", str(text), "--ctx", "64", "--chunks", "4",
                            "--tokenizer", str(ckpt.path)])
    res_f = r.invoke(main, ["eval", str(ckpt.path), "--text", str(text), "--ctx", "64", "--chunks", "4"])
    assert res_q.exit_code == 0 and res_f.exit_code == 0, res_q.output + res_f.output
    assert "perplexity:" in res_q.output and "4 windows" in res_q.output
    assert re.search(r"perplexity: [0-9.]+ ± [0-9.]+ over", res_q.output), res_q.output  # the SE over windows

    res = r.invoke(main, ["convert", str(ckpt.path), "-o", str(tmp_path / "p2.gguf"), "--plan", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert WqGGUF(tmp_path / "p2.gguf").measured_bits() == pytest.approx(f.measured_bits())


@pytest.mark.parametrize("args,match", [
    (["convert", "/nonexistent/model"], "config.json|does not exist|no such"),
    (["convert", "{model}", "--bits", "0.5"], "below the cheapest"),
    (["convert", "{model}", "--group", "100"], "multiple of 32"),
    (["inspect", "{model}/config.json"], "not a GGUF file"),
    (["plan", "{model}", "-o", "/tmp/never.json", "--protect", "0"], "must lie in 1..32"),
    (["plan", "{model}", "-o", "/tmp/never.json", "--protect", "two"], "comma-separated column counts"),
])
def test_cli_errors_are_clear(ckpt, args, match):
    args = [a.replace("{model}", str(ckpt.path)) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    import re
    assert re.search(match, res.output, re.I), res.output


@pytest.mark.engine("onnxruntime")
def test_cli_convert_to_onnx_runs_in_onnxruntime(ckpt, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["convert", str(ckpt.path), "-o", str(out), "--target", "onnx", "--bits", "4.5",
                                    "--method", "minmax", "--onnx-lowering", "int4"])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    spec = ckpt.spec
    feeds = {"input_ids": np.array([IDS], np.int64), "attention_mask": np.ones((1, len(IDS)), np.int64),
             "position_ids": np.arange(len(IDS), dtype=np.int64)[None]}
    for i in range(spec.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), np.float32)
    logits = sess.run(["logits"], feeds)[0][0]
    ref = _logits(load_reference(out.with_suffix(".gguf")), IDS).numpy()
    assert np.abs(logits - ref).max() / ref.std() < 1e-2


def test_cli_greedy_plan_with_calibration_meets_budget_in_the_file(ckpt, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"item {i} of the list is {i * 7 % 13} and the next one follows." for i in range(300)))
    out = tmp_path / "g.gguf"
    res = CliRunner().invoke(main, ["convert", str(ckpt.path), "-o", str(out), "--bits", "3.0", "--allocator",
                                    "greedy", "--calib", str(calib), "--save-plan", str(tmp_path / "g.json")])
    assert res.exit_code == 0, res.output
    assert "error feedback" in res.output
    f = WqGGUF(out)
    assert f.measured_bits() <= 3.0 + 1e-9
    assert f.measured_bits() == pytest.approx(json.loads((tmp_path / "g.json").read_text())["effective_bits"])
    assert len({a for t in json.loads((tmp_path / "g.json").read_text())["tensors"] for a in t["actions"]}) > 1
    # the plan records the error-feedback window count of its planning device (32 on the CPU, 256 on CUDA)
    assert json.loads((tmp_path / "g.json").read_text())["meta"]["fit"]["n_seqs"] == feedback_windows(None)
    assert f"error feedback on {feedback_windows(None)} windows" in res.output


def test_feedback_windows_option_is_recorded_in_the_plan_and_used(ckpt, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"item {i} of the list is {i * 7 % 13} and the next one follows." for i in range(300)))
    res = CliRunner().invoke(main, ["plan", str(ckpt.path), "-o", str(tmp_path / "p.json"), "--bits", "3.0",
                                    "--calib", str(calib), "--feedback-windows", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["meta"]["fit"]["n_seqs"] == 3
    # convert --plan fits on the plan's count; --feedback-windows given to convert overrides it
    for extra, n in (([], 3), (["--feedback-windows", "2"], 2)):
        res = CliRunner().invoke(main, ["convert", str(ckpt.path), "-o", str(tmp_path / f"w{n}.gguf"), "--plan",
                                        str(tmp_path / "p.json"), "--calib", str(calib), "--no-check"] + extra)
        assert res.exit_code == 0, res.output
        assert f"error feedback on {n} windows" in res.output
    assert feedback_windows("cuda") == FEEDBACK_SEQS and feedback_windows("cpu") == FEEDBACK_SEQS_CPU
    res = CliRunner().invoke(main, ["plan", str(ckpt.path), "-o", str(tmp_path / "q.json"), "--bits", "3.0",
                                    "--feedback-windows", "0"])
    assert res.exit_code != 0 and "--feedback-windows" in res.output


def test_convert_shows_progress_lines_when_stderr_is_not_a_terminal(ckpt, tmp_path):
    """Logged to a file or a pipe (no tqdm bar drawn), a conversion still reports its fitting progress as lines:
    the first tensor and the last at least."""
    import subprocess
    import sys
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "wqedge", "convert", str(ckpt.path), "--preset", "q4", "--no-check",
                        "-o", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)   # the installed package
    assert r.returncode == 0, r.stderr
    n = len(ckpt.spec.linears())
    assert f"quantizing: 1/{n} tensors" in r.stderr and f"quantizing: {n}/{n} tensors" in r.stderr, r.stderr
    assert out.is_file()
