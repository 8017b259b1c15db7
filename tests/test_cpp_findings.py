"""Issue 11's C++ findings, each fed to the runtime through the C API with the clear error asserted:
the reproducers of ../shared/findings (Inf in an embedding row, non-finite activations in int8 mode,
general.alignment = 1), non-finite weights elsewhere (norms, rope_freqs, output head, a linear's fp16
scale), stock llama.cpp files and other architectures, and the C API's bounds (generation length,
context size, non-finite logits given to the sampler).
"""
from __future__ import annotations

import ctypes as C
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ensure_library, patch_tensor_info, write_stock_gguf, write_tiny  # noqa: E402

ensure_library()
from wqedge.runtime import _native, native  # noqa: E402
from wqedge.runtime._native import NativeError  # noqa: E402

FINDINGS = Path(os.environ.get("WQEDGE_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures")).parent / "findings"


def finding(name: str) -> Path:
    p = FINDINGS / name
    if not p.is_file():
        pytest.skip(f"reproducer missing: {p}")
    return p


@pytest.fixture
def q8_activations():
    before = native.get_activations()
    native.set_activations("q8")
    yield
    native.set_activations(before)


def _eval_error(path, tokens=(1, 5, 7), **ctx_kw) -> NativeError:
    m = native.Model(path)
    with native.Context(m, n_ctx=16, n_threads=1, **ctx_kw) as ctx:
        with pytest.raises(NativeError) as ei:
            ctx.eval(list(tokens))
        assert ctx.position == 0  # a failed eval leaves the cache as it was
    return ei.value


# ------------------------------------------------------------------ reproducers
@pytest.mark.parametrize("act", ["f32", "q8"])
def test_inf_in_bos_embedding_row(act):
    path = finding("ubsan-float-cast-q8-inf-bos-embd.gguf")
    before = native.get_activations()
    native.set_activations(act)
    try:
        e = _eval_error(path, tokens=(native.Model(path).info["bos_token_id"],))
        assert e.code == _native.ERR_FORMAT
        assert "token_embd.weight" in str(e) and "non-finite" in str(e), str(e)
        with pytest.raises(NativeError, match="non-finite") as ei:  # what `wqedge run` calls
            native.run(path, "Once upon a time", max_new_tokens=4, n_threads=1)
        assert ei.value.code == _native.ERR_FORMAT
    finally:
        native.set_activations(before)


def test_nonfinite_activations_in_int8_mode(q8_activations):
    """Non-finite activations reached quantize_block's float->int cast (UB); now a clear error. The UB
    itself is checked under UBSan by the sanitizer build (test_kernels) and the fuzzers (tests/test_fuzz.py)."""
    path = finding("ubsan-float-cast-quantize_block.gguf")
    with pytest.raises(NativeError, match="non-finite") as ei:
        native.run(path, "Once upon a time", max_new_tokens=4, n_threads=1)
    assert ei.value.code == _native.ERR_FORMAT


def test_alignment_below_8_is_refused():
    with pytest.raises(NativeError, match=r"general.alignment = 1 .*multiple of 8") as ei:
        native.Model(finding("ubsan-misaligned-f32-align1.gguf"))
    assert ei.value.code == _native.ERR_FORMAT


@pytest.mark.parametrize("alignment,ok", [(1, False), (4, False), (24, False), (8, True), (64, True)])
def test_alignment_rule(tmp_path, alignment, ok):
    p = write_tiny(tmp_path / "a.gguf", key_overrides={"general.alignment": 32})
    raw = bytearray(p.read_bytes())
    key = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<I", 4)
    at = raw.find(key)
    assert at >= 0 and struct.unpack_from("<I", raw, at + len(key))[0] == 32
    struct.pack_into("<I", raw, at + len(key), alignment)
    p.write_bytes(bytes(raw))
    if ok:  # the tensors were laid out for 32, so the file may fail later (offsets): only the rule is tested
        try:
            native.Model(p)
        except NativeError as e:
            assert "general.alignment" not in str(e)
    else:
        with pytest.raises(NativeError, match="multiple of 8"):
            native.Model(p)


