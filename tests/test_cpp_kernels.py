"""C++ kernels vs the numpy reference semantics (wqedge.blocks), through the ctypes binding.

- the scalar dequantization equals blocks.unpack_chunk bit for bit, and so does the AVX2 one;
- each dot product (scalar and AVX2) equals unpack_chunk(...) @ x within 1e-5 of the magnitude of
  its terms, on random and adversarial chunks (extreme scales, zero rows, subnormal scales, ragged
  widths such as g = 100, protected columns);
- int8 activations (act="q8"): each int8 kernel (scalar and AVX2) equals a numpy model of the same
  computation (activations quantized per 32 slots exactly as prepare_x8 does, then codes . x^ in float64)
  within 1e-5 of the magnitude of its terms, and differs from the float dot by at most the quantization
  bound sum_c |d code_c| d_b / 2 (plus that rounding tolerance);
- the C++ test executable (every AVX2 kernel vs its scalar twin, threaded matvec/matmul) passes; it is
  taken from the directory of $WQEDGE_LIB when that holds one (the build under test), else cpp/build.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wqedge.blocks import ACTION_NAMES, BLOCK_TYPES, ChunkData, block_type, pack_chunk, unpack_chunk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ensure_library, ensure_test_executable  # noqa: E402

ensure_library()
from wqedge.runtime import native  # noqa: E402

HAS_AVX2 = "avx2+fma+f16c=1" in native.system_info()
# one-scale kinds; the two-level kinds (q4s, q3s, q2s) have their own kernel tests in test_subscale.py, and the
# compact-header kinds never reach a kernel (the loader expands them into their base kinds: test_compact.py)
ACTIONS = tuple(a for a in ACTION_NAMES if not block_type(a).has_subscales and not block_type(a).compact)
KERNELS = ["scalar"] + (["avx2"] if HAS_AVX2 else [])


def make_chunk(action: str, g: int, n_rows: int, n_prot: int, mode: str, rng: np.random.Generator) -> ChunkData:
    bt = block_type(action)
    prot = np.sort(rng.choice(g, size=n_prot, replace=False)) if n_prot else None
    res = None
    if n_prot:
        res = rng.uniform(-0.5, 0.5, (n_rows, n_prot)).astype(np.float16)
        if mode == "extreme":
            res[:] = np.float16(-65504)
    if action == "fp16":
        vals = rng.standard_normal((n_rows, g)).astype(np.float16)
        if mode == "extreme":
            vals = (np.sign(vals) * 65504).astype(np.float16)
        if mode == "zero":
            vals[:] = 0
        return ChunkData(action, g, values=vals, protected=prot, residuals=res)
    codes = rng.integers(0, bt.levels, (n_rows, g)).astype(np.uint8)
    d = rng.uniform(1e-3, 0.1, n_rows).astype(np.float16)
    m = (rng.uniform(-1, 1, n_rows) * d.astype(np.float32) * 8).astype(np.float16)
    if mode == "extreme":
        d[:] = np.float16(65504)
        m[:] = np.float16(-65504)
        codes[0] = bt.levels - 1
        codes[1] = 0
    elif mode == "tiny":
        d[:] = np.float16(6e-8)  # subnormal
        m[:] = np.float16(-6e-8)
    elif mode == "zero":
        codes[:] = 0 if bt.is_affine else 1
        d[:] = 0
        m[:] = 0
    return ChunkData(action, g, codes=codes, d=d, m=m if bt.is_affine else None, protected=prot, residuals=res)


CASES = [(a, g, p, mode) for a in ACTIONS for g in (32, 100, 128, 17, 256, 1)
         for p in (0, 3) for mode in ("random", "extreme", "zero", "tiny") if p <= g]


@pytest.mark.parametrize("action", ACTIONS)
def test_dequant_matches_unpack_chunk(action):
    rng = np.random.default_rng(hash(action) % 2**32)
    for _, g, p, mode in [c for c in CASES if c[0] == action]:
        chunk = make_chunk(action, g, 9, p, mode, rng)
        rb = pack_chunk(chunk)
        ref = unpack_chunk(rb, action, g, chunk.protected)
        for k in KERNELS:
            w = native.chunk_dequant(block_type(action).code, g, chunk.protected, rb, kernels=k)
            assert np.array_equal(w.view(np.uint32), ref.view(np.uint32)), (action, g, p, mode, k)


def _tolerance(ref_w: np.ndarray, x: np.ndarray, chunk: ChunkData) -> np.ndarray:
    """1e-5 of the magnitude of the terms each kernel adds (|w x| and, affine, |m x| + |d q x|)."""
    mag = np.abs(ref_w.astype(np.float64)) @ np.abs(x.astype(np.float64))
    if chunk.d is not None:
        scale = np.abs(chunk.d.astype(np.float64))
        if chunk.m is not None:
            scale = scale + 2 * np.abs(chunk.m.astype(np.float64))
        mag = mag + scale * np.abs(x.astype(np.float64)).sum() * (block_type(chunk.action).levels or 1)
    return 1e-5 * mag + 1e-30


@pytest.mark.parametrize("action", ACTIONS)
def test_dot_matches_numpy(action):
    rng = np.random.default_rng(7 + ACTION_NAMES.index(action))
    for _, g, p, mode in [c for c in CASES if c[0] == action]:
        chunk = make_chunk(action, g, 13, p, mode, rng)
        rb = pack_chunk(chunk)
        w = unpack_chunk(rb, action, g, chunk.protected)
        x = rng.standard_normal(g).astype(np.float32) * (1e3 if mode == "extreme" else 1.0)
        ref = w.astype(np.float64) @ x.astype(np.float64)
        tol = _tolerance(w, x, chunk)
        ys = {}
        for k in KERNELS:
            ys[k] = native.chunk_matvec(block_type(action).code, g, chunk.protected, rb, x, kernels=k).astype(np.float64)
            assert np.all(np.abs(ys[k] - ref) <= tol), (action, g, p, mode, k, np.max(np.abs(ys[k] - ref) / tol))
        if HAS_AVX2:
            assert np.all(np.abs(ys["avx2"] - ys["scalar"]) <= tol), (action, g, p, mode)


def _quantize_blocks(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prepare_x8's block quantizer: v float32[n_blocks, 32] -> (d float32[n_blocks], q int[n_blocks, 32])."""
    amax = np.abs(v).max(1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(v * inv[:, None]), -127, 127).astype(np.int64)  # float32 product, ties to even
    return d, q


