"""GGUF writer and reader: stock readers list every tensor, bits match, writes are atomic."""
import dataclasses

import gguf
import numpy as np
import pytest

from wqedge import blocks
from wqedge.alloc.uniform import uniform_plan
from wqedge.converters.gguf_writer import dense_tensors, write_gguf
from wqedge.converters.tokenizer import read_tokenizer
from wqedge.runtime.gguf_reader import FormatError, WqGGUF
from wqedge.spec import ModelSpec, other_tensors
from wqedge.units import chunk_bounds

# hidden 96 with G=64 gives a ragged last chunk of 32; ffn 72 a ragged chunk of 8 (padded to 32)
SPEC = ModelSpec(hidden_size=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, intermediate_size=72,
                 vocab_size=512, name="synthetic")
G = 64


def random_chunk(action, n, g, rng, protected=()):
    bt = blocks.block_type(action)
    prot = np.array(protected, dtype=np.int64) if len(protected) else None
    res = rng.normal(size=(n, len(protected))).astype(np.float16) if len(protected) else None
    if action == "fp16":
        return blocks.ChunkData(action, g, values=rng.normal(size=(n, g)).astype(np.float16), protected=prot, residuals=res)
    c = blocks.ChunkData(action, g, codes=rng.integers(0, bt.levels, (n, g)).astype(np.uint8),
                         d=rng.normal(size=n).astype(np.float16), m=rng.normal(size=n).astype(np.float16),
                         protected=prot, residuals=res)
    if bt.has_subscales:
        k = blocks.n_sub(blocks.padded(g))
        c.sc, c.mn = (rng.integers(0, blocks.SUB_LEVELS, (n, k)).astype(np.uint8) for _ in range(2))
    if bt.compact:   # random header codes under a random scale base
        c.base = float(np.float16(rng.uniform(0.01, 1.0)))
        e = rng.integers(0, 256, n).astype(np.uint8)
        z = rng.integers(0, 256, n).astype(np.uint8) if bt.has_offset else None
        c.d, c.m = blocks.compact_decode(bt, e, z, c.base)
    return c


def mixed_plan(spec=SPEC):
    plan = uniform_plan(spec.linears(), G, 16.0)
    for i, t in enumerate(plan.tensors):
        t.actions = [blocks.ACTION_NAMES[(i + c) % len(blocks.ACTION_NAMES)] for c in range(len(t.actions))]
        if i % 3 == 0:
            t.protected[-1] = [0, 5] if t.widths(G)[-1] > 5 else [0]
    plan.validate(spec)
    return plan


def write(path, tokenizer, spec=SPEC, plan=None, fail_after=None, seed=0):
    plan = plan or mixed_plan(spec)
    rng = np.random.default_rng(seed)
    dense_arrays = {name: rng.normal(size=shape).astype(np.float32) for _, name, shape in other_tensors(spec)}
    chunks = {}

    def quantized():
        for k, lin in enumerate(spec.linears()):
            if fail_after is not None and k == fail_after:
                raise RuntimeError("simulated failure")
            t = plan.tensor(lin.hf_name)
            cs = [random_chunk(a, lin.out_features, e - s, rng, p)
                  for (s, e), a, p in zip(chunk_bounds(lin.in_features, G), t.actions, t.protected)]
            chunks[lin.gguf_name] = cs
            yield lin, cs

    dense = dense_tensors(spec, lambda hf: np.dtype(np.float16))
    write_gguf(path, spec, plan, tokenizer, dense, dense_arrays.__getitem__, quantized())
    return plan, dense_arrays, chunks


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return read_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    plan, dense, chunks = write(path, tokenizer)
    return path, plan, dense, chunks


def test_stock_reader_lists_every_tensor(written):
    path, plan, _, _ = written
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    expect = {n for _, n, _ in other_tensors(SPEC)} | {lin.gguf_name for lin in SPEC.linears()}
    expect |= {plan_t for plan_t in (lin.gguf_name + ".protect" for i, lin in enumerate(SPEC.linears()) if i % 3 == 0)}
    expect |= {lin.gguf_name + blocks.SCALE_BASE for lin in SPEC.linears()
               if any(blocks.block_type(a).compact for a in plan.tensor(lin.hf_name).actions)}
    assert any(n.endswith(blocks.SCALE_BASE) for n in expect)
    assert names == expect
    for t in r.tensors:
        assert t.data_offset % 32 == 0
        if t.name.endswith(".weight") and t.name.startswith("blk.") and "norm" not in t.name:
            assert t.tensor_type == gguf.GGMLQuantizationType.I8
    assert r.fields["general.architecture"].contents() == "llama"


