"""Write a quantized model as a wqedge GGUF (docs/format.md), streaming and atomically.

The converter lowers what it is given and decides nothing: the plan fixes every chunk's
action, the quantized chunks arrive already fitted (wqedge.blocks.ChunkData, numpy), and
the other tensors arrive as numpy arrays. Tensor sizes are known from the plan before any
data is written, so tensors are written one by one as they are produced and a model larger
than memory can be converted. The file appears under its final name only when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np

from wqedge.fileio import atomic_output
from wqedge.blocks import COMPACT_FORMAT_VERSION, FORMAT_VERSION, SCALE_BASE, ChunkData, block_type, pack_chunk
from wqedge.plan import Plan
from wqedge.rotation_format import (INT_ROTATED_FORMAT_VERSION, KEY_ACT_BITS, KEY_BLOCK, KEY_ROTATION, LEGACY_BLOCK,
                                    ROTATED_FORMAT_VERSION, StoredTransform, tensor_name)
from wqedge.spec import ModelSpec, other_tensors, rope_freq_factors
from wqedge.units import Linear, chunk_bounds
from wqedge.converters.tokenizer import TokenizerMeta, add_tokenizer_to_gguf

ARCH = "llama"


@dataclass
class DenseTensor:
    """A tensor written as stored (embeddings, norms, output head)."""
    gguf_name: str
    shape: tuple[int, ...]
    dtype: np.dtype          # float16 or float32


@dataclass
class QuantizedHead:
    """The output head as a quantized linear (wqedge.head): `gguf_name` is output.weight, or token_embd.weight
    when the embeddings are tied (then that one tensor serves both); chunks() fits it when it is written."""
    gguf_name: str
    out_features: int
    in_features: int
    actions: list[str]
    chunks: Callable[[], list[ChunkData]]

    def row_bytes(self, group_size: int) -> int:
        return sum(block_type(a).row_bytes(e - s, 0) for a, (s, e) in
                   zip(self.actions, chunk_bounds(self.in_features, group_size)))


def linear_row_bytes(plan: Plan, name: str) -> int:
    t = plan.tensor(name)
    return sum(block_type(a).row_bytes(g, len(p)) for a, g, p in zip(t.actions, t.widths(plan.group_size), t.protected))


def tensor_key(gguf_name: str, field: str) -> str:
    return f"wqedge.tensors.{gguf_name}.{field}"


def add_llama_metadata(w: gguf.GGUFWriter, spec: ModelSpec, name: str | None = None) -> None:
    """llama.cpp's `llama.*` shape keys for a spec (shared by our format and the llama.cpp export)."""
    w.add_name(name or spec.name)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.n_layers)
    # A pruned model's per-layer shapes as llama.cpp reads them: u32 arrays of block_count entries.
    for key, scalar, per_layer in (("feed_forward_length", spec.intermediate_size, spec.layer_ff),
                                   ("attention.head_count", spec.n_heads, spec.layer_heads),
                                   ("attention.head_count_kv", spec.n_kv_heads, spec.layer_kv_heads)):
        if per_layer is None:
            w.add_uint32(f"{w.arch}.{key}", scalar)
        else:
            w.add_key_value(f"{w.arch}.{key}", list(per_layer), gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType.UINT32)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)


