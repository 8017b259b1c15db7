"""Quantized KV cache (issue 15): format core, PyTorch reference, C++ kernels and runtime, files and CLI.

- kv_format: row bytes at 8/4 bits, plan field round trip (version 3), --kv-bits parsing;
- the reference's quantizer: every value within half a grid step (+ the fp16 rounding of the group's min) of its
  input; the Walsh–Hadamard butterfly equals the orthonormal matrix (and non-power-of-two heads get blocks);
- the C++ quantizer writes exactly the codes the reference's fake quantization gives (same float32 input:
  bit-identical dequantized values), for a power-of-two head (64, 128) and a ragged one (40: one group per head,
  Hadamard blocks of 8);
- the C++ attention kernels over quantized rows: AVX2 against the scalar reference within 1e-5 of the terms'
  magnitude (NEON: the same C++ test executable under qemu, tests/test_aarch64.py), and the scalar dot equals the
  dot with the dequantized row;
- files: the key is written from the plan and read back by both readers; a file without it runs the float cache
  exactly as before (logits bit-identical to an explicit f32 override); an unknown value is refused by the runtime
  and the Python reader with a message naming the key; the runtime reports the cache's real size;
- logits parity: the C++ runtime (float activations, prefill and decode) against the reference with the same KV
  setting, within KV_TOL (max |Δlogit| / std(logits)); and the quantization's effect on the reference's logits
  within the expected bound of the float cache (KV8_BOUND, KV4_BOUND) and proportional to the grid step.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wqedge.checkpoint import LlamaCheckpoint
from wqedge.kv_format import KEY_BITS, KEY_ROTATION, KVCacheSpec, dequantize_rows, hadamard_block, parse_bits
from wqedge.kvquant import fake_quant_kv, fwht, hadamard, kv_round_trip
from wqedge.plan import Plan, PlanError
from wqedge.units import chunk_bounds

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUP = 64
# Runtime vs reference on the same file and KV setting (float activations): the only differences are float
# summation orders, except that a K or V value next to a rounding boundary of its group's grid may take the
# neighbouring code in one of them; measured max |Δlogit| / std 3e-6 where no code flips, up to 2.6e-3 where one does.
CPP_TOL = 1e-3
KV_TOL = 2e-2
# Reference logits, quantized vs float cache, max |Δlogit| / std on these random models (measured 0.020 and 0.37 at
# 8 and 4 bits for head_dim 32): bounds with margin, and the error must scale with the grid step (255/15 = 17x).
KV8_BOUND = 0.05
KV4_BOUND = 0.6
STEP_RATIO = (255 / 15) / 2, (255 / 15) * 2


def _rel(a, b) -> float:
    assert a.shape == b.shape and np.isfinite(a).all()
    return float(np.abs(a - b).max() / b.std())


# ---------------------------------------------------------------- format core
def test_row_bytes_and_cache_bytes():
    assert KVCacheSpec().row_bytes(64) == 256
    assert KVCacheSpec(8).row_bytes(64) == 2 * 4 + 64       # two groups of 32: fp16 d, fp16 m, codes
    assert KVCacheSpec(4).row_bytes(64) == 4 * 4 + 32       # four groups of 16
    assert KVCacheSpec(4).row_bytes(40) == 4 + 20           # 16 does not divide 40: one group per head
    assert KVCacheSpec(8).row_bytes(40) == 4 + 40
    assert KVCacheSpec(16).row_bytes(64) == 128 and KVCacheSpec(16).row_bytes(40) == 80   # fp16 values, no groups
    assert not KVCacheSpec(16).rotate_k and KVCacheSpec(16).label() == "f16"
    # TinyLlama-1.1B shape at 4096 tokens: 22 layers x 4 KV heads x 64
    assert KVCacheSpec().cache_bytes(4096, [4] * 22, 64) == 2 * 4096 * 88 * 256 == 184549376
    assert KVCacheSpec(4).cache_bytes(4096, [4] * 22, 64) == 2 * 4096 * 88 * 48


def test_plan_field_round_trip(tiny_model_dir):
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    p = _plan(ckpt)
    assert json.loads(p.to_json())["version"] == 1 and "kv_cache" not in json.loads(p.to_json())
    p.kv_cache = KVCacheSpec(4).to_plan()
    d = json.loads(p.to_json())
    assert d["version"] == 3 and d["kv_cache"] == {"bits": 4, "rotation": "hadamard"}
    assert Plan.from_dict(d).kv_cache == d["kv_cache"]
    p.kv_cache = KVCacheSpec().to_plan()   # float32 asked for explicitly: recorded, and read back as float32
    d32 = json.loads(p.to_json())
    assert d32["kv_cache"] == {"bits": None} and KVCacheSpec.from_plan(Plan.from_dict(d32).kv_cache).bits is None
    with pytest.raises(PlanError, match="KV cache bits"):
        Plan.from_dict({**d, "kv_cache": {"bits": 3}}).validate()
    with pytest.raises(PlanError, match="version 3"):
        Plan.from_dict({**d, "version": 2})
    assert parse_bits("f32") is None and parse_bits("4") == 4
    with pytest.raises(ValueError, match="--kv-bits"):
        parse_bits("5")
    # the runtime binding reads the same values (None: the file's setting, code 0; float: 32)
    from wqedge.runtime.native import _kv_bits_code
    assert [_kv_bits_code(v) for v in (None, "f32", "float", "8", 4)] == [0, 32, 32, 8, 4]
    with pytest.raises(ValueError, match="--kv-bits"):
        _kv_bits_code("5")


# ---------------------------------------------------------------- reference quantizer
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(200, 64, generator=g) * torch.rand(200, 1, generator=g) * 4
    x[::7, 3] *= 25  # outliers
    g = KVCacheSpec(bits).group(64)
    y = fake_quant_kv(x, KVCacheSpec(bits)).reshape(200, 64 // g, g)
    xg = x.reshape(200, 64 // g, g)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    step = (mx - mn) / ((1 << bits) - 1)
    # half a step, plus fp16 rounding of the min (2^-11 relative) and of the step (which moves the top code)
    bound = 0.5 * step * (1 + 2 ** -10) + mn.abs() * 2 ** -11 + step * ((1 << bits) - 1) * 2 ** -11 + 1e-7
    assert ((y - xg).abs() <= bound).all()


def test_hadamard_butterfly_is_the_orthonormal_matrix():
    for hd in (64, 128, 40, 6):
        H = hadamard(hd)
        assert torch.allclose(H @ H.T, torch.eye(hd, dtype=torch.float64), atol=1e-12)
        assert hadamard_block(hd) == (hd & -hd)
        x = torch.randn(5, hd)
        assert torch.allclose(fwht(x, hadamard_block(hd)).double(), x.double() @ H, atol=1e-5)
    x = torch.randn(4, 2, 64)  # rotation round trip without quantization error at 8 bits is small
    assert (kv_round_trip(x, KVCacheSpec(8), True) - x).abs().max() < 0.05


# ---------------------------------------------------------------- C++ kernels
@pytest.fixture(scope="module")
def native_lib():
    from cpp_support import ensure_library
    ensure_library()
    from wqedge.runtime import native
    return native


@pytest.mark.parametrize("hd", [64, 128, 40])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cpp_quantizer_equals_reference(native_lib, hd, bits):
    x = np.random.default_rng(hd + bits).standard_normal((300, hd)).astype(np.float32) * 2
    x[::5, 1] *= 20
    rows = native_lib.kv_quantize(x, bits, rotate=True)   # (a 16-bit cache is never rotated)
    assert rows.shape == (300, KVCacheSpec(bits).row_bytes(hd))
    xt = torch.from_numpy(x)
    ref = fake_quant_kv(xt if bits == 16 else fwht(xt, hadamard_block(hd)), KVCacheSpec(bits)).numpy()
    np.testing.assert_array_equal(dequantize_rows(rows, bits, hd), ref)
    if bits == 16:   # IEEE half rounding, value by value
        np.testing.assert_array_equal(ref, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("hd", [64, 128, 40])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cpp_attention_kernels_against_scalar(native_lib, hd, bits):
    rng = np.random.default_rng(7 * hd + bits)
    x = rng.standard_normal((61, hd)).astype(np.float32) * 3
    rows = native_lib.kv_quantize(x, bits, rotate=False)
    q, p = rng.standard_normal(hd).astype(np.float32), rng.random(61).astype(np.float32)
    deq = dequantize_rows(rows, bits, hd).astype(np.float64)
    s_ref, o_ref = native_lib.kv_attend(rows, bits, hd, q, p, "scalar")
    mag_s, mag_o = np.abs(deq * q).sum(1), (np.abs(deq) * p[:, None]).sum(0)
    assert (np.abs(s_ref - deq @ q) <= 1e-5 * mag_s).all()
    assert (np.abs(o_ref - p @ deq) <= 1e-5 * mag_o).all()
    ran = 0
    for k in ("avx2", "neon"):
        try:
            s, o = native_lib.kv_attend(rows, bits, hd, q, p, k)
        except ValueError:
            continue  # not built / not this CPU
        ran += 1
        assert (np.abs(s - s_ref) <= 1e-5 * mag_s).all()
        assert (np.abs(o - o_ref) <= 1e-5 * mag_o).all()
    if not ran:
        pytest.skip("no SIMD kernel set on this CPU")


def test_cpp_kvcache_test_executable():
    from cpp_support import ensure_test_executable
    exe = ensure_test_executable("test_kvcache")
    p = subprocess.run([str(exe)], capture_output=True, text=True)
    assert p.returncode == 0 and "0 failures" in p.stdout, p.stdout + p.stderr


# ---------------------------------------------------------------- files and runtime
def _plan(ckpt, action="q8") -> Plan:
    acts = {lin.hf_name: [action] * len(chunk_bounds(lin.in_features, GROUP)) for lin in ckpt.spec.linears()}
    plan = Plan.from_actions(ckpt.spec.linears(), GROUP, 16.0, "uniform", acts, model_fingerprint=ckpt.fingerprint())
    plan.budget_bits = plan.effective_bits()
    return plan.validate()


@pytest.fixture(scope="module")
def files(tiny_model_factory, tmp_path_factory):
    """q8 files of two tiny models: head_dim 32 (power of two) and 40 (Hadamard blocks of 8, one group per head),
    without a KV key and with kv 4 / kv 8 / kv 4 unrotated."""
    from wqedge.quantize import convert_to_gguf
    d = tmp_path_factory.mktemp("kv")
    out = {}
    for name, shape in (("hd32", {}), ("hd40", dict(hidden=160, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=288))):
        ckpt = LlamaCheckpoint.open(tiny_model_factory(**shape))
        for kv in (None, KVCacheSpec(4), KVCacheSpec(8), KVCacheSpec(4, "none"), KVCacheSpec(16)):
            plan = _plan(ckpt)
            key = f"{name}-{'f32' if kv is None else kv.label().replace(' ', '').replace('(norotation)', 'plain')}"
            plan.kv_cache = None if kv is None else kv.to_plan()
            out[key] = convert_to_gguf(ckpt, plan.validate(), d / f"{key}.gguf")
    return out


def _windows(n=2, length=40):
    return np.random.default_rng(0).integers(0, 256, (n, length))


def _reference_logits(path, windows, kv=None):
    from wqedge.reference import load_reference, logits_fn
    return logits_fn(load_reference(path, kv))(windows)


def _cpp_logits(path, windows, **kv):
    from wqedge.runtime import native
    m = native.Model(path)
    out = []
    n_ctx = max(64, windows.shape[1])
    for row in windows:
        prefill = native.Context(m, n_ctx=n_ctx, n_threads=2, **kv).eval(row.tolist(), all_logits=True)
        c = native.Context(m, n_ctx=n_ctx, n_threads=1, **kv)
        half = len(row) // 2  # a prompt step, then decode steps reading the prompt's cache rows
        first = c.eval(row[:half].tolist(), all_logits=True)
        decode = np.concatenate([first, np.stack([c.eval([t]) for t in row[half:].tolist()])])
        out.append((prefill, decode))
    return out


def test_keys_written_and_read(files):
    from wqedge.runtime.gguf_reader import WqGGUF
    f = WqGGUF(files["hd32-q4"])
    assert f.kv_cache == KVCacheSpec(4) and f.format_version == 1
    assert f.reader.fields[KEY_BITS].contents() == 4 and f.reader.fields[KEY_ROTATION].contents() == "hadamard"
    assert WqGGUF(files["hd32-q4plain"]).kv_cache == KVCacheSpec(4, "none")
    g = WqGGUF(files["hd32-f32"])
    assert g.kv_cache == KVCacheSpec() and not any(k.startswith("wqedge.kv_cache") for k in g.reader.fields)


def test_runtime_reports_cache_and_memory(native_lib, files):
    m = native_lib.Model(files["hd32-q4"])
    n_kv, hd, n_layer = m.info["n_head_kv"], m.info["head_dim"], m.info["n_layer"]
    for kv, bits, spec in ((None, 4, KVCacheSpec(4)), ("f32", 32, KVCacheSpec()), (8, 8, KVCacheSpec(8)),
                           ("f16", 16, KVCacheSpec(16))):
        c = native_lib.Context(m, n_ctx=100, n_threads=1, kv_bits=kv)
        assert c.kv_cache == {"bits": bits, "rotated": bits in (8, 4),
                              "bytes": spec.cache_bytes(100, [n_kv] * n_layer, hd)}
    assert native_lib.Context(native_lib.Model(files["hd32-f32"]), n_ctx=8, n_threads=1).kv_cache["bits"] == 32
    assert not native_lib.Context(m, n_ctx=8, n_threads=1, kv_rotation="none").kv_cache["rotated"]
    with pytest.raises(ValueError, match="f32, f16, 8 or 4"):
        native_lib.Context(m, n_ctx=8, kv_bits=5)


def test_file_without_key_runs_float_cache_as_before(native_lib, files):
    native_lib.set_activations("f32")
    w = _windows(1)
    (a, _), = _cpp_logits(files["hd32-f32"], w)
    (b, _), = _cpp_logits(files["hd32-q4"], w, kv_bits="f32")  # same weights, float override
    np.testing.assert_array_equal(a, b)
    assert _rel(a, _reference_logits(files["hd32-f32"], w)[0]) < CPP_TOL


def _patch_kv_bits(src: Path, dst: Path, value: int) -> Path:
    data = bytearray(src.read_bytes())
    key = KEY_BITS.encode()
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, i)[0] == 4  # GGUF type u32
    struct.pack_into("<I", data, i + 4, value)
    dst.write_bytes(bytes(data))
    return dst


def test_unknown_value_refused(native_lib, files, tmp_path):
    from wqedge.runtime.gguf_reader import FormatError, WqGGUF
    bad = _patch_kv_bits(files["hd32-q4"], tmp_path / "bad.gguf", 3)
    with pytest.raises(native_lib.NativeError, match="kv_cache.bits = 3"):
        native_lib.Model(bad)
    with pytest.raises(FormatError, match="KV cache bits"):
        WqGGUF(bad).kv_cache


@pytest.mark.parametrize("key", ["hd32-q4", "hd32-q8", "hd32-q4plain", "hd40-q4", "hd40-q8", "hd32-f16", "hd40-f16"])
def test_cpp_runtime_matches_reference(native_lib, files, key):
    native_lib.set_activations("f32")
    w = _windows()
    ref = _reference_logits(files[key], w)
    for (prefill, decode), lr in zip(_cpp_logits(files[key], w), ref):
        assert _rel(prefill, lr) < KV_TOL
        assert _rel(decode, lr) < KV_TOL


def test_override_matches_reference_override(native_lib, files):
    """--kv-bits 4 on a file without the key: the runtime's override and the reference's agree."""
    native_lib.set_activations("f32")
    w = _windows(1)
    ref = _reference_logits(files["hd32-f32"], w, KVCacheSpec(4))[0]
    (prefill, decode), = _cpp_logits(files["hd32-f32"], w, kv_bits=4)
    assert _rel(prefill, ref) < KV_TOL and _rel(decode, ref) < KV_TOL


@pytest.mark.parametrize("key", ["hd32-q4", "hd40-q8", "hd32-f16", "hd32-f32"])
def test_long_prompt_matches_reference(native_lib, files, key):
    """150 tokens: attention over several 64-position chunks of the cache (dequantized chunk by chunk) and, in the
    prompt, several blocks of tokens per task; prefill and decode against the reference."""
    native_lib.set_activations("f32")
    w = _windows(1, 150)
    ref = _reference_logits(files[key], w)[0]
    (prefill, decode), = _cpp_logits(files[key], w)
    tol = CPP_TOL if key.endswith(("f16", "f32")) else KV_TOL
    assert _rel(prefill, ref) < tol and _rel(decode, ref) < tol


@pytest.mark.parametrize("key", ["hd32-f32", "hd40-q8", "hd32-q4", "hd32-f16"])
def test_context_size_changes_no_logit(native_lib, files, key):
    """The cache is head-major (a KV head's rows n_ctx apart, cpp/src/model.cpp): the same tokens through contexts of
    70 and 1000 positions give the same bits, prompt and decode steps alike, with 1 and 2 threads."""
    from wqedge.runtime import native
    native_lib.set_activations("f32")
    row = _windows(1, 70)[0].tolist()
    m = native.Model(files[key])
    runs = []
    for n_ctx in (70, 1000):
        for threads in (1, 2):
            c = native.Context(m, n_ctx=n_ctx, n_threads=threads)
            first = c.eval(row[:50], all_logits=True)
            runs.append(np.concatenate([first, np.stack([c.eval([t]) for t in row[50:]])]))
    assert runs[0].shape == (70, runs[0].shape[1]) and np.isfinite(runs[0]).all()
    assert np.array_equal(runs[0], runs[2]) and np.array_equal(runs[1], runs[3]) and np.array_equal(runs[0], runs[1])


def test_f16_override_matches_reference(native_lib, files):
    """--kv-bits f16 on a file without the key: the runtime's fp16 cache and the reference's fp16-rounded K and V
    agree within CPP_TOL (prefill and decode), and the rounding moves the reference's logits by far less than 8 bits."""
    native_lib.set_activations("f32")
    w = _windows(1)
    ref = _reference_logits(files["hd32-f32"], w, KVCacheSpec(16))[0]
    (prefill, decode), = _cpp_logits(files["hd32-f32"], w, kv_bits="f16")
    assert _rel(prefill, ref) < CPP_TOL and _rel(decode, ref) < CPP_TOL
    f32 = _reference_logits(files["hd32-f32"], w)[0]
    e8 = _rel(_reference_logits(files["hd32-f32"], w, KVCacheSpec(8))[0], f32)
    assert 0 < _rel(ref, f32) < e8 / 10


def test_quantization_error_within_bound_of_float_cache(files):
    w = _windows()
    for m in ("hd32", "hd40"):
        f32 = _reference_logits(files[f"{m}-f32"], w)
        e8 = _rel(_reference_logits(files[f"{m}-q8"], w), f32)
        e4 = _rel(_reference_logits(files[f"{m}-q4"], w), f32)
        assert 0 < e8 < KV8_BOUND and e4 < KV4_BOUND and STEP_RATIO[0] < e4 / e8 < STEP_RATIO[1], (m, e8, e4)


@pytest.mark.parametrize("act_bits,tol", [(8, KV_TOL), (4, 1e-1)])
def test_rotated_file_with_kv_cache(native_lib, tiny_model_factory, tmp_path, act_bits, tol):
    """--rotate / --act-bits together with a 4-bit KV cache: a version 2 file carries the key too, and the runtime
    matches the reference (A4: test_ruquant_runtime's tolerance and grid-boundary check, activation codes flip at grid
    boundaries too)."""
    from rotated_tiny import outlier_acts
    from test_ruquant_runtime import SHAPE, _plan as rotated_plan, assert_grid_close

    from wqedge.quantize import convert_to_gguf
    from wqedge.rotation import RotatedCheckpoint, build_transform, to_stored
    from wqedge.runtime.gguf_reader import WqGGUF
    ckpt = LlamaCheckpoint.open(tiny_model_factory(**SHAPE))
    s = ckpt.spec
    widths = (s.hidden_size, s.n_heads * s.head_dim, s.hidden_size, s.intermediate_size)
    transforms = {(li, gi): build_transform(outlier_acts(d, 10 * li + gi), seed=li * 16 + gi)
                  for li in range(s.n_layers) for gi, d in enumerate(widths)}
    plan = rotated_plan(ckpt, "q8", act_bits)
    plan.kv_cache = KVCacheSpec(4).to_plan()
    path = convert_to_gguf(RotatedCheckpoint(ckpt, transforms), plan.validate(), tmp_path / "rot-kv4.gguf",
                           transforms={k: to_stored(t) for k, t in transforms.items()})
    f = WqGGUF(path)
    assert f.format_version == 3 and f.kv_cache == KVCacheSpec(4)
    native_lib.set_activations("f32")
    w = _windows()
    got, ref = _cpp_logits(path, w), _reference_logits(path, w)
    if act_bits == 8:
        for (prefill, decode), lr in zip(got, ref):
            assert _rel(prefill, lr) < tol and _rel(decode, lr) < tol
    else:   # a value on a 4-bit grid boundary may take the neighbouring code: test_ruquant_runtime's check
        assert_grid_close([p for p, _ in got], ref, tol)
        assert_grid_close([d for _, d in got], ref, tol)


def _cpp_eval(path, text, *options) -> str:
    """`wqedge eval --backend cpp` of a test file on 2 windows of 32 tokens, with extra options; its output."""
    from click.testing import CliRunner

    from wqedge.cli import main
    r = CliRunner().invoke(main, ["eval", str(path), "--text", str(text), "--backend", "cpp", "--ctx", "32",
                                  "--chunks", "2", "--threads", "1", *options])
    assert r.exit_code == 0, r.output
    return r.output


def test_cli_inspect_and_eval_kv_bits(native_lib, files, tmp_path):
    from click.testing import CliRunner

    from wqedge.cli import main
    r = CliRunner().invoke(main, ["inspect", str(files["hd32-q4"])])
    assert r.exit_code == 0 and "KV cache (runtime default): 4-bit, rotation hadamard" in r.output, r.output
    r = CliRunner().invoke(main, ["inspect", str(files["hd32-f32"])])
    assert r.exit_code == 0 and "KV cache (runtime default): float32" in r.output
    text = tmp_path / "t.txt"
    text.write_text("the model layer weight and the cache " * 40)
    outs = {kv: _cpp_eval(files["hd32-f32"], text, "--kv-bits", kv) for kv in ("f32", "4")}
    assert outs["f32"] != outs["4"]  # the override reached the runtime
    r = CliRunner().invoke(main, ["eval", str(files["hd32-f32"]), "--text", str(text), "--kv-bits", "3"])
    assert r.exit_code != 0 and "--kv-bits" in r.output


def test_cli_kv_rotation(native_lib, files, tiny_model_dir, tmp_path):
    """--kv-rotation: convert writes it beside --kv-bits (and refuses it without a quantized cache); eval and run pass
    it to the runtime as an override of the file's setting; the torch reference needs --kv-bits with it."""
    from click.testing import CliRunner

    from wqedge.cli import main
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--kv-rotation", "none"])
    assert r.exit_code != 0 and "--kv-bits 8 or 4" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--kv-bits", "4",
                                  "--kv-rotation", "none"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "KV cache (runtime default): 4-bit, rotation none" in r.output, r.output
    text = tmp_path / "t.txt"
    text.write_text("the model layer weight and the cache " * 40)
    outs = {rot: _cpp_eval(files["hd32-q4"], text, "--kv-rotation", rot) for rot in ("hadamard", "none")}
    assert outs["hadamard"] != outs["none"]  # the override reached the runtime
    r = CliRunner().invoke(main, ["eval", str(files["hd32-q4"]), "--text", str(text), "--backend", "torch",
                                  "--kv-rotation", "none"])
    assert r.exit_code != 0 and "needs --kv-bits 8 or 4" in r.output
    r = CliRunner().invoke(main, ["run", str(files["hd32-q4"]), "--prompt", "the model", "-n", "4", "--threads", "1",
                                  "--kv-rotation", "none"])
    assert r.exit_code == 0, r.output


def test_cli_plan_kv_bits(native_lib, tiny_model_dir, tmp_path):
    """`wqedge plan --kv-bits/--kv-rotation` records the KV cache in the plan (kv_cache, version 3); `convert --plan`
    writes it into the file, and its own --kv-bits overrides the plan's; --kv-rotation alone is refused before any
    planning, with no plan written."""
    import json

    from click.testing import CliRunner

    from wqedge.cli import main
    plan = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["plan", str(tiny_model_dir), "-o", str(plan), "--preset", "q4", "--kv-rotation", "none"])
    assert r.exit_code != 0 and "--kv-bits 8 or 4" in r.output and not plan.exists()
    r = CliRunner().invoke(main, ["plan", str(tiny_model_dir), "-o", str(plan), "--preset", "q4", "--kv-bits", "4",
                                  "--kv-rotation", "none"])
    assert r.exit_code == 0, r.output
    d = json.loads(plan.read_text())
    assert d["version"] >= 3 and d["kv_cache"]["bits"] == 4 and d["kv_cache"]["rotation"] == "none", d.get("kv_cache")
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "--plan", str(plan), "-o", str(out), "--no-check"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "KV cache (runtime default): 4-bit, rotation none" in r.output, r.output
    out8 = tmp_path / "m8.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "--plan", str(plan), "-o", str(out8), "--no-check",
                                  "--kv-bits", "8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out8)])
    assert r.exit_code == 0 and "KV cache (runtime default): 8-bit, rotation hadamard" in r.output, r.output


