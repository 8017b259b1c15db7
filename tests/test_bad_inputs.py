"""Bad input never gives a traceback, a hang, unbounded memory or a leftover file (issue 11).

Each case feeds a reproducer from ../shared/findings or a hand-made bad input through the command line or the
reader and asserts the clear error, the bounded memory, or the absence of leftovers.
"""
from __future__ import annotations

import errno
import json
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from wqedge.alloc.uniform import uniform_plan
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.cli import main
from wqedge.fileio import atomic_output
from wqedge.quantize import convert_to_gguf
from wqedge.runtime.gguf_check import FormatError, check_gguf
from wqedge.runtime.gguf_reader import WqGGUF


@pytest.fixture(scope="module")
def ckpt(tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(intermediate=320))


@pytest.fixture(scope="module")
def q4_file(ckpt, tmp_path_factory):
    plan = uniform_plan(ckpt.spec.linears(), 128, 4.5, method="minmax", model_fingerprint=ckpt.fingerprint())
    return convert_to_gguf(ckpt, plan, tmp_path_factory.mktemp("q4") / "m.gguf")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("the quick brown fox jumps over the lazy dog and runs far away. " * 120)
    return p


def _invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    # A clear error is a ClickException/usage error: exit code 1 or 2 and no Python exception escaping.
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception), res.output)
    return res


def _findings(name: str, fixture_dir: Path) -> Path:
    p = fixture_dir.parent / "findings" / name
    if not p.is_file():
        pytest.skip(f"reproducer {p} not found")
    return p


# ------------------------------------------------------------------ 1. the reader bounds every count

def _gguf_header(kvs: bytes, n_kv: int, n_tensors: int = 0, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


def _key(name: str) -> bytes:
    b = name.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize("data,match", [
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40), "string length"),
    (_gguf_header(_key("a") + struct.pack("<IIQ", 9, 5, 1 << 47) + b"\0" * 64, 1), "array of"),
    (_gguf_header(_key("a") + struct.pack("<IIQ", 9, 8, 1 << 40) + b"\0" * 64, 1), "string array"),
    (_gguf_header(b"", 1 << 40), "absurd key count"),
    (_gguf_header(_key("general.alignment") + struct.pack("<II", 4, 1), 1) + b"\0" * 16, "alignment"),
    (_gguf_header(_key("a") + struct.pack("<I", 77) + b"\0" * 16, 1), "unknown value type"),
    (_gguf_header(b"", 0, 1, _key("t") + struct.pack("<IQIQ", 1, 32, 0, 0)) + b"\0" * 32, "run past the end"),
    (_gguf_header(b"", 0, 1, _key("t") + struct.pack("<IQIQ", 1, 32, 250, 0)) + b"\0" * 200, "unknown ggml type"),
    (_gguf_header(b"", 0, 1, _key("t") + struct.pack("<I", 9) + b"\0" * 64), "dimensions"),
    (b"GGUF" + struct.pack("<IQQ", 7, 0, 0) + b"\0" * 8, "version"),
    (b"NOPE" + b"\0" * 40, "not a GGUF"),
    (b"GG", "too small"),
])
def test_check_gguf_refuses_counts_that_do_not_fit(tmp_path, data, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=match):
        check_gguf(p)
    with pytest.raises(FormatError):
        WqGGUF(p)


def test_check_gguf_accepts_what_we_write(q4_file):
    check_gguf(q4_file)
    assert WqGGUF(q4_file).measured_bits() > 4


def test_inspect_memory_blowup_reproducer_is_refused_in_bounded_memory(fixture_dir):
    """The finding: gguf.GGUFReader looped over an i32 array count of 2**47 (4 GB in 23 s). Now a clear
    error under a 1.5 GiB address-space limit, in a few seconds."""
    p = _findings("py-inspect-memblowup-min.gguf", fixture_dir)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from wqedge.cli import main
        sys.exit(main(["inspect", {str(p)!r}], standalone_mode=True))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=p.parent)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "runs past the end of the file" in r.stderr, r.stderr