def _x_hat(action: str, g: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the int8 activation as the kernels see it (d_b * q, float64) and its block's d."""
    g_pad = (g + 31) // 32 * 32
    if action == "ternary":
        B = 2 * ((g_pad + 9) // 10)
        nb = (B + 31) // 32
        planes = np.zeros((5, nb * 32), np.float32)
        for c in range(g):
            planes[c // B, c % B] = x[c]
        d, q = _quantize_blocks(planes.reshape(5 * nb, 32))
        col = np.arange(g)
        blk = (col // B) * nb + (col % B) // 32
        return d[blk].astype(np.float64) * q[blk, (col % B) % 32], d[blk].astype(np.float64)
    xp = np.zeros(g_pad, np.float32)
    xp[:g] = x
    d, q = _quantize_blocks(xp.reshape(-1, 32))
    col = np.arange(g)
    return (d[col // 32].astype(np.float64) * q.reshape(-1)[:g]), d[col // 32].astype(np.float64)


@pytest.mark.parametrize("action", [a for a in ACTIONS if a != "fp16"])
def test_q8_dot_matches_numpy_model(action):
    rng = np.random.default_rng(70 + ACTION_NAMES.index(action))
    bt = block_type(action)
    for _, g, p, mode in [c for c in CASES if c[0] == action]:
        chunk = make_chunk(action, g, 13, p, mode, rng)
        rb = pack_chunk(chunk)
        x = rng.standard_normal(g).astype(np.float32) * (1e3 if mode == "extreme" else 1.0)
        if g > 40:
            x[37] *= 50  # an outlier coarsens its block
        xh, db = _x_hat(action, g, x)
        codes = chunk.codes.astype(np.float64)
        d = chunk.d.astype(np.float64)
        xs = float(x.astype(np.float64).sum())
        if bt.is_affine:
            model = d * (codes @ xh) + chunk.m.astype(np.float64) * xs
            mag = np.abs(d) * (np.abs(codes) @ (np.abs(xh) + np.abs(x))) + np.abs(chunk.m.astype(np.float64)) * np.abs(x).sum()
        else:
            model = d * (codes @ xh - xs)
            mag = np.abs(d) * (np.abs(codes) @ (np.abs(xh) + np.abs(x)) + np.abs(x).sum())
        res = 0.0
        if p:
            r = chunk.residuals.astype(np.float64)
            res = r @ x[chunk.protected].astype(np.float64)
            mag = mag + np.abs(r) @ np.abs(x[chunk.protected]).astype(np.float64)
        model = model + res
        tol = 1e-5 * mag + 1e-30
        bound = np.abs(d) * (np.abs(codes) @ (db / 2))
        yf = native.chunk_matvec(bt.code, g, chunk.protected, rb, x, kernels="scalar").astype(np.float64)
        for k in KERNELS:
            y = native.chunk_matvec(bt.code, g, chunk.protected, rb, x, kernels=k, act="q8").astype(np.float64)
            assert np.all(np.abs(y - model) <= tol), (action, g, p, mode, k, np.max(np.abs(y - model) / tol))
            assert np.all(np.abs(y - yf) <= bound * 1.0001 + 2 * tol), (action, g, p, mode, k)


def test_q8_leaves_fp16_float():
    rng = np.random.default_rng(3)
    chunk = make_chunk("fp16", 100, 5, 3, "random", rng)
    rb = pack_chunk(chunk)
    x = rng.standard_normal(100).astype(np.float32)
    for k in KERNELS:
        a = native.chunk_matvec(0, 100, chunk.protected, rb, x, kernels=k, act="q8")
        b = native.chunk_matvec(0, 100, chunk.protected, rb, x, kernels=k, act="f32")
        assert np.array_equal(a, b)


def test_row_bytes_match_python():
    for bt in BLOCK_TYPES:
        for g in (1, 17, 32, 100, 128, 256, 4096):
            for p in (0, 5):
                assert native.row_bytes(bt.code, g, p) == bt.row_bytes(g, p)
    assert native.row_bytes(len(BLOCK_TYPES), 128, 0) == -1


def test_unknown_action_and_bad_arguments_are_errors():
    rb = np.zeros((2, 68), np.uint8)
    with pytest.raises(native.NativeError, match="unknown block type"):
        native.chunk_matvec(len(BLOCK_TYPES), 128, None, rb, np.zeros(128, np.float32))
    with pytest.raises(native.NativeError, match="row stride"):
        native.chunk_matvec(1, 128, None, rb[:, :10], np.zeros(128, np.float32))
    with pytest.raises(native.NativeError, match="protected column"):
        native.chunk_matvec(1, 128, [5, 3], np.zeros((2, 136), np.uint8), np.zeros(128, np.float32))


@pytest.mark.parametrize("name", ["test_kernels", "test_gguf"])
def test_cpp_test_executable(name):
    """The C++ tests: AVX2 vs scalar on every primitive and threaded products (test_kernels); malformed files
    rejected with clear errors, every prefix truncation included (test_gguf)."""
    lib = os.environ.get("WQEDGE_LIB")
    exe = Path(lib).parent / name if lib and (Path(lib).parent / name).is_file() else ensure_test_executable(name)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " 0 failed" in r.stdout


def test_runtime_binding_imports_no_torch():
    code = ("import sys; from wqedge.runtime import native; native.system_info(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
