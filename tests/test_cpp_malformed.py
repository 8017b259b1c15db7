"""The C++ loader rejects malformed files with a clear error and never crashes or reads out of bounds.

Each case opens a damaged copy of a small valid model through the C API and expects a NativeError
with the right status and a message naming the problem. A crash would take the test process down.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ensure_library, patch_tensor_info, write_tiny  # noqa: E402

ensure_library()
from wqedge.runtime import _native, native  # noqa: E402
from wqedge.runtime._native import NativeError  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("m") / "good.gguf")


def _open(path) -> NativeError:
    with pytest.raises(NativeError) as ei:
        native.Model(path)
    return ei.value


def _variant(tmp_path, data: bytes | bytearray, name="bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def test_good_file_opens_and_runs(good):
    m = native.Model(good)
    assert m.info["n_layer"] == 2 and m.info["n_vocab"] == 96 and m.info["tied_embeddings"] == 0
    with native.Context(m, n_ctx=16, n_threads=1) as ctx:
        logits = ctx.eval([1, 5, 7], all_logits=True)
        assert logits.shape == (3, 96) and np.isfinite(logits).all()
        with pytest.raises(NativeError, match="outside the vocabulary") as ei:
            ctx.eval([96])
        assert ei.value.code == _native.ERR_INVALID_ARGUMENT
        with pytest.raises(NativeError, match="do not fit") as ei:
            ctx.eval(list(range(14)))
        assert ei.value.code == _native.ERR_CONTEXT_FULL
    with pytest.raises(NativeError) as ei:
        m.tokenize("hello")
    assert ei.value.code == _native.ERR_NO_TOKENIZER


def test_missing_file(tmp_path):
    e = _open(tmp_path / "nope.gguf")
    assert e.code == _native.ERR_IO and "cannot open" in str(e)


@pytest.mark.parametrize("frac", [0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated(good, tmp_path, frac):
    data = good.read_bytes()
    cut = int(len(data) * frac)
    e = _open(_variant(tmp_path, data[:cut]))
    assert e.code == _native.ERR_FORMAT
    assert any(s in str(e) for s in ("truncated", "past the end", "too small", "empty file", "cannot fit")), str(e)


def test_truncated_by_one_byte(good, tmp_path):
    import gguf
    # one byte short of the last tensor's data (the file may end in alignment padding after it)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(good).tensors)
    e = _open(_variant(tmp_path, good.read_bytes()[:end - 1]))
    assert e.code == _native.ERR_FORMAT and "past the end" in str(e)


def test_wrong_magic(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[:4] = b"GGML"
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "bad magic" in str(e)


def test_not_a_gguf_at_all(tmp_path):
    e = _open(_variant(tmp_path, b"hello world, this is a text file, not a model\n" * 10))
    assert e.code == _native.ERR_FORMAT and "magic" in str(e)


def test_offset_past_end(good, tmp_path):
    data = patch_tensor_info(bytearray(good.read_bytes()), "blk.1.ffn_down.weight", offset=1 << 40)
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "blk.1.ffn_down.weight" in str(e) and "past the end" in str(e)


def test_misaligned_offset(good, tmp_path):
    data = patch_tensor_info(bytearray(good.read_bytes()), "output_norm.weight", offset=3)
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "alignment" in str(e)


@pytest.mark.parametrize("dims", [(1 << 62, 1), (1 << 35, 1 << 35), (0, 96)])
def test_absurd_dimensions(good, tmp_path, dims):
    data = patch_tensor_info(bytearray(good.read_bytes()), "token_embd.weight", dims=dims)
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "token_embd.weight" in str(e)


def test_absurd_model_dimensions(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", key_overrides={"llama.embedding_length": 1 << 30}))
    assert e.code == _native.ERR_FORMAT and "embedding_length" in str(e)
    e = _open(write_tiny(tmp_path / "b.gguf", key_overrides={"llama.attention.head_count_kv": 3}))
    assert e.code == _native.ERR_FORMAT and "head_count_kv" in str(e)


def test_shape_mismatch(tmp_path):
    # the file says 64 columns, the tensor's rows are for another width
    e = _open(write_tiny(tmp_path / "a.gguf", key_overrides={"llama.feed_forward_length": 128}))
    assert e.code == _native.ERR_FORMAT and ("shape" in str(e) or "chunks" in str(e)), str(e)


def test_unknown_block_type(tmp_path):
    # an id past the traits table (ids 7-9 are the two-level kinds now)
    e = _open(write_tiny(tmp_path / "a.gguf", key_overrides={"wqedge.tensors.blk.0.attn_k.weight.chunk_actions": [99]}))
    assert e.code == _native.ERR_FORMAT and "unknown block type 99" in str(e) and "blk.0.attn_k.weight" in str(e)


def test_wrong_chunk_count(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", key_overrides={"wqedge.tensors.blk.0.attn_k.weight.chunk_actions": [1, 1]}))
    assert e.code == _native.ERR_FORMAT and "chunk_actions" in str(e)


def test_protected_index_out_of_chunk(tmp_path):
    name = "blk.0.ffn_up.weight.protect"
    bad = np.asarray([70, 3], np.uint16).view(np.int16)  # 70 lies outside chunk 0 = [0, 64)
    e = _open(write_tiny(tmp_path / "a.gguf", tensor_overrides={name: bad}))
    assert e.code == _native.ERR_FORMAT and ".protect" in str(e)


def test_missing_protect_tensor(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", tensor_overrides={"blk.0.ffn_up.weight.protect": None}))
    assert e.code == _native.ERR_FORMAT and "missing" in str(e)


def test_wrong_tensor_type(good, tmp_path):
    data = patch_tensor_info(bytearray(good.read_bytes()), "blk.0.attn_norm.weight", type_=1)  # F16 label on F32 data
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "blk.0.attn_norm.weight" in str(e)


def test_unknown_ggml_type(good, tmp_path):
    data = patch_tensor_info(bytearray(good.read_bytes()), "blk.0.attn_q.weight", type_=200)
    e = _open(_variant(tmp_path, data))
    assert e.code == _native.ERR_FORMAT and "unsupported ggml type 200" in str(e)


def test_missing_key_and_tensor(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", drop_keys=("llama.block_count",)))
    assert e.code == _native.ERR_FORMAT and "llama.block_count" in str(e)
    e = _open(write_tiny(tmp_path / "b.gguf", tensor_overrides={"blk.1.ffn_norm.weight": None}))
    assert e.code == _native.ERR_FORMAT and "blk.1.ffn_norm.weight" in str(e)
    e = _open(write_tiny(tmp_path / "c.gguf", drop_keys=("wqedge.format_version",)))
    assert e.code == _native.ERR_FORMAT and "not a wqedge file" in str(e) and "llama.cpp" in str(e)


def test_wrong_key_type(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", drop_keys=("llama.block_count",), key_overrides={"llama.block_count": "two"}))
    assert e.code == _native.ERR_FORMAT and "llama.block_count" in str(e)


def test_unsupported_version(tmp_path):
    e = _open(write_tiny(tmp_path / "a.gguf", key_overrides={"wqedge.format_version": 5}))  # 2, 3: RUQuant, 4: compact
    assert e.code == _native.ERR_UNSUPPORTED and "format version 5" in str(e)


def test_random_corruption_never_crashes(good, tmp_path):
    """Flip bytes in the header/metadata region: every result is a clean open or a clean error."""
    data = good.read_bytes()
    header_end = data.find(b"GGUF") + 4
    meta = max(header_end, min(len(data), 6000))
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(150):
        b = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(4, meta))
            b[pos] = int(rng.integers(0, 256))
        p = _variant(tmp_path, b, f"c{i % 4}.gguf")
        try:
            m = native.Model(p)
            with native.Context(m, n_ctx=8, n_threads=1) as ctx:
                ctx.eval([1, 2])
            outcomes["ok"] += 1
        except NativeError as e:
            assert e.code in (_native.ERR_FORMAT, _native.ERR_UNSUPPORTED, _native.ERR_OUT_OF_MEMORY,
                              _native.ERR_INVALID_ARGUMENT), str(e)
            assert str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_compact_scale_bases_are_checked(good, tmp_path):
    """A linear with compact-header chunks needs its .scale_base tensor: missing, of the wrong length or negative is
    a format error naming it (docs/format.md, "Compact row headers")."""
    import gguf

    from wqedge import blocks
    names = [t.name for t in gguf.GGUFReader(good).tensors if t.name.endswith(blocks.SCALE_BASE)]
    assert names, "the tiny model should hold compact chunks"
    name = names[0]
    e = _open(write_tiny(tmp_path / "a.gguf", tensor_overrides={name: None}))
    assert e.code == _native.ERR_FORMAT and name in str(e) and "missing" in str(e)
    n = int(next(t for t in gguf.GGUFReader(good).tensors if t.name == name).n_elements)
    e = _open(write_tiny(tmp_path / "b.gguf", tensor_overrides={name: np.ones(n + 1, np.float16)}))
    assert e.code == _native.ERR_FORMAT and name in str(e)
    e = _open(write_tiny(tmp_path / "c.gguf", tensor_overrides={name: -np.ones(n, np.float16)}))
    assert e.code == _native.ERR_FORMAT and name in str(e) and ">= 0" in str(e)
