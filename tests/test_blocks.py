"""Block formats: packing round trips, the layouts docs/format.md promises, and exact bit costs."""
import itertools

import numpy as np
import pytest

from wqedge import blocks

RNG = np.random.default_rng(0)
CODED = [b for b in blocks.BLOCK_TYPES if b.pack is not None]


@pytest.mark.parametrize("bt", CODED, ids=lambda b: b.name)
@pytest.mark.parametrize("g_pad", [32, 96, 128, 256])
def test_pack_unpack_round_trip(bt, g_pad):
    q = RNG.integers(0, bt.levels, (7, g_pad)).astype(np.uint8)
    packed = bt.pack(q)
    assert packed.dtype == np.uint8 and packed.shape == (7, bt.code_bytes(g_pad))
    assert (bt.unpack(packed, g_pad) == q).all()


def test_q4_layout_is_ggml_q4_0():
    q = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    b = blocks.BY_NAME["q4"].pack(q)[0]
    assert all(b[j] & 0xF == q[0, j] and b[j] >> 4 == q[0, j + 16] for j in range(16))


def test_q2_and_q1_layouts():
    q = RNG.integers(0, 4, (1, 32)).astype(np.uint8)
    b = blocks.BY_NAME["q2"].pack(q)[0]
    assert all((b[j] >> (2 * k)) & 3 == q[0, 8 * k + j] for j in range(8) for k in range(4))
    bits = RNG.integers(0, 2, (1, 32)).astype(np.uint8)
    word = int(np.frombuffer(blocks.BY_NAME["q1"].pack(bits)[0].tobytes(), "<u4")[0])
    assert all((word >> j) & 1 == bits[0, j] for j in range(32))


def test_ternary_multiplicative_decode_is_exact_for_every_byte_value():
    # every combination of 5 trits packs into one byte and decodes with multiplications only
    combos = np.array(list(itertools.product(range(3), repeat=5)), dtype=np.int64)
    n = combos @ np.array([81, 27, 9, 3, 1])
    byte = (n * 256 + 242) // 243
    assert byte.max() <= 255
    for i, p3 in enumerate([1, 3, 9, 27, 81]):
        assert (((byte * p3) & 0xFF) * 3 >> 8 == combos[:, i]).all()


def test_ternary_padding_decodes_to_zero_weight():
    c = blocks.ChunkData("ternary", 100, codes=RNG.integers(0, 3, (3, 100)).astype(np.uint8),
                         d=np.ones(3, np.float16))
    packed = blocks.pack_chunk(c)
    gp = blocks.padded(100)
    t = blocks.BY_NAME["ternary"].unpack(packed[:, 2:], gp)
    assert (t[:, 100:] == 1).all()


@pytest.mark.parametrize("bt", blocks.BLOCK_TYPES, ids=lambda b: b.name)
def test_effective_bits_at_g128(bt):
    expect = {"fp16": 16, "q8": 8.25, "q4": 4.25, "q3": 3.25, "q2": 2.25, "ternary": 1.75, "q1": 1.25,
              "q4s": 4.625, "q3s": 3.625, "q2s": 2.625,
              "q4c": 4.125, "q3c": 3.125, "q2c": 2.125, "ternaryc": 1.6875, "q1c": 1.125}[bt.name]
    base = 16 if bt.compact else 0   # a compact chunk's fp16 scale base
    assert blocks.effective_bits(bt.name, 128) == expect + base / (4096 * 128)
    assert blocks.chunk_bits(bt.name, 10, 128, 2) == 80 * bt.row_bytes(128) + 10 * 2 * 16 + 2 * 16 + base


@pytest.mark.parametrize("action", ["q8", "q4", "q3", "q2", "q1"])
def test_affine_dequantization_and_protected_residuals(action):
    bt = blocks.BY_NAME[action]
    g = 100
    codes = RNG.integers(0, bt.levels, (4, g)).astype(np.uint8)
    d = RNG.normal(size=4).astype(np.float16)
    m = RNG.normal(size=4).astype(np.float16)
    prot = np.array([2, 99])
    res = RNG.normal(size=(4, 2)).astype(np.float16)
    c = blocks.ChunkData(action, g, codes=codes, d=d, m=m, protected=prot, residuals=res)
    w = blocks.unpack_chunk(blocks.pack_chunk(c), action, g, prot)
    expect = d.astype(np.float32)[:, None] * codes + m.astype(np.float32)[:, None]
    expect[:, prot] += res.astype(np.float32)
    np.testing.assert_array_equal(w, expect)


def test_fp16_chunk_is_stored_verbatim():
    v = RNG.normal(size=(3, 40)).astype(np.float16)
    c = blocks.ChunkData("fp16", 40, values=v)
    np.testing.assert_array_equal(blocks.unpack_chunk(blocks.pack_chunk(c), "fp16", 40), v.astype(np.float32))


def test_out_of_range_codes_and_unknown_types_rejected():
    with pytest.raises(ValueError, match="codes out of range"):
        blocks.pack_chunk(blocks.ChunkData("q2", 32, codes=np.full((1, 32), 4, np.uint8),
                                           d=np.ones(1, np.float16), m=np.zeros(1, np.float16)))
    with pytest.raises(ValueError, match="unknown block type 'q5'"):
        blocks.block_type("q5")
    with pytest.raises(ValueError, match="expected 8 bytes a row, got 21"):
        blocks.unpack_chunk(np.zeros((1, 21), np.uint8), "q1", 32)
