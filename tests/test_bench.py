"""`wqedge bench` (issues #5, #6): a smoke run on a tiny random model, checking the report's structure and
that its values are sane. No timing is asserted: speeds are only required to be positive."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wqedge.bench.rows import ROWS, SETS, parse_rows
from wqedge.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import llamacpp_problem  # noqa: E402

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def test_parse_rows_sets_and_order():
    assert parse_rows("all") == [k for k in ROWS if not k.startswith(("wq-at-", "wq-2l-at-"))]
    assert parse_rows("all,matched") == list(ROWS)
    assert parse_rows("lcp-q4_0 , wq-q4,quick") == [k for k in ROWS if k in {"wq-q4", "lcp-Q4_0", *SETS["quick"]}]
    with pytest.raises(ValueError, match="unknown row 'nope'"):
        parse_rows("wq-q4,nope")


def test_bad_rows_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--rows", "wq-q4,q5_fast", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2
    assert "unknown row 'q5_fast'" in r.output and "sets:" in r.output
    assert not (tmp_path / "r.json").exists()


def test_read_bandwidth_measures_and_refuses_bad_arguments():
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native
    from wqedge.runtime._native import NativeError
    assert native.read_bandwidth(1, mib=4, reps=2) > 0.1          # GB/s: any machine streams 4 MiB faster than this
    assert native.read_bandwidth(3, mib=4, reps=1) > 0.1          # more threads than parts of some sizes: still whole
    with pytest.raises(NativeError, match="n_threads >= 1"):
        native.read_bandwidth(0)
    with pytest.raises(NativeError, match="bytes >= 4096"):
        native.read_bandwidth(1, mib=0.001)


def test_comparisons_pair_each_row_with_issue_12s_types():
    from wqedge.bench.runner import comparisons

    def row(name, backend, bits, tok_s):
        return {"model": "m", "row": name, "backend": backend, "bits": bits, "decode_tok_s": tok_s, "status": "ok",
                "prefill_tok_s": 10.0, "peak_mib": 100.0, "roofline_fraction": 0.5, "perplexity": None}
    rows = [row("wq-q4-a8", "wqedge", 4.25, 130.0), row("wq-2.5-a8", "wqedge", 2.5, 150.0),
            row("lcp-Q4_0", "llamacpp", 4.5, 100.0), row("lcp-Q3_K_M", "llamacpp", 4.09, 90.0),
            row("lcp-Q2_K", "llamacpp", 3.12, 100.0), row("lcp-IQ2_XXS", "llamacpp", 2.66, 120.0)]
    got = {(c["row"], c["vs"]): c for c in comparisons(rows)}
    assert got[("wq-q4-a8", "lcp-Q3_K_M")]["match"] == "nearest ≤ bits"
    q4 = got[("wq-q4-a8", "lcp-Q4_0")]
    assert q4["match"] == "issue 12" and q4["decode_ratio"] == 1.3 and q4["targets"]["decode"]
    assert got[("wq-2.5-a8", "lcp-Q2_K")]["decode_ratio"] == 1.5 and got[("wq-2.5-a8", "lcp-Q2_K")]["targets"]["decode"]
    assert not got[("wq-2.5-a8", "lcp-IQ2_XXS")]["targets"]["decode"]     # 1.25x < 1.5x
    assert ("wq-2.5-a8", "lcp-Q4_0") not in got


def test_matched_rows_pair_our_plan_with_the_llamacpp_file_at_its_bits():
    """Issue 13's "our file <= llama.cpp at every bpw": --rows matched puts each llama.cpp type beside our plan at
    its measured bits; the comparison pairs them ("same bits") and the ppl target is <=."""
    from wqedge.bench.runner import comparisons
    m = parse_rows("matched")
    assert {"lcp-Q4_0", "wq-at-Q4_0", "wq-at-Q4_0-a8", "lcp-Q2_K", "wq-at-Q2_K"} <= set(m)
    assert not ROWS["wq-at-Q4_0"].speed and ROWS["wq-at-Q4_0-a8"].act == "q8"

    def row(name, backend, bits, ppl):
        return {"model": "m", "row": name, "backend": backend, "bits": bits, "decode_tok_s": 100.0, "status": "ok",
                "prefill_tok_s": 10.0, "peak_mib": 100.0, "roofline_fraction": 0.5, "perplexity": ppl}
    assert "wq-2l-at-Q4_0" in m and not ROWS["wq-2l-at-Q4_0"].speed
    rows = [row("wq-at-Q4_0", "wqedge", 4.4999, 2.821), row("wq-at-Q2_K-a8", "wqedge", 3.1189, 3.2),
            row("wq-2l-at-Q4_0", "wqedge", 4.4998, 2.81),
            row("lcp-Q4_0", "llamacpp", 4.5, 2.821), row("lcp-Q2_K", "llamacpp", 3.119, 3.122)]
    got = {(c["row"], c["vs"]): c for c in comparisons(rows)}
    assert got[("wq-at-Q4_0", "lcp-Q4_0")]["match"] == got[("wq-2l-at-Q4_0", "lcp-Q4_0")]["match"] == "same bits"
    assert got[("wq-at-Q4_0", "lcp-Q4_0")]["targets"]["ppl_lower"] is True      # equal perplexity meets "<="
    assert got[("wq-at-Q2_K-a8", "lcp-Q2_K")]["targets"]["ppl_lower"] is False
    assert ("wq-at-Q4_0", "lcp-Q2_K") not in got or got[("wq-at-Q4_0", "lcp-Q2_K")]["match"] != "same bits"


def test_decode_targets_follow_issue_12():
    from wqedge.bench.report import decode_target
    assert decode_target("wq-q4") == decode_target("wq-q4-a8") == 1.3
    assert decode_target("wq-2.5-a8") == decode_target("wq-3.25") == 1.5


def test_bench_smoke(tmp_path, tiny_model_dir):
    from wqedge.tinymodel import tiny_corpus
    text = tmp_path / "text.txt"
    text.write_text("\n".join(tiny_corpus(600)), encoding="utf-8")
    rows = ["wq-q4", "wq-2.5", "wq-q4-a8", "lcp-Q4_0", "ort-portable"]
    out = tmp_path / "rep"
    args = ["bench", "--model", str(tiny_model_dir), "--eval-text", str(text), "--no-calib", "--speed-model", "none",
            "--rows", ",".join(rows), "--threads", "1", "--prefill", "8", "--decode", "4", "--reps", "1",
            "--rounds", "2", "--ppl-windows", "1", "--ppl-ctx", "64", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    rep = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()

    info = rep["info"]
    assert info["machine"]["cpu"] and info["machine"]["cores"] >= 1 and info["machine"]["threads"] == 1
    assert info["triad_GBps"] > 0 and info["triad_llc_GBps"] > 0
    # the roofline is the runtime's read bandwidth (the library is built for these tests), and the report says so
    assert info["roof_kind"] == "read" and info["roof_GBps"] > 0 and info["roof_llc_GBps"] > 0
    # measured before, between the rounds and after the timing; the roof is the best reading
    assert [x["when"] for x in info["triad_samples"]] == ["before", "after round 1", "after"]
    assert info["roof_GBps"] == max(x["read_GBps"] for x in info["triad_samples"])
    assert "DRAM read" in md
    assert [x["row"] for x in rep["rows"]] == rows
    llama_ok = HAVE_LLAMA and llamacpp_problem() is None   # a llama.cpp that crashes here fails its row only
    expect_ok = {"wq-q4": True, "wq-2.5": True, "wq-q4-a8": True, "lcp-Q4_0": llama_ok, "ort-portable": HAVE_ORT}
    by = {x["row"]: x for x in rep["rows"]}
    for key, row in by.items():
        assert (row["status"] == "ok") == expect_ok[key], row["status"]
        assert f"| {key} |" in md
        if row["status"] != "ok":
            continue
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and len(row["decode"]) == 2   # a sample per round
        assert row["peak_mib"] >= row["base_mib"] > 0 and row["file_mib"] > 0
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert 0 < row["roofline_fraction"] and row["bytes_per_token"] > 0
    assert 4.25 <= by["wq-q4"]["bits"] < 4.5          # q4 everywhere (ragged chunks cost a little more)
    # the int8-activation row runs the same file with act=q8 (decode, prefill and perplexity windows): its own
    # perplexity, within 2% of the float row's on this random tiny model (llama-s: +0.33% at q4, test_cpp_prefill)
    assert by["wq-q4-a8"]["act"] == "q8" and by["wq-q4"]["act"] == "f32"
    assert by["wq-q4-a8"]["file"] == by["wq-q4"]["file"]
    # our files carry `wqedge convert`'s default KV cache, and every row's recipe says which cache it ran (an -a8 row
    # has its file's recipe)
    from wqedge.kv_format import DEFAULT_BITS
    from wqedge.runtime.gguf_reader import WqGGUF
    assert WqGGUF(by["wq-q4"]["file"]).kv_cache.bits == DEFAULT_BITS == 16
    assert by["wq-q4-a8"]["recipe"] == by["wq-q4"]["recipe"] and by["wq-q4"]["recipe"].endswith("; KV cache f16")
    assert by["wq-2.5"]["recipe"].endswith("; KV cache f16")
    if llama_ok:
        assert by["lcp-Q4_0"]["recipe"].endswith("KV cache f16 (llama.cpp's default)")
    assert by["wq-q4-a8"]["perplexity"] != by["wq-q4"]["perplexity"]
    assert by["wq-q4-a8"]["perplexity"] == pytest.approx(by["wq-q4"]["perplexity"], rel=0.02)
    assert 2.0 < by["wq-2.5"]["bits"] <= 2.5 + 1e-6   # the mixed plan meets its budget
    if llama_ok:
        assert by["lcp-Q4_0"]["bits"] == pytest.approx(4.5)
    if HAVE_ORT:   # same weights as wq-q4, so the same perplexity up to float rounding
        assert by["ort-portable"]["perplexity"] == pytest.approx(by["wq-q4"]["perplexity"], rel=1e-3)
        assert any(c["row"] == "ort-portable" and c["vs"] == "wq-q4" for c in rep["comparisons"])
    for c in rep["comparisons"]:
        assert c["decode_ratio"] > 0 and c["prefill_ratio"] > 0
    assert "## Ratios measured in this run" in md or not rep["comparisons"]
    assert "| row | bits/w | file MiB | ppl | decode tok/s |" in md


def test_speed_model_init_small(tmp_path):
    """The speed model's build path (init='normal', small tokenizer padded to a larger vocab, tied head,
    llama3 RoPE as in Llama-3.2-1B) on a small shape: a checkpoint the loader and converters accept."""
    from wqedge.converters.tokenizer import read_tokenizer

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.tinymodel import SPEED_SHAPES, build_tiny_model
    assert set(SPEED_SHAPES) == {"tinyllama-1.1b", "llama-3.2-1b"}
    p = build_tiny_model(tmp_path / "m", tie_embeddings=True, rope_scaling="llama3", init="normal", vocab_size=1024,
                         tokenizer_vocab=512)
    ckpt = LlamaCheckpoint.open(p)
    w = ckpt.linear_weight("model.layers.1.mlp.down_proj.weight")
    assert ckpt.spec.vocab_size == 1024 and ckpt.spec.tie_word_embeddings
    assert 0.018 < float(w.std()) < 0.022
    assert read_tokenizer(p).vocab_size == 1024
    with pytest.raises(ValueError, match="exceeds vocab_size"):
        build_tiny_model(tmp_path / "bad", vocab_size=512, tokenizer_vocab=1024)


def test_self_calib_gives_ours_the_models_samples_and_llamacpp_no_imatrix(tmp_path, tiny_model_dir, monkeypatch):
    """--self-calib (issue 13's comparison without calibration text on either side, as each tool's user would run
    it): our files plan and fit on the model's own samples, cached beside the bench's files so a rerun plans on the
    same text; llama.cpp's files get no importance matrix (while a calibrated run's get diag(XᵀX)); the two runs'
    files do not share a cache folder; and the option refuses calibration text."""
    import wqedge.calib_source as cs
    import wqedge.converters.llamacpp as lcp
    from wqedge.bench import files as bf
    from wqedge.bench import runner
    from wqedge.tinymodel import tiny_corpus
    sample = "\n".join(tiny_corpus(40))
    calls = []
    monkeypatch.setattr(cs, "self_generated_text", lambda ckpt, progress=None, device=None: calls.append(1) or sample)
    texts = [runner.self_calibration(str(tiny_model_dir), tmp_path, None, lambda m: None) for _ in range(2)]
    assert texts == [sample, sample] and len(calls) == 1          # sampled once, then read from the cache

    seen = {}

    class Stop(Exception):
        pass

    def fake_export(ckpt, path, imatrix=None, **kw):   # stands in for llama.cpp: records what it would be given
        seen[path.parent.name] = imatrix
        raise Stop
    monkeypatch.setattr(lcp, "available_types", lambda types, imatrix=False: tuple(types))
    monkeypatch.setattr(lcp, "export_llamacpp", fake_export)
    self_cal = bf.ModelFiles(tiny_model_dir, tmp_path, sample, lambda m: None, imatrix=False)
    with_text = bf.ModelFiles(tiny_model_dir, tmp_path, sample, lambda m: None)
    assert self_cal.dir != with_text.dir and self_cal.calib_text == with_text.calib_text == sample
    for mf in (self_cal, with_text):
        with pytest.raises(Stop):
            mf._llamacpp("lcp-Q4_0")
    assert seen[self_cal.dir.name] is None
    imx = seen[with_text.dir.name]
    assert imx and all(v.ndim == 1 and float(v.min()) >= 0 for v in imx.values())
    with pytest.raises(bf.NotAvailable, match="importance matrix.*not --self-calib"):
        self_cal._llamacpp("lcp-IQ2_XXS")

    r = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--self-calib", "--calib",
                                  "--rows", "wq-q4", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "does not go with --calib" in r.output


def test_bench_self_calib_run_reports_it(tmp_path, tiny_model_dir, monkeypatch):
    """A whole --self-calib run (one of our rows): the model's own sample (stubbed here: sampling is
    calib_source's, tested there) drives our file, the report header says which calibration each side had, and
    the files sit in the cache folder of that text without importance matrix."""
    import wqedge.calib_source as cs
    from wqedge.tinymodel import tiny_corpus
    text = tmp_path / "text.txt"
    text.write_text("\n".join(tiny_corpus(600)), encoding="utf-8")
    sample = "\n".join(tiny_corpus(80))
    monkeypatch.setattr(cs, "self_generated_text", lambda ckpt, progress=None, device=None: sample)
    out, cache = tmp_path / "rep", tmp_path / "cache"
    args = ["bench", "--model", str(tiny_model_dir), "--eval-text", str(text), "--self-calib", "--speed-model", "none",
            "--rows", "wq-q4", "--threads", "1", "--prefill", "8", "--decode", "4", "--reps", "1", "--rounds", "1",
            "--ppl-windows", "1", "--ppl-ctx", "64", "--cache-dir", str(cache), "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["info"]["options"]["self_calib"] is True and rep["info"]["options"]["calib_text"] is None
    assert rep["info"]["self_calib_chars"] == len(sample)
    assert rep["rows"][0]["status"] == "ok"
    assert "--self-calib" in out.with_suffix(".md").read_text()
    from wqedge.bench.files import CACHE_VERSION
    assert [p.name for p in cache.iterdir() if p.name.endswith(f"-noimatrix-v{CACHE_VERSION}")]
    assert [p.name for p in cache.iterdir() if p.name.endswith("-selfcalib-v1.txt")]


def test_perplexity_comparisons_carry_their_paired_standard_error():
    """Rows with per-window NLLs: a comparison reports the relative change and its paired SE (wqedge.perplexity.
    paired_change on the windows), the ppl cells show the SE over windows; rows without them stay as before."""
    import math
    import statistics

    from wqedge.bench.report import _ppl_cell
    from wqedge.bench.runner import comparisons
    from wqedge.perplexity import paired_change

    def row(name, backend, bits, nll):
        ppl = None if nll is None else math.exp(statistics.fmean(nll))
        return {"model": "m", "row": name, "backend": backend, "bits": bits, "decode_tok_s": 100.0, "status": "ok",
                "prefill_tok_s": 10.0, "peak_mib": 100.0, "roofline_fraction": 0.5, "perplexity": ppl,
                "window_nll": nll}
    ours, theirs = [1.0, 1.2, 0.9, 1.1], [1.05, 1.3, 0.92, 1.2]
    rows = [row("wq-at-Q2_K", "wqedge", 3.1189, ours), row("lcp-Q2_K", "llamacpp", 3.119, theirs)]
    c = {(c["row"], c["vs"]): c for c in comparisons(rows)}[("wq-at-Q2_K", "lcp-Q2_K")]
    rel, se = c["ppl_change"]
    assert (rel, se) == paired_change(ours, theirs)
    assert rel == pytest.approx(100 * (rows[0]["perplexity"] / rows[1]["perplexity"] - 1))
    d = [a - b for a, b in zip(ours, theirs)]
    assert se == pytest.approx(100 * statistics.stdev(d) / 2)
    assert _ppl_cell(rows[0]) == f"{rows[0]['perplexity']:.3f} ± {rows[0]['perplexity'] * statistics.stdev(ours) / 2:.3f}"
    one = row("wq-at-Q4_0", "wqedge", 4.5, [1.0])   # one window: no SE, no paired change
    assert _ppl_cell(one) == f"{one['perplexity']:.3f}"
    with pytest.raises(ValueError, match="same windows"):
        paired_change([1.0, 2.0], [1.0, 2.0, 3.0])