def test_cli_convert_default_kv_cache(tiny_model_dir, tmp_path):
    """`wqedge convert` writes the fp16 cache (kv_format.DEFAULT_BITS) when neither --kv-bits nor the plan says; an
    explicit f32 (on convert, or recorded by `plan --kv-bits f32` as {"bits": null}) writes no keys and is not replaced
    by the default; a plan without the field gets the default at convert."""
    import json

    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.kv_format import DEFAULT_BITS
    from wqedge.runtime.gguf_reader import WqGGUF
    assert DEFAULT_BITS == 16

    def kv_of(*args):
        out = tmp_path / f"m{len(list(tmp_path.iterdir()))}.gguf"
        r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--no-check", *args])
        assert r.exit_code == 0, r.output
        return WqGGUF(out).kv_cache.bits

    assert kv_of("--preset", "q4") == 16
    first = sorted(tmp_path.glob("m*.gguf"))[0]
    r = CliRunner().invoke(main, ["inspect", str(first)])
    assert r.exit_code == 0 and "KV cache (runtime default): fp16 values (no rotation); " in r.output, r.output
    import gguf
    from wqedge.kv_format import KEY_BITS, KEY_ROTATION, KVCacheSpec
    fields = gguf.GGUFReader(str(first)).fields
    assert KEY_BITS in fields and KEY_ROTATION not in fields  # fp16 values are never rotated: no rotation key
    assert KVCacheSpec.from_plan({"bits": 16, "rotation": "hadamard"}).to_plan() == {"bits": 16}
    assert KVCacheSpec.from_plan({"bits": 8, "rotation": "none"}).to_plan() == {"bits": 8, "rotation": "none"}
    assert kv_of("--preset", "q4", "--kv-bits", "f32") is None
    assert kv_of("--preset", "q4", "--kv-bits", "8") == 8
    for flags, recorded, written in ((["--kv-bits", "f32"], {"bits": None}, None), ([], None, 16)):
        plan = tmp_path / f"p{len(flags)}.json"
        r = CliRunner().invoke(main, ["plan", str(tiny_model_dir), "-o", str(plan), "--preset", "q4", *flags])
        assert r.exit_code == 0, r.output
        assert json.loads(plan.read_text()).get("kv_cache") == recorded
        assert kv_of("--plan", str(plan)) == written


