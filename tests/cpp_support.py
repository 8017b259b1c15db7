"""Support for the C++ runtime tests (tests/test_cpp_*.py): find or build libwqedge, and write small
wqedge GGUF files directly with gguf.GGUFWriter, following docs/format.md (independent of the
converter, so the tests also cross-check our reading of the format).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import gguf
import numpy as np

from wqedge import blocks
from wqedge.blocks import ChunkData, block_type, pack_chunk, unpack_chunk
from wqedge.units import PROJECTIONS, chunk_bounds

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "cpp" / "build"


def ensure_library() -> None:
    """Use an existing build or installed library; otherwise build cpp/ once (needs cmake and g++)."""
    import pytest

    from wqedge.runtime import _native
    if _native.available():
        return
    if not shutil.which("cmake"):
        pytest.skip("libwqedge not built and cmake not available")
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    assert _native.available(), "libwqedge built but not found"


def ensure_test_executable(name: str) -> Path:
    """The C++ test program cpp/build/<name>, built (with its CMake target only) when missing."""
    import pytest

    exe = BUILD / name
    if exe.is_file():
        return exe
    if not shutil.which("cmake"):
        pytest.skip(f"cpp/build/{name} not built and cmake not available")
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                    "-DWQEDGE_BUILD_TESTS=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target", name], check=True,
                   stdout=subprocess.DEVNULL)
    return exe


PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def linear_shapes(D, H, KV, hd, F):
    return {"attn_q": (H * hd, D), "attn_k": (KV * hd, D), "attn_v": (KV * hd, D), "attn_output": (D, H * hd),
            "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}


def random_chunk(action: str, rows: int, g: int, rng, n_prot: int = 0) -> ChunkData:
    bt = block_type(action)
    prot = np.sort(rng.choice(g, size=n_prot, replace=False)) if n_prot else None
    res = rng.normal(0, 0.02, (rows, n_prot)).astype(np.float16) if n_prot else None
    if bt.compact:   # header codes over their whole range: e in 0..47 (and 255, d = 0), z in 0..255
        base = float(np.float16(rng.uniform(0.5, 1.5) * 0.16 / max(bt.levels - 1, 1)))
        e = rng.integers(0, 48, rows).astype(np.uint8)
        e[rng.random(rows) < 0.05] = blocks.COMPACT_ZERO
        z = rng.integers(0, 256, rows).astype(np.uint8) if bt.has_offset else None
        d, m = blocks.compact_decode(bt, e, z, base)
        codes = rng.integers(0, bt.levels, (rows, g)).astype(np.uint8)
        return ChunkData(action, g, codes=codes, d=d, m=m, protected=prot, residuals=res, base=base)
    if action == "fp16":
        return ChunkData(action, g, values=rng.normal(0, 0.08, (rows, g)).astype(np.float16), protected=prot, residuals=res)
    codes = rng.integers(0, bt.levels, (rows, g)).astype(np.uint8)
    span = 0.16
    if bt.is_affine:
        d = np.full(rows, span / max(bt.levels - 1, 1), np.float16) * rng.uniform(0.5, 1.5, rows).astype(np.float16)
        m = (-(bt.levels - 1) / 2 * d.astype(np.float32)).astype(np.float16)
        return ChunkData(action, g, codes=codes, d=d, m=m, protected=prot, residuals=res)
    d = rng.uniform(0.03, 0.08, rows).astype(np.float16)
    return ChunkData(action, g, codes=codes, d=d, protected=prot, residuals=res)


def rtn_chunk(action: str, w: np.ndarray, n_prot: int = 0) -> ChunkData:
    """Round-to-nearest quantization of one chunk w float32[N, g] (min-max affine, absmean ternary);
    the n_prot columns of largest norm get fp16 residuals."""
    bt = block_type(action)
    N, g = w.shape
    if action == "fp16":
        c = ChunkData(action, g, values=w.astype(np.float16))
    elif bt.is_affine:
        lo, hi = w.min(axis=1), w.max(axis=1)
        d = np.maximum((hi - lo) / (bt.levels - 1), 1e-8).astype(np.float16)
        m = lo.astype(np.float16)
        base = None
        if bt.compact:   # onto the header's grid (the snapped m may sit a little above lo: codes clip there)
            base, d, m = blocks.compact_snap(bt, d, m)
        df = np.where(d.astype(np.float32) == 0, 1.0, d.astype(np.float32))
        q = np.clip(np.rint((w - m.astype(np.float32)[:, None]) / df[:, None]), 0, bt.levels - 1).astype(np.uint8)
        c = ChunkData(action, g, codes=q, d=d, m=m, base=base)
    else:
        a = np.maximum(np.abs(w).mean(axis=1), 1e-8).astype(np.float16)
        base = None
        if bt.compact:
            base, a, _ = blocks.compact_snap(bt, a)
        af = np.where(a.astype(np.float32) == 0, 1.0, a.astype(np.float32))
        t = np.clip(np.rint(w / af[:, None]), -1, 1).astype(np.int8) + 1
        c = ChunkData(action, g, codes=t.astype(np.uint8), d=a, base=base)
    if n_prot:
        prot = np.sort(np.argsort(-np.linalg.norm(w, axis=0))[:n_prot])
        deq = unpack_chunk(pack_chunk(c), action, g, base=c.base)
        c.protected = prot
        c.residuals = (w[:, prot] - deq[:, prot]).astype(np.float16)
    return c


def write_wq(path, *, D, layers, H, KV, hd, F, V, G, dense: dict, linear, action_fn, protect_fn=None,
             ctx_len=2048, rope_base=10000.0, eps=1e-5, rope_scaling=None, tokenizer=None, bos=1, eos=2,
             key_overrides=None, drop_keys=(), tensor_overrides=None) -> Path:
    """Write a wqedge GGUF following docs/format.md.

    dense: GGUF name -> array (embeddings, norms, output; written as given).
    linear(name, N, K, chunk_index, start, end, action, n_prot) -> ChunkData for that chunk.
    action_fn(name, chunk_index) -> action; protect_fn(name, chunk_index, width) -> protected count.
    key_overrides replace (or add) keys; drop_keys omits keys; tensor_overrides replace tensors (None drops).
    An override (value, gguf.GGUFValueType) stores the value with that type (e.g. an i64 token id).
    """
    protect_fn = protect_fn or (lambda name, c, g: 0)
    key_overrides = dict(key_overrides or {})
    tensor_overrides = dict(tensor_overrides or {})
    w = gguf.GGUFWriter(str(path), "llama")
    kv = {
        "llama.context_length": (w.add_context_length, ctx_len), "llama.embedding_length": (w.add_embedding_length, D),
        "llama.block_count": (w.add_block_count, layers), "llama.feed_forward_length": (w.add_feed_forward_length, F),
        "llama.attention.head_count": (w.add_head_count, H), "llama.attention.head_count_kv": (w.add_head_count_kv, KV),
        "llama.attention.key_length": (w.add_key_length, hd), "llama.attention.value_length": (w.add_value_length, hd),
        "llama.attention.layer_norm_rms_epsilon": (w.add_layer_norm_rms_eps, eps),
        "llama.rope.freq_base": (w.add_rope_freq_base, rope_base), "llama.rope.dimension_count": (w.add_rope_dimension_count, hd),
        "llama.vocab_size": (w.add_vocab_size, V),
    }
    for k, (fn, v) in kv.items():
        if k in drop_keys:
            continue
        if k in key_overrides:
            v = key_overrides.pop(k)
        fn(v)
    def put_u32(k, v):
        if isinstance(v, tuple):
            w.add_key_value(k, v[0], v[1])
        else:
            w.add_uint32(k, v)

    version = 1   # 4 when a compact-header kind occurs (docs/format.md)
    if any(block_type(action_fn(f"blk.{l}.{p}.weight", c)).compact for l in range(layers) for p in PROJ
           for c in range(len(chunk_bounds(linear_shapes(D, H, KV, hd, F)[p][1], G)))):
        version = blocks.COMPACT_FORMAT_VERSION
    for k, v in {"wqedge.format_version": version, "wqedge.group_size": G}.items():
        if k not in drop_keys:
            put_u32(k, key_overrides.pop(k, v))
    w.add_bool("wqedge.rope.neox", key_overrides.pop("wqedge.rope.neox", True))
    w.add_float32("wqedge.effective_bits", 0.0)
    w.add_string("wqedge.plan", json.dumps({"test": True}))
    if rope_scaling:
        w.add_string("wqedge.rope.scaling", json.dumps(rope_scaling, sort_keys=True))
    if tokenizer is not None:
        from wqedge.converters.tokenizer import add_tokenizer_to_gguf
        add_tokenizer_to_gguf(w, tokenizer)
    else:
        put_u32("tokenizer.ggml.bos_token_id", key_overrides.pop("tokenizer.ggml.bos_token_id", bos))
        put_u32("tokenizer.ggml.eos_token_id", key_overrides.pop("tokenizer.ggml.eos_token_id", eos))

    tensors = [(name, arr, None) for name, arr in dense.items()]
    shapes = linear_shapes(D, H, KV, hd, F)
    for l in range(layers):
        for p in PROJ:
            name = f"blk.{l}.{p}.weight"
            N, K = shapes[p]
            chunks, acts, prots, idx = [], [], [], []
            for c, (s, e) in enumerate(chunk_bounds(K, G)):
                a = action_fn(name, c)
                n_p = min(protect_fn(name, c, e - s), e - s)
                ch = linear(name, N, K, c, s, e, a, n_p)
                chunks.append(ch)
                acts.append(block_type(a).code)
                prots.append(ch.n_protected)
                if ch.n_protected:
                    idx.extend((s + np.asarray(ch.protected)).tolist())
            rows = np.concatenate([pack_chunk(c) for c in chunks], axis=1)
            bases = [c.base for c in chunks if block_type(c.action).compact]
            key = f"wqedge.tensors.{name}."
            if key + "in_features" not in drop_keys:
                w.add_uint32(key + "in_features", key_overrides.pop(key + "in_features", K))
            w.add_array(key + "chunk_actions", key_overrides.pop(key + "chunk_actions", acts))
            if any(prots):
                w.add_key_value(key + "chunk_protected", key_overrides.pop(key + "chunk_protected", prots),
                                gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
            tensors.append((name, rows.view(np.int8), gguf.GGMLQuantizationType.I8))
            if idx:
                tensors.append((name + ".protect", np.asarray(idx, np.uint16).view(np.int16), gguf.GGMLQuantizationType.I16))
            if bases:
                tensors.append((name + blocks.SCALE_BASE, np.asarray(bases, np.float16), None))
    for k, v in key_overrides.items():  # extra keys
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            put_u32(k, v)
    for name, arr, raw in tensors:
        arr = tensor_overrides.get(name, arr)
        if arr is None:
            continue
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


ALL_ACTIONS = ("q8", "q4", "q3", "q2", "ternary", "q1", "fp16", "q4c", "q3c", "q2c", "ternaryc", "q1c")


def mixed_action(name: str, c: int) -> str:
    """A deterministic mix using every action."""
    return ALL_ACTIONS[(zlib.crc32(name.encode()) + c) % len(ALL_ACTIONS)]


def write_tiny(path, *, D=64, layers=2, H=4, KV=2, hd=16, F=96, V=96, G=64, tied=False, actions=None,
               protect=None, rope_scaling=None, seed=0, emb_dtype=np.float16, **kw) -> Path:
    """A random tiny model (random codes and scales). actions(name, chunk) -> action (default: a mix
    of every action); protect(name, chunk, width) -> protected count (default: 2 in ffn_up's chunk 0)."""
    rng = np.random.default_rng(seed)
    dense = {"token_embd.weight": rng.normal(0, 1.0, (V, D)).astype(emb_dtype),
             "output_norm.weight": rng.uniform(0.8, 1.2, D).astype(np.float32)}
    if not tied:
        dense["output.weight"] = rng.normal(0, 0.1, (V, D)).astype(emb_dtype)
    if rope_scaling:
        from wqedge.spec import ModelSpec, rope_freq_factors
        spec = ModelSpec(hidden_size=D, n_layers=layers, n_heads=H, n_kv_heads=KV, head_dim=hd, intermediate_size=F,
                         vocab_size=V, rope_scaling=rope_scaling)
        dense["rope_freqs.weight"] = rope_freq_factors(spec)
    for l in range(layers):
        dense[f"blk.{l}.attn_norm.weight"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
        dense[f"blk.{l}.ffn_norm.weight"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
    return write_wq(path, D=D, layers=layers, H=H, KV=KV, hd=hd, F=F, V=V, G=G, dense=dense,
                    linear=lambda name, N, K, c, s, e, a, n_p: random_chunk(a, N, e - s, rng, n_p),
                    action_fn=actions or mixed_action,
                    protect_fn=protect or (lambda name, c, g: 2 if ("ffn_up" in name and c == 0) else 0),
                    ctx_len=256, rope_scaling=rope_scaling, **kw)


def write_llama_s(path, model_dir, action_fn, protect_fn=None, G=128) -> Path:
    """The fixture model's weights, RTN-quantized chunk by chunk with action_fn, with its tokenizer."""
    from safetensors.numpy import load_file

    from wqedge.converters.tokenizer import read_tokenizer
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    st = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        st.update(load_file(f))
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or D // H
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    dense = {"token_embd.weight": st["model.embed_tokens.weight"],
             "output_norm.weight": st["model.norm.weight"].astype(np.float32)}
    if "lm_head.weight" in st:
        dense["output.weight"] = st["lm_head.weight"]
    for l in range(layers):
        dense[f"blk.{l}.attn_norm.weight"] = st[f"model.layers.{l}.input_layernorm.weight"].astype(np.float32)
        dense[f"blk.{l}.ffn_norm.weight"] = st[f"model.layers.{l}.post_attention_layernorm.weight"].astype(np.float32)
    hf = {stem: hfname for hfname, stem in PROJECTIONS}

    def linear(name, N, K, c, s, e, a, n_p):
        l = int(name.split(".")[1])
        stem = name.split(".")[2]
        W = st[f"model.layers.{l}.{hf[stem]}.weight"]
        return rtn_chunk(a, W[:, s:e].astype(np.float32), n_p)

    return write_wq(path, D=D, layers=layers, H=H, KV=KV, hd=hd, F=F, V=V, G=G, dense=dense, linear=linear,
                    action_fn=action_fn, protect_fn=protect_fn, ctx_len=cfg.get("max_position_embeddings", 2048),
                    rope_base=theta, eps=cfg.get("rms_norm_eps", 1e-5), tokenizer=read_tokenizer(model_dir))


def tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of a tensor-info record's n_dims field (just after its name)."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    i = data.find(needle)
    assert i >= 0, name
    return i + len(needle)


def patch_tensor_info(data: bytearray, name: str, *, dims=None, type_=None, offset=None) -> bytearray:
    at = tensor_info_offset(bytes(data), name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    if dims is not None:
        for i, d in enumerate(dims[:n_dims]):
            struct.pack_into("<Q", data, at + 4 + 8 * i, d)
    if type_ is not None:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_)
    if offset is not None:
        struct.pack_into("<Q", data, at + 8 + 8 * n_dims, offset)
    return data


def write_stock_gguf(path, arch: str = "llama") -> Path:
    """A minimal GGUF as llama.cpp's tools write one (no wqedge keys): one F32 tensor, a block count."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