# ------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("tensor", ["output_norm.weight", "blk.1.attn_norm.weight", "rope_freqs.weight"])
@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_nonfinite_small_float_tensor_is_refused_at_open(tmp_path, tensor, value):
    p = write_tiny(tmp_path / "a.gguf", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    t = {t.name: t for t in gguf.GGUFReader(p).tensors}[tensor]
    raw = bytearray(p.read_bytes())
    struct.pack_into("<f", raw, int(t.data_offset) + 4, value)
    p.write_bytes(bytes(raw))
    with pytest.raises(NativeError, match="non-finite") as ei:
        native.Model(p)
    assert tensor in str(ei.value) and ei.value.code == _native.ERR_FORMAT


def _poison(path: Path, tensor: str, byte_offset: int, half: int = 0x7C00) -> None:
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}[tensor]
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, int(t.data_offset) + byte_offset, half)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("half", [0x7C00, 0xFE00])  # +Inf, NaN
def test_nonfinite_output_head_names_the_tensor(tmp_path, half):
    p = write_tiny(tmp_path / "a.gguf")  # untied F16 output head, vocabulary 96 x 64
    _poison(p, "output.weight", 2 * (64 * 50 + 3), half)  # row 50
    e = _eval_error(p)
    assert e.code == _native.ERR_FORMAT
    assert "non-finite logits" in str(e) and "'output.weight'" in str(e) and "row 50" in str(e), str(e)


def test_embedding_row_checked_only_when_looked_up(tmp_path):
    p = write_tiny(tmp_path / "a.gguf", tied=False)
    _poison(p, "token_embd.weight", 2 * (64 * 9 + 1))  # token 9
    m = native.Model(p)  # the large matrix is not scanned at open
    with native.Context(m, n_ctx=16, n_threads=1) as ctx:
        assert np.isfinite(ctx.eval([1, 5, 7])).all()
        with pytest.raises(NativeError, match=r"'token_embd.weight' holds a non-finite value in row 9"):
            ctx.eval([3, 9])
        assert ctx.position == 3


@pytest.mark.parametrize("act", ["f32", "q8"])
def test_nonfinite_linear_scale_names_the_tensor(tmp_path, act):
    p = write_tiny(tmp_path / "a.gguf", actions=lambda name, c: "q4")
    _poison(p, "blk.0.attn_v.weight", 0)  # row 0, chunk 0: d = Inf
    before = native.get_activations()
    native.set_activations(act)
    try:
        e = _eval_error(p)
    finally:
        native.set_activations(before)
    assert "non-finite logits" in str(e) and "'blk.0.attn_v.weight'" in str(e), str(e)


# ------------------------------------------------------------------ not ours
def test_stock_llamacpp_gguf_with_unknown_type(tmp_path):
    """A llama.cpp quantized file (ggml type 20 = IQ4_NL here) and no wqedge keys: say what it is."""
    p = write_tiny(tmp_path / "a.gguf", drop_keys=("wqedge.format_version",))
    p.write_bytes(bytes(patch_tensor_info(bytearray(p.read_bytes()), "blk.0.attn_q.weight", type_=20)))
    with pytest.raises(NativeError) as ei:
        native.Model(p)
    msg = str(ei.value)
    assert "not a wqedge file" in msg and "run it with llama.cpp" in msg and "unsupported ggml type" not in msg, msg


def test_stock_llamacpp_gguf_of_known_types(tmp_path):
    p = write_stock_gguf(tmp_path / "stock.gguf", "qwen2")
    with pytest.raises(NativeError, match=r"llama.cpp GGUF \(architecture 'qwen2'\), not a wqedge file") as ei:
        native.Model(p)
    assert ei.value.code == _native.ERR_FORMAT


def test_other_architecture_is_refused(tmp_path):
    p = write_tiny(tmp_path / "a.gguf")
    raw = p.read_bytes()
    kv = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5)
    assert raw.count(kv + b"llama") == 1
    p.write_bytes(raw.replace(kv + b"llama", kv + b"gemma"))
    with pytest.raises(NativeError, match="architecture is 'gemma'; this runtime runs 'llama' models only") as ei:
        native.Model(p)
    assert ei.value.code == _native.ERR_UNSUPPORTED


# ------------------------------------------------------------------ C API bounds
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("t") / "t.gguf")


def _generate(ctx, prompt, max_new, out_room):
    lib = _native.lib()
    p = np.asarray(prompt, np.int32)
    out = np.full(out_room, -7, np.int32)
    n_out = C.c_int32(-1)
    sp = lib.wqe_sampler_default_params()
    st = lib.wqe_generate(ctx._h, p.ctypes.data_as(_native._i32p), len(p), max_new, C.byref(sp), 0,
                          _native.TOKEN_CALLBACK(), None, out.ctypes.data_as(_native._i32p), C.byref(n_out))
    return st, n_out.value, out


@pytest.mark.parametrize("max_new", [14, 15, 2**31 - 1])
def test_generate_refuses_what_cannot_fit(tiny, max_new):
    """The C API refuses a generation that cannot fit before any work (no silent stop at a full
    context, no wrap-around); the Python binding checks the same bound itself."""
    with native.Context(native.Model(tiny), n_ctx=16, n_threads=1) as ctx:
        st, n, out = _generate(ctx, [1, 2, 3], max_new, out_room=16)
        if max_new == 14:  # 3 + 14 - 1 = 16: fits exactly (the last token is not evaluated)
            assert st == _native.OK and n == 14 and ctx.position == 16
        else:
            assert st == _native.ERR_CONTEXT_FULL and n == 0 and (out == -7).all() and ctx.position == 0
            assert "do not fit" in _native.lib().wqe_last_error().decode()