def _add_model_metadata(w: gguf.GGUFWriter, spec: ModelSpec, plan: Plan, rotated: bool = False,
                        head: QuantizedHead | None = None, int_rotations: bool = False) -> None:
    add_llama_metadata(w, spec)
    if spec.rope_scaling:
        # llama.cpp reads llama3 scaling from the rope_freqs.weight tensor alone; we keep the parameters too.
        w.add_string("wqedge.rope.scaling", json.dumps(spec.rope_scaling, sort_keys=True))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)  # closest stock label; the true types are in wqedge.* keys
    rot_keys = rotated or plan.act_bits != 8  # version 2 only when needed: other files stay byte for byte
    version = INT_ROTATED_FORMAT_VERSION if int_rotations else ROTATED_FORMAT_VERSION if rot_keys else FORMAT_VERSION
    if any(_n_compact(t.actions) for t in plan.tensors):   # readers of formats 1-3 would not know the kinds
        version = COMPACT_FORMAT_VERSION
    w.add_uint32("wqedge.format_version", version)
    w.add_uint32("wqedge.group_size", plan.group_size)
    w.add_bool("wqedge.rope.neox", True)
    w.add_float32("wqedge.effective_bits", plan.effective_bits())
    if plan.pruning is not None:  # the denominator of effective bits: the unpruned model's linear weights
        w.add_uint64("wqedge.original_weights", plan.n_weights())
    w.add_string("wqedge.plan", plan.to_json(timings=False))  # same inputs, same bytes
    if rot_keys:
        w.add_uint32(KEY_ACT_BITS, plan.act_bits)
    if rotated:
        w.add_string(KEY_ROTATION, plan.rotation["method"])
        w.add_uint32(KEY_BLOCK, int(plan.rotation.get("block", LEGACY_BLOCK)))
    if plan.kv_cache is not None:  # the runtime's default KV cache (docs/format.md "KV cache"); no version change
        from wqedge.kv_format import KEY_BITS as KV_BITS, KEY_ROTATION as KV_ROTATION, KVCacheSpec
        kv = KVCacheSpec.from_plan(plan.kv_cache)
        if kv.bits is not None:  # {"bits": null}: float32 asked for, i.e. no keys
            w.add_uint32(KV_BITS, kv.bits)
        if kv.rotation_stored:  # fp16 values are never rotated: no key that would say otherwise
            w.add_string(KV_ROTATION, kv.rotation)
    for lin in spec.linears():
        t = plan.tensor(lin.hf_name)
        name = lin.gguf_name
        w.add_uint32(tensor_key(name, "in_features"), t.in_features)
        w.add_array(tensor_key(name, "chunk_actions"), [block_type(a).code for a in t.actions])
        if any(t.protected):
            w.add_key_value(tensor_key(name, "chunk_protected"), [len(p) for p in t.protected],
                            gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
    if head is not None:  # the same keys as a decoder linear's; never protected columns, never compact kinds
        if _n_compact(head.actions):
            raise ValueError(f"{head.gguf_name}: the output head takes fp16-header kinds only, not {head.actions[0]}")
        w.add_uint32(tensor_key(head.gguf_name, "in_features"), head.in_features)
        w.add_array(tensor_key(head.gguf_name, "chunk_actions"), [block_type(a).code for a in head.actions])


def _n_compact(actions) -> int:
    return sum(block_type(a).compact for a in actions)


def _scale_bases(chunks: list[ChunkData]) -> np.ndarray:
    """The compact chunks' fp16 scale bases, left to right (the `.scale_base` tensor, docs/format.md)."""
    bases = [c.base for c in chunks if block_type(c.action).compact]
    if any(b is None for b in bases):
        raise ValueError("a compact chunk without its scale base (fit it with blocks.compact_snap)")
    return np.asarray(bases, dtype=np.float16)


def _protect_indices(chunks: list[ChunkData], starts: list[int]) -> np.ndarray:
    idx = [s + np.asarray(c.protected, dtype=np.int64) for c, s in zip(chunks, starts) if c.n_protected]
    # u16 column indices, stored in an I16 tensor (readers view them as unsigned)
    return np.concatenate(idx).astype(np.uint16).view(np.int16) if idx else np.zeros(0, np.int16)


def check_finite(name: str, arr: np.ndarray) -> None:
    """Refuse NaN/Inf (also values that overflow to Inf when stored as fp16): such a file would load and
    then produce nothing but NaN."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ValueError(f"{name}: {int(bad.sum())} non-finite value(s) (NaN/Inf, or beyond the fp16 range when "
                         f"stored as fp16), first at index {where}; the checkpoint is damaged")


def write_gguf(path: str | os.PathLike, spec: ModelSpec, plan: Plan, tokenizer: TokenizerMeta,
               dense: list[DenseTensor], dense_data: Callable[[str], np.ndarray],
               quantized: Iterable[tuple[Linear, list[ChunkData]]],
               progress: Callable[[str], None] | None = None,
               transforms: dict[tuple[int, int], StoredTransform] | None = None,
               head: QuantizedHead | None = None) -> Path:
    """Write the model; `quantized` yields every decoder linear in spec.linears() order.

    dense_data(gguf_name) returns the array for a DenseTensor (called once each, in order); head: the output
    head as a quantized linear, which replaces the DenseTensor of its name (None: the head is dense). transforms:
    {(layer, group): StoredTransform} of a rotated plan (one per layer and group), whose folded weights
    `quantized` carries.
    """
    if (plan.rotation is not None) != bool(transforms):
        raise ValueError("a rotated plan needs its transforms, and transforms need a rotated plan")
    if transforms:   # the file's block key must be the matrices' size, or runtimes would read them wrongly
        block = int(plan.rotation.get("block", LEGACY_BLOCK))
        sizes = sorted({int(st.r1.shape[0]) for st in transforms.values()})
        if sizes != [block]:
            raise ValueError(f"the plan's rotation block is {block} but its transforms' block matrices are "
                             f"{'/'.join(map(str, sizes))} wide")
    with atomic_output(path) as tmp:
        _write(tmp, spec, plan, tokenizer, dense, dense_data, quantized, progress, transforms or {}, head)
    return Path(path)


def _transform_arrays(spec: ModelSpec, transforms: dict) -> list[tuple[str, np.ndarray]]:
    """(tensor name, array) of every stored transform field, layer by layer and group by group."""
    want = {(li, gi) for li in range(spec.n_layers) for gi in range(4)} if transforms else set()
    if set(transforms) != want:
        raise ValueError(f"transforms must cover every layer and group: missing {sorted(want - set(transforms))[:3]}")
    out = []
    for (li, gi), st in sorted(transforms.items()):
        st.check(f"layer {li} group {gi}")
        out += [(tensor_name(li, gi, f), a) for f, a in st.arrays().items()]
    return out


def _write(tmp: Path, spec, plan, tokenizer, dense, dense_data, quantized, progress, transforms, head) -> None:
    w = gguf.GGUFWriter(tmp, ARCH)
    _add_model_metadata(w, spec, plan, bool(transforms), head,
                        int_rotations=any(st.integer for st in transforms.values()))
    add_tokenizer_to_gguf(w, tokenizer)
    if head is not None:
        if head.gguf_name not in {d.gguf_name for d in dense}:
            raise ValueError(f"the quantized head {head.gguf_name} is not among the model's tensors")
        dense = [d for d in dense if d.gguf_name != head.gguf_name]
        head_rb = head.row_bytes(plan.group_size)

    factors = rope_freq_factors(spec)
    if factors is not None:
        dense = dense + [DenseTensor("rope_freqs.weight", factors.shape, np.dtype(np.float32))]
    for d in dense:
        w.add_tensor_info(d.gguf_name, d.shape, d.dtype, int(np.prod(d.shape)) * d.dtype.itemsize)
    if head is not None:
        w.add_tensor_info(head.gguf_name, (head.out_features, head_rb), np.dtype(np.int8), head.out_features * head_rb)
    rot = _transform_arrays(spec, transforms)
    for name, a in rot:
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    linears = spec.linears()
    for lin in linears:
        t = plan.tensor(lin.hf_name)
        rb = linear_row_bytes(plan, lin.hf_name)
        w.add_tensor_info(lin.gguf_name, (lin.out_features, rb), np.dtype(np.int8), lin.out_features * rb)
        n_p = sum(len(p) for p in t.protected)
        if n_p:
            w.add_tensor_info(lin.gguf_name + ".protect", (n_p,), np.dtype(np.int16), 2 * n_p)
        n_c = _n_compact(t.actions)
        if n_c:
            w.add_tensor_info(lin.gguf_name + SCALE_BASE, (n_c,), np.dtype(np.float16), 2 * n_c)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    for d in dense:
        arr = factors if d.gguf_name == "rope_freqs.weight" else np.ascontiguousarray(dense_data(d.gguf_name), dtype=d.dtype)
        if arr.shape != tuple(d.shape):
            raise ValueError(f"{d.gguf_name}: expected shape {d.shape}, got {arr.shape}")
        check_finite(d.gguf_name, arr)
        w.write_tensor_data(arr)
    if head is not None:
        chunks = head.chunks()
        if [c.action for c in chunks] != list(head.actions) or any(c.n_protected for c in chunks):
            raise ValueError(f"{head.gguf_name}: fitted chunks do not match the head's actions {head.actions[:1]}")
        rows = np.concatenate([pack_chunk(c) for c in chunks], axis=1)
        if rows.shape != (head.out_features, head_rb):
            raise ValueError(f"{head.gguf_name}: packed rows {rows.shape}, expected {(head.out_features, head_rb)}")
        w.write_tensor_data(rows.view(np.int8))
    for name, a in rot:
        check_finite(name, a)
        w.write_tensor_data(a)
    count = 0
    for lin, chunks in _in_order(quantized, linears):
        t = plan.tensor(lin.hf_name)
        starts = [c * plan.group_size for c in range(len(t.actions))]
        for c, (chunk, action, prot) in enumerate(zip(chunks, t.actions, t.protected)):
            if chunk.action != action or chunk.n_protected != len(prot):
                raise ValueError(f"{lin.hf_name} chunk {c}: plan says {action} with {len(prot)} protected columns, "
                                 f"got {chunk.action} with {chunk.n_protected}")
        rows = np.concatenate([pack_chunk(c) for c in chunks], axis=1)
        w.write_tensor_data(rows.view(np.int8))
        if any(t.protected):
            w.write_tensor_data(_protect_indices(chunks, starts))
        if _n_compact(t.actions):
            w.write_tensor_data(_scale_bases(chunks))
        count += 1
        if progress:
            progress(lin.gguf_name)
    if count != len(linears):
        raise ValueError(f"expected {len(linears)} quantized linears, got {count}")
    w.close()


def _in_order(quantized: Iterable[tuple[Linear, list[ChunkData]]], linears: list[Linear]) -> Iterator:
    expected = iter(linears)
    for lin, chunks in quantized:
        want = next(expected, None)
        if want is None or want.hf_name != lin.hf_name:
            raise ValueError(f"quantized linears out of order: got {lin.hf_name}, expected "
                             f"{want.hf_name if want else 'no more'}")
        yield lin, chunks


def dense_tensors(spec: ModelSpec, dtype_of: Callable[[str], np.dtype]) -> list[DenseTensor]:
    """The non-linear tensors to write, with the dtype each is stored in (norms always F32)."""
    out = []
    for hf, name, shape in other_tensors(spec):
        dt = np.dtype(np.float32) if len(shape) == 1 else dtype_of(hf)
        out.append(DenseTensor(name, shape, dt))
    return out