def test_dequantized_weights_equal_the_chunks(written):
    path, plan, dense, chunks = written
    f = WqGGUF(path)
    for lin in SPEC.linears():
        w = f.dequantize_linear(lin.gguf_name)
        assert w.shape == (lin.out_features, lin.in_features)
        for (s, e), c in zip(chunk_bounds(lin.in_features, G), chunks[lin.gguf_name]):
            expect = blocks.unpack_chunk(blocks.pack_chunk(c), c.action, c.g, c.protected, c.base)
            np.testing.assert_array_equal(w[:, s:e], expect)
    for _, name, _ in other_tensors(SPEC):
        want = dense[name].astype(np.float32 if dense[name].ndim == 1 else np.float16).astype(np.float32)
        np.testing.assert_array_equal(f.dense(name), want)


def test_effective_bits_equal_file_measured_bits(written):
    path, plan, _, _ = written
    f = WqGGUF(path)
    assert f.measured_bits() == pytest.approx(plan.effective_bits(), rel=1e-12)
    assert f.effective_bits == pytest.approx(plan.effective_bits(), rel=1e-6)
    # and directly from the stock reader's byte counts
    r = gguf.GGUFReader(path)
    lin_names = {lin.gguf_name for lin in SPEC.linears()}
    nbytes = sum(int(t.n_bytes) for t in r.tensors if t.name in lin_names or t.name.removesuffix(".protect") in lin_names)
    n_weights = sum(lin.out_features * lin.in_features for lin in SPEC.linears())
    assert 8 * nbytes / n_weights == pytest.approx(plan.effective_bits(), rel=1e-3)


def test_spec_and_tokenizer_round_trip(written, tokenizer):
    path, plan, _, _ = written
    f = WqGGUF(path)
    # GGUF keeps eps as f32
    assert f.spec.to_dict() == SPEC.to_dict() | {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                                  "rms_norm_eps": float(np.float32(SPEC.rms_norm_eps))}
    tf = f.tokenizer_fields()
    assert tf["model"] == "llama"
    assert list(tf["tokens"]) == tokenizer.tokens
    assert f.group_size == G
    assert f.layout("blk.0.attn_q.weight").actions == plan.tensors[0].actions


def test_tied_embeddings_and_llama3_rope_round_trip(tmp_path, tokenizer):
    spec = dataclasses.replace(SPEC, tie_word_embeddings=True, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    write(tmp_path / "t.gguf", tokenizer, spec=spec)
    f = WqGGUF(tmp_path / "t.gguf")
    assert f.spec.tie_word_embeddings and "output.weight" not in f.tensors
    assert f.spec.rope_scaling == spec.rope_scaling
    factors = f.dense("rope_freqs.weight")
    assert factors.shape == (spec.head_dim // 2,) and factors[0] == 1.0 and factors[-1] == 8.0


def test_interrupted_write_leaves_nothing(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="simulated failure"):
        write(out / "m.gguf", tokenizer, fail_after=5)
    assert list(out.iterdir()) == []


def test_chunk_not_matching_plan_is_rejected(tmp_path, tokenizer):
    plan = mixed_plan()
    wrong = mixed_plan()
    wrong.tensors[0].actions = ["q8"] * len(wrong.tensors[0].actions)
    with pytest.raises(ValueError, match="plan says"):
        rng = np.random.default_rng(0)
        dense = dense_tensors(SPEC, lambda hf: np.dtype(np.float16))
        arrays = {n: rng.normal(size=s) for _, n, s in other_tensors(SPEC)}

        def quantized():
            for lin in SPEC.linears():
                t = wrong.tensor(lin.hf_name)
                yield lin, [random_chunk(a, lin.out_features, e - s, rng, p)
                            for (s, e), a, p in zip(chunk_bounds(lin.in_features, G), t.actions, t.protected)]
        write_gguf(tmp_path / "x.gguf", SPEC, plan, tokenizer, dense, arrays.__getitem__, quantized())
    assert not (tmp_path / "x.gguf").exists()


def test_reader_rejects_non_wqedge_and_garbage(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(FormatError, match="too small to be GGUF"):
        WqGGUF(junk)
    plain = tmp_path / "plain.gguf"
    w = gguf.GGUFWriter(plain, "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(FormatError, match="not a wqedge file"):
        WqGGUF(plain)