def test_context_size_bounds(tmp_path, tiny):
    with pytest.raises(NativeError, match="outside") as ei:
        native.Context(native.Model(tiny), n_ctx=(1 << 24) + 1, n_threads=1)
    assert ei.value.code == _native.ERR_INVALID_ARGUMENT
    # a KV cache beyond physical memory is refused up front (not allocated and touched)
    big = write_tiny(tmp_path / "wide.gguf", D=256, H=16, KV=16, hd=16, layers=2, F=32, V=32, G=64)
    need = 2 * 2 * (1 << 24) * 256 * 4  # 64 GiB; the tiny case below needs 72 GiB
    if need <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        pytest.skip("this machine has more memory than the cache would need")
    with pytest.raises(NativeError, match="KV cache") as ei:
        native.Context(native.Model(big), n_ctx=1 << 24, n_threads=1)
    assert ei.value.code == _native.ERR_OUT_OF_MEMORY
    # the per-thread attention scores count too (tiny: 8 GiB of cache + 1024 x 64 MiB of scores)
    with pytest.raises(NativeError, match="threads' scores") as ei:
        native.Context(native.Model(tiny), n_ctx=1 << 24, n_threads=1024)
    assert ei.value.code == _native.ERR_OUT_OF_MEMORY


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sampler_refuses_nonfinite_logits(bad):
    lib = _native.lib()
    sp = lib.wqe_sampler_default_params()
    sp.temperature = 0.8
    h = C.c_void_p()
    assert lib.wqe_sampler_new(C.byref(sp), C.byref(h)) == _native.OK
    try:
        logits = np.zeros(1000, np.float32)
        logits[::7] = bad
        tok = C.c_int32(-1)
        st = lib.wqe_sample(h, logits.ctypes.data_as(_native._f32p), len(logits), C.byref(tok))
        assert st == _native.ERR_INVALID_ARGUMENT and "non-finite" in lib.wqe_last_error().decode()
    finally:
        lib.wqe_sampler_free(h)
    sp.temperature = float("nan")
    assert lib.wqe_sampler_new(C.byref(sp), C.byref(h)) == _native.ERR_INVALID_ARGUMENT


def _run_tool() -> str:
    from wqedge.runtime import _native as n
    here = Path(n.library_path()).parent / "wqedge-run"
    exe = str(here) if here.is_file() else shutil.which("wqedge-run")
    if not exe:
        pytest.skip("wqedge-run is neither next to the library nor on PATH")
    return exe


def test_bench_tool_reports_its_own_peak_rss_not_its_parents(tiny):
    """wqedge-bench's peak RSS came from ru_maxrss, which survives exec: started by a Python benchmark holding
    torch it reported the parent's gigabytes (10 GB for a 0.7 GB model). It reads VmHWM now (Linux)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc: the tool falls back to ru_maxrss")
    exe = Path(_run_tool()).with_name("wqedge-bench")
    if not exe.is_file():
        pytest.skip("wqedge-bench is not next to wqedge-run")
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this process before the fork
    r = subprocess.run([str(exe), "-m", str(tiny), "-p", "4", "-n", "4", "-r", "1", "-t", "1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    assert 0 < rss < 200, (rss, ballast.nbytes)


@pytest.mark.parametrize("n,match", [("4294967297", "outside"), ("1000000000000", "outside"), ("0", "outside"),
                                     ("100000", "ask for at most")])
def test_run_tool_refuses_lengths_that_wrap_or_do_not_fit(tiny, n, match):
    """`-n 4294967297` used to wrap through int32 to 1 token; a length beyond the context stopped silently."""
    r = subprocess.run([_run_tool(), "-m", str(tiny), "-p", "", "-n", n, "-t", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and match in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("key,value", [("tokenizer.ggml.bos_token_id", 2**32 + 1), ("wqedge.format_version", 2**32 + 1),
                                       ("tokenizer.ggml.eos_token_id", -2)])
def test_integer_keys_are_range_checked_before_narrowing(tmp_path, key, value):
    """2^32 + 1 stored as an i64 used to become 1 when narrowed to int (a valid BOS id, format version 1)."""
    p = write_tiny(tmp_path / "a.gguf", key_overrides={key: (value, gguf.GGUFValueType.INT64)})
    with pytest.raises(NativeError, match=rf"key '{key}' = {value} is out of range") as ei:
        native.Model(p)
    assert ei.value.code == _native.ERR_FORMAT
