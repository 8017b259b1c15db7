"""Compact row headers (q4c, q3c, q2c, ternaryc, q1c; docs/format.md "Compact row headers").

- the header grid: d within half a step (2^(1/64)) of any value in the 8 octaves below the scale base, m within
  half of its 256 steps, and encode(snap(...)) is exact; values off the grid are refused, not silently moved;
- the fp16 d and m the C++ loader computes from every (e, z) pair equal numpy's, bit for bit (wqe_test_compact_params);
- fitted compact chunks (fit_chunk, error feedback with its refit) lie on their grid and pack; they cost their
  base kind's reconstruction error within a few percent, for 16 bits a row less;
- a compact chunk and `expanded(c)` (its base kind) hold the same weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wqedge import blocks
from wqedge.quant.fit import dequantize_chunk, fit_chunk

sys.path.insert(0, str(Path(__file__).resolve().parent))

COMPACT = [b for b in blocks.BLOCK_TYPES if b.compact]
RNG = np.random.default_rng(0)
HALF_STEP = 2 ** (1 / (2 * blocks.COMPACT_STEPS)) - 1        # 2.2%: half a scale step, relative


def test_table_and_the_kinds():
    assert [b.name for b in COMPACT] == ["q4c", "q3c", "q2c", "ternaryc", "q1c"]
    for b in COMPACT:
        base = blocks.block_type(b.base)
        assert (b.kind, b.levels, b.nominal_bits, b.zero_code) == (base.kind, base.levels, base.nominal_bits, base.zero_code)
        assert b.header_bytes * 2 == base.header_bytes and b.offered and not base.offered
    S = blocks.COMPACT_STEPS
    want = np.array([2.0 ** (-i / S) for i in range(S)]).astype(np.float32)
    np.testing.assert_array_equal(blocks.COMPACT_FRAC, want)


@pytest.mark.parametrize("bt", COMPACT, ids=lambda b: b.name)
def test_decode_is_the_documented_formula(bt):
    base = np.float16(0.0371)
    e = np.arange(256).astype(np.uint8)
    z = RNG.integers(0, 256, 256).astype(np.uint8)
    d, m = blocks.compact_decode(bt, e, z if bt.has_offset else None, base)
    ref = (np.float64(base) * 2.0 ** (-e.astype(np.float64) / blocks.COMPACT_STEPS)).astype(np.float32).astype(np.float16)
    ref[255] = 0
    np.testing.assert_array_equal(d, ref)
    dd = np.diff(d[:255].astype(np.float32))
    assert np.all(dd <= 0) and np.all(dd[d[1:255] >= np.finfo(np.float16).tiny] < 0)   # fp16 subnormals merge steps
    if bt.has_offset:
        mref = (-(d.astype(np.float64) * z * (bt.levels - 1) / 255)).astype(np.float32).astype(np.float16)
        np.testing.assert_array_equal(m, mref)
    else:
        assert m is None


@pytest.mark.parametrize("bt", COMPACT, ids=lambda b: b.name)
def test_snap_error_bounds_and_round_trip(bt):
    n = 2000
    d = (np.exp(RNG.uniform(np.log(0.5 / 200), np.log(0.5), n))).astype(np.float32)   # inside the 8 octaves
    # offsets inside the grid's range [-(L - 1) d', 0] (the snapped d' is at most 2.2% below d)
    m = (-d * RNG.uniform(0, 0.97 * (bt.levels - 1), n)).astype(np.float32) if bt.has_offset else None
    base, d2, m2 = blocks.compact_snap(bt, d, m)
    assert base == float(np.float16(d.max()))
    rel = np.abs(d2.astype(np.float32) / d - 1)
    assert rel.max() <= HALF_STEP + 2e-3, rel.max()              # + fp16's own rounding
    if bt.has_offset:
        step = d2.astype(np.float32) * (bt.levels - 1) / 255
        assert np.all(np.abs(m2.astype(np.float32) - m) <= step / 2 + 2e-3 * np.abs(m) + 1e-7)
    e, z = blocks.compact_encode(bt, d2.astype(np.float32), None if m2 is None else m2.astype(np.float32), base)
    d3, m3 = blocks.compact_decode(bt, e, z, base)
    np.testing.assert_array_equal(d3, d2)
    if bt.has_offset:
        np.testing.assert_array_equal(m3, m2)


def test_off_grid_values_and_missing_bases_are_refused():
    bt = blocks.block_type("q2c")
    c = blocks.ChunkData("q2c", 32, codes=np.zeros((2, 32), np.uint8), d=np.array([0.01, 0.02], np.float32),
                         m=np.array([-0.01, -0.02], np.float32), base=0.02)
    with pytest.raises(ValueError, match="not on the compact grid"):
        blocks.pack_chunk(c)
    c.base = None
    with pytest.raises(ValueError, match="scale base"):
        blocks.pack_chunk(c)
    _, c.d, c.m = blocks.compact_snap(bt, c.d, c.m, base=0.02)
    c.base = 0.02
    raw = blocks.pack_chunk(c)
    with pytest.raises(ValueError, match="scale base"):
        blocks.decode_chunk(raw, "q2c", 32)


def _weights(n, g, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, g, generator=gen) * torch.rand(n, 1, generator=gen).mul(3).exp() * 0.02
    return w


@pytest.mark.parametrize("bt", COMPACT, ids=lambda b: b.name)
def test_fitted_chunks_are_on_the_grid_and_cost_little(bt):
    w = _weights(96, 128, seed=1)
    h = torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.1
    for method in ("neuqi", "minmax"):
        c = fit_chunk(w, bt.name, method, h, protected=[3, 77])
        ref = fit_chunk(w, bt.base, method, h, protected=[3, 77])
        raw = blocks.pack_chunk(c)                                   # on the grid, or pack would refuse
        assert raw.shape[1] == bt.row_bytes(128, 2)
        back = blocks.unpack_chunk(raw, bt.name, 128, c.protected, c.base)
        np.testing.assert_array_equal(back, dequantize_chunk(c).numpy())
        err = float(((dequantize_chunk(c) - w).square() * h).sum())
        err_ref = float(((dequantize_chunk(ref) - w).square() * h).sum())
        assert err <= 1.05 * err_ref, (bt.name, method, err / err_ref)
        # the base kind reads the same weights
        x = blocks.expanded(c)
        assert x.action == bt.base
        np.testing.assert_array_equal(blocks.unpack_chunk(blocks.pack_chunk(x), bt.base, 128, x.protected), back)


def test_error_feedback_and_refit_keep_compact_chunks_on_their_grid():
    from wqedge.quant.gptq import gptq_linear

    w = _weights(64, 384, seed=3)
    x = torch.randn(512, 384, generator=torch.Generator().manual_seed(4))
    xtx = x.T @ x
    actions = ["q2c", "ternaryc", "q1c"]
    chunks = gptq_linear(w, xtx, actions, 128, refit=True)
    for c, a in zip(chunks, actions):
        assert c.action == a and c.base is not None
        blocks.pack_chunk(c)                                         # raises when d or m left the grid


def test_cpp_loader_computes_the_same_parameters():
    from cpp_support import ensure_library

    ensure_library()
    from wqedge.runtime import _native

    lib = _native.lib()
    if not hasattr(lib, "wqe_test_compact_params"):
        pytest.skip("library without wqe_test_compact_params")
    import ctypes as C

    for bt in COMPACT:
        e, z = (a.reshape(-1).astype(np.uint8) for a in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
        hdr = np.ascontiguousarray(np.stack([e, z], 1) if bt.has_offset else e[:, None])
        for base in (np.float16(6.1e-5), np.float16(0.0371), np.float16(3.5), np.float16(0)):
            n = len(e)
            d, m = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
            rc = lib.wqe_test_compact_params(bt.code, hdr.ctypes.data_as(C.POINTER(C.c_uint8)), n,
                                             int(base.view(np.uint16)), d.ctypes.data_as(C.POINTER(C.c_uint16)),
                                             m.ctypes.data_as(C.POINTER(C.c_uint16)))
            assert rc == 0
            dr, mr = blocks.compact_decode(bt, e, z if bt.has_offset else None, base)
            np.testing.assert_array_equal(d, dr.view(np.uint16), err_msg=f"{bt.name} base {base}")
            if bt.has_offset:
                np.testing.assert_array_equal(m, mr.view(np.uint16), err_msg=f"{bt.name} base {base}")


@pytest.mark.parametrize("compact", [True, False])
def test_convert_offers_compact_kinds_unless_told_not_to(tiny_model_dir, tmp_path, compact):
    """The greedy plan (self-calibrated) takes compact kinds by default and writes format 4 with the scale bases;
    --no-compact-headers gives the fp16-header kinds and a format 1 file; both meet the budget as measured."""
    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.runtime.gguf_reader import WqGGUF

    out = tmp_path / "m.gguf"
    args = ["convert", str(tiny_model_dir), "-o", str(out), "--bits", "2.5", "--allocator", "greedy", "--no-distill"]
    res = CliRunner().invoke(main, args + ([] if compact else ["--no-compact-headers"]))
    assert res.exit_code == 0, res.output
    f = WqGGUF(out)
    kinds = {a for n in f.linear_names() for a in f.layout(n).actions}
    assert any(blocks.block_type(a).compact for a in kinds) == compact, kinds
    assert f.format_version == (blocks.COMPACT_FORMAT_VERSION if compact else 1)
    assert f.measured_bits() <= 2.5 + 1e-9
    with_bases = {n for n in f.linear_names() if n + blocks.SCALE_BASE in f.tensors}
    assert with_bases == {n for n in f.linear_names() if any(blocks.block_type(a).compact for a in f.layout(n).actions)}