def test_cpp_avx512_attention_is_bit_identical(tiny_model_factory, tmp_path):
    """On a CPU with AVX-512 the AVX2 set's attention runs 512-bit kernels (kernels_avx512_att.cpp: values 16 columns a
    register, values and scores four query heads per pass, the quantized caches' too), built to give the AVX2 kernels'
    bits. End to end: prompt and decode
    logits with WQEDGE_AVX512_ATTENTION=1 and =0 (children: the switch is read once per process) are equal exactly,
    with the fp16 cache and the 8- and 4-bit caches read as stored, on a model whose KV groups hold 4 query heads
    (head_dim 64: the value kernels' 64 columns; 4 heads: the scores' 4-head pass) over 150 positions (three chunks of
    the cache). Skipped where the CPU has no AVX-512 or the library no AVX2 set."""
    import os
    import subprocess
    import sys
    from wqedge.quantize import convert_to_gguf
    from cpp_support import ensure_library
    ensure_library()
    ckpt = LlamaCheckpoint.open(tiny_model_factory(hidden=256, n_layers=2, n_heads=4, n_kv_heads=1, intermediate=352))
    files = {}
    for kv in (KVCacheSpec(16), KVCacheSpec(8), KVCacheSpec(4)):
        plan = _plan(ckpt)
        plan.kv_cache = kv.to_plan()
        files[kv.bits] = convert_to_gguf(ckpt, plan.validate(), tmp_path / f"kv{kv.bits}.gguf")
    row = np.random.default_rng(1).integers(0, 256, 150)
    np.save(tmp_path / "row.npy", row)
    code = ("import sys, numpy as np\n"
            "from wqedge.runtime import native\n"
            "print(native.system_info())\n"
            "row = np.load(sys.argv[1]).tolist()\n"
            "out = []\n"
            "for path in sys.argv[3:]:\n"
            "    c = native.Context(native.Model(path), n_ctx=160, n_threads=1)\n"
            "    first = c.eval(row[:100], all_logits=True)\n"
            "    out.append(np.concatenate([first, np.stack([c.eval([t]) for t in row[100:]])]))\n"
            "np.save(sys.argv[2], np.stack(out))\n")
    outs, infos = [], []
    for on in ("1", "0"):
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "row.npy"), str(tmp_path / f"out{on}.npy"),
                            *map(str, files.values())], env=dict(os.environ, WQEDGE_AVX512_ATTENTION=on),
                           capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
        infos.append(p.stdout)
        outs.append(np.load(tmp_path / f"out{on}.npy"))
    if "attention=avx512" not in infos[0]:
        pytest.skip(f"no AVX-512 attention on this CPU ({infos[0].strip()})")
    assert "attention=avx2" in infos[1], infos[1]
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0], outs[1])