def test_mutated_files_give_format_errors_only(q4_file, tmp_path):
    """A small mutation fuzzer over the header region: every mutant either reads (and its table builds) or is a
    FormatError; no other exception, no hang. Seeded, so a failure reproduces."""
    data = bytearray(q4_file.read_bytes())
    header = WqGGUF(q4_file).reader.data_offset
    rng = random.Random(11)
    p = tmp_path / "mut.gguf"
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        m = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(header)
            m[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        if rng.random() < 0.2:
            m = m[:rng.randrange(len(m))]
        p.write_bytes(bytes(m))
        try:
            f = WqGGUF(p)
            f.layer_table()
            outcomes["ok"] += 1
        except FormatError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


# ------------------------------------------------------------------ 3. no leftovers

def test_sigterm_during_convert_leaves_nothing(ckpt, tmp_path):
    """SIGTERM arrives while the file is being written: the process exits non-zero and neither the hidden
    temporary file nor the folders convert made for the output remain."""
    out = tmp_path / "new" / "deeper" / "m.gguf"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import wqedge.quantize as q
        real = q.quantize_linears
        def linears(*a, **k):
            for i, item in enumerate(real(*a, **k)):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield item
        q.quantize_linears = linears
        from wqedge.cli import main
        main(["convert", {str(ckpt.path)!r}, "-o", {str(out)!r}, "--bits", "4.5", "--method", "minmax"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_failed_convert_removes_the_folders_it_made(ckpt, tmp_path):
    plan = uniform_plan(ckpt.spec.linears(), 128, 4.5)
    plan.model_fingerprint = "0" * 64  # refused after the output was opened
    with pytest.raises(ValueError):
        convert_to_gguf(ckpt, plan, tmp_path / "a" / "b" / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_reported_as_such_and_cleaned(tmp_path, monkeypatch):
    with pytest.raises(OSError, match="no space left") as ei:
        with atomic_output(tmp_path / "m.gguf") as tmp:
            tmp.write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert ".partial" not in str(ei.value) and "m.gguf" in str(ei.value)
    # numpy's tofile says "65536 requested and 26752 written" with no errno: judged by the free space left
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError, match="no space left"):
        with atomic_output(tmp_path / "m.gguf"):
            raise OSError("65536 requested and 26752 written")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_names_the_users_path_not_the_temporary_one():
    target = Path("/proc/wqedge-cannot-write-here/m.gguf")
    with pytest.raises(OSError) as ei:
        with atomic_output(target):
            pass
    assert str(target) in str(ei.value) and ".partial" not in str(ei.value)


def test_errors_about_inputs_pass_through_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError, match="/nonexistent/input"):
        with atomic_output(tmp_path / "m.gguf"):
            open("/nonexistent/input")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 4. non-finite values outside the linears

_DENSE = [("model.norm.weight", (3,)), ("model.layers.0.input_layernorm.weight", (0,)),
          ("model.embed_tokens.weight", (1, 7))]


# 1e6 fits a float32 norm but overflows the fp16 embedding table (stored fp16): both must be refused
@pytest.mark.parametrize("tensor,index,value", [(t, i, v) for t, i in _DENSE for v in (float("inf"), float("nan"))]
                         + [("model.embed_tokens.weight", (1, 7), 1e6)])
def test_non_finite_dense_tensors_are_refused_by_convert(tiny_model_factory, copy_model, tmp_path, tensor, index,
                                                         value):
    from safetensors.torch import load_file, save_file
    d = copy_model(tiny_model_factory(seed=3))
    st = load_file(d / "model.safetensors")
    st[tensor] = st[tensor].float()
    st[tensor][index] = value
    st[tensor] = st[tensor].half()  # fp16 checkpoint: 1e6 becomes inf here already
    save_file(st, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o" / "m.gguf"
    res = _invoke("convert", d, "-o", out, "--bits", "4.5")
    assert res.exit_code == 1, res.output
    assert "non-finite" in res.output, res.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 5, 6, 8: clear messages

@pytest.mark.parametrize("args,match", [
    (["convert", "{model}", "--bits", "nan"], "positive number of bits"),
    (["convert", "{model}", "--bits", "-1"], "positive number of bits"),
    (["convert", "{model}", "--bits", "inf"], "positive number of bits"),
    (["convert", "{model}", "--calib", "{empty}", "-o", "{tmp}/x.gguf"], "holds 0 words"),
    (["convert", "{model}", "--calib", "{tiny}", "-o", "{tmp}/x.gguf"], "holds 1 words"),
    (["plan", "{model}", "--calib", "{empty}", "-o", "{tmp}/p.json"], "holds 0 words"),
    (["convert", "{model}", "--plan", "{garbage}"], "not a wqedge plan"),
    (["convert", "{model}", "--plan", "{badjson}"], "not valid JSON"),
    (["convert", "{model}", "--plan", "{badjson}", "--rotate-block", "64"], "a --plan file records its own rotation"),
    (["convert", "{model}", "--plan", "{badjson}", "--rotate"], "a --plan file records its own rotation"),
    (["eval", "{model}", "--text", "{calib}", "--ctx", "0"], "--ctx"),
    (["eval", "{model}", "--text", "{calib}", "--chunks", "-1"], "--chunks"),
    (["eval", "{model}", "--text", "{calib}", "--batch", "0"], "--batch"),
    (["run", "{q4}", "-n", "1000000000000"], "--max-tokens"),
    (["run", "{q4}", "-n", "4294967297"], "--max-tokens"),
    (["run", "{q4}", "-n", "0"], "--max-tokens"),
    (["run", "{q4}", "-n", "100000"], "context"),
    (["run", "{q4}", "--top-p", "0"], "top-p"),
    (["run", "{q4}", "--temperature", "nan"], "temperature"),
    (["run", "{q4}", "-p", "\udcff\udcfe bad bytes"], "not valid UTF-8"),
    (["eval", "{gemma}", "--text", "{calib}"], "architecture 'gemma'"),
    (["inspect", "{gemma}"], "architecture 'gemma'"),
    (["inspect", "{model}/config.json"], "not a GGUF file"),
])
def test_bad_input_gives_a_clear_error(ckpt, q4_file, calib_file, tmp_path, args, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("hi")
    (tmp_path / "garbage.json").write_bytes(random.Random(1).randbytes(4096))
    (tmp_path / "bad.json").write_text("{\"format\": ")
    gemma = tmp_path / "gemma.gguf"
    raw = q4_file.read_bytes()
    kv = _key("general.architecture") + struct.pack("<IQ", 8, 5) + b"llama"
    assert raw.count(kv) == 1
    gemma.write_bytes(raw.replace(kv, _key("general.architecture") + struct.pack("<IQ", 8, 5) + b"gemma"))
    subs = {"{model}": str(ckpt.path), "{empty}": str(tmp_path / "empty.txt"), "{tiny}": str(tmp_path / "tiny.txt"),
            "{garbage}": str(tmp_path / "garbage.json"), "{badjson}": str(tmp_path / "bad.json"),
            "{calib}": str(calib_file), "{q4}": str(q4_file), "{gemma}": str(gemma), "{tmp}": str(tmp_path)}
    args = [subs.get(a, a) for a in args]
    args = [a.replace("{model}", str(ckpt.path)) for a in args]
    res = _invoke(*args)
    assert res.exit_code in (1, 2), res.output
    assert match.lower() in res.output.lower(), res.output
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "p.json").exists()


def test_run_stops_at_the_requested_length_not_silently_at_the_context(q4_file):
    res = _invoke("run", q4_file, "-p", "hello", "-n", "5", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("hello")


def test_llamacpp_gguf_is_not_a_wqedge_file(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpp_support import write_stock_gguf
    p = write_stock_gguf(tmp_path / "stock.gguf")
    res = _invoke("inspect", p)
    assert res.exit_code == 1 and "not a wqedge file" in res.output and "llama.cpp" in res.output, res.output


# ------------------------------------------------------------------ 9. same inputs, same bytes

def test_embedded_plan_holds_no_wall_clock_times(ckpt, tmp_path):
    plan = uniform_plan(ckpt.spec.linears(), 128, 4.5, method="minmax", model_fingerprint=ckpt.fingerprint())
    plan.meta = {"seconds": {"total": 1.5}, "ppo": {"seconds": 3.0, "measure_seconds": 2.0, "history": [1, 2]}}
    a = convert_to_gguf(ckpt, plan, tmp_path / "a.gguf")
    plan.meta = {"seconds": {"total": 9.25}, "ppo": {"seconds": 7.0, "measure_seconds": 1.0, "history": [1, 2]}}
    b = convert_to_gguf(ckpt, plan, tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()
    embedded = json.loads(WqGGUF(a).plan_json)
    assert embedded["meta"] == {"ppo": {"history": [1, 2]}}
    assert json.loads(plan.to_json())["meta"]["seconds"] == {"total": 9.25}  # the plan file keeps them


def test_greedy_convert_with_calibration_is_byte_for_byte_repeatable(tiny_model_factory, calib_file, tmp_path):
    model = tiny_model_factory(hidden=128, n_layers=1, intermediate=128)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.gguf"
        res = _invoke("convert", model, "-o", out, "--bits", "3.25", "--calib", calib_file)
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ 10. bench paths

def test_bench_resolves_relative_paths_for_its_workers(tmp_path, monkeypatch):
    """Workers run with cwd=/, so `wqedge bench --cache-dir cache` once failed every row."""
    from wqedge.bench import runner

    seen = []

    def model_files(model, cache, *a, **k):
        seen.append((model, cache))
        raise ValueError("stop here")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "e.txt").write_text("x")
    monkeypatch.setattr(runner, "ModelFiles", model_files)
    with pytest.raises(ValueError, match="stop here"):
        runner.run_bench(runner.BenchOptions(model="m", eval_text="e.txt", calib_text=None, rows=[], cache_dir="cache",
                                             speed_model=None))
    assert seen == [(str(tmp_path / "m"), tmp_path / "cache")]
    assert (tmp_path / "cache").is_dir()
