"""The quality guard of `convert` (issue 13): the written model is compared with the original at once, and
a damaged file is reported loudly instead of silently written."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from wqedge import quality
from wqedge.cli import main
from wqedge.quality import QualityReport


def test_thresholds_separate_a_few_percent_from_broken():
    ok = QualityReport(256, "x", 6.26, 6.41, 0.02, 0.95)
    assert not ok.is_bad and "+2.4%" in ok.summary()
    assert QualityReport(256, "x", 10.1, 271.0, 2.0, 0.3).is_bad          # issue 13's q3-everywhere file
    assert QualityReport(256, "x", 6.26, 6.30, 0.4, 0.9).is_bad            # perplexity fine, distribution off
    assert QualityReport(256, "x", 6.26, float("nan"), float("nan"), 0.0).is_bad


def test_good_conversion_reports_and_does_not_warn(llama_s_dir, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(llama_s_dir), "-o", str(tmp_path / "q4.gguf"), "--preset", "q4",
                                    "--method", "minmax", "--no-self-calib"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("quality check on"))
    assert "self-generated text" in line
    ppl_o, ppl_q = (float(v) for v in line.split("perplexity ")[1].split(" (")[0].split(" -> "))
    assert 1 < ppl_o and ppl_q / ppl_o < 1.1      # q4 on the trained fixture: a few percent
    assert "WARNING" not in res.output


def test_damaged_conversion_warns_loudly(llama_s_dir, tmp_path):
    text = tmp_path / "calib.txt"     # a short calibration text: the check then scores that text
    text.write_text(" ".join(["the little cat sat on the warm mat and looked at the birds in the tree ."] * 40))
    args = ["convert", str(llama_s_dir), "-o", str(tmp_path / "q1.gguf"), "--preset", "q1", "--method", "minmax",
            "--calib", str(text), "--no-distill", "--feedback-windows", "1"]   # damaged fast: no repair work
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output     # the file is written; the user is told it is damaged
    assert "WARNING" in res.output and "may be unusable" in res.output, res.output
    assert "tokens of calibration text" in res.output


def test_check_can_be_turned_off_and_is_opt_in_for_big_models(tiny_model_dir, tmp_path, monkeypatch):
    res = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "a.gguf"), "--no-check"])
    assert res.exit_code == 0 and "quality check" not in res.output
    monkeypatch.setattr(quality, "MAX_PARAMS_DEFAULT", 10)
    res = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "b.gguf")])
    assert res.exit_code == 0 and "quality check skipped" in res.output and "--check forces it" in res.output
    res = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "c.gguf"), "--check"])
    assert res.exit_code == 0 and "quality check on 256 tokens" in res.output


def test_one_long_line_of_calibration_text_is_text_not_a_path():
    from wqedge.calib import read_texts
    line = "the little cat sat on the mat . " * 100        # 3200 chars, no newline: once ENAMETOOLONG
    assert read_texts(line) == line
    assert read_texts("see notes.txt for details") == "see notes.txt for details"
    with pytest.raises(FileNotFoundError):
        read_texts("/no/such/calib.txt")
