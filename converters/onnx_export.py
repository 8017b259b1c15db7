"""Lower a wqedge GGUF into an ONNX decoder model (ONNX Runtime GenAI-style I/O, KV cache).

The exporter reads the file (runtime.gguf_reader.WqGGUF) and lowers what the file says — it never
makes a plan. numpy and onnx only (no torch). The graph's meaning is exactly the file's
(docs/format.md; wqedge/blocks.py), run in fp32; docs/onnx.md describes the lowering and its costs.

Inputs / outputs (names as onnxruntime-genai's model builder writes them):
  input_ids int64 [batch, seq], attention_mask int64 [batch, total], position_ids int64 [batch, seq],
  past_key_values.N.key / .value float32 [batch, n_kv_heads, past, head_dim]
  -> logits float32 [batch, seq, vocab], present.N.key / .value float32 [batch, n_kv_heads, total, head_dim]
with total = past + seq. Query i of the step attends key j when j <= past + i and attention_mask[b, j] == 1.

Portable variant (stock onnxruntime): each linear's chunks are grouped by action; a group's input
columns are sliced (one contiguous range) or gathered, and
  q8, q4, q2          -> com.microsoft.MatMulNBits (bits 8/4/2, block_size = G, or 32 when G is not a
                         power of two), scales = d, uint8 zero points = 0, so it computes x . (d q)^T;
  q3, ternary, q1     -> the packed codes (our bit layouts, each chunk repacked at width G) unpacked in
                         the graph with BitShift / BitwiseAnd / Mul / Div, scaled by d (a for ternary) and
                         fed to a MatMul; every input is an initializer, so ONNX Runtime folds this to a
                         dense fp32 matrix when the session is created (small file, fp32 in memory);
  fp16                -> MatMul with the fp16 columns (Cast to fp32, folded at load);
  offsets m (and -a)  -> one small MatMul per linear: per-chunk sums of x [.., n_chunks] times m^T;
  protected residuals -> gather the protected columns, MatMul with the fp16 residuals;
and the partial products are summed. w = d q + m is thus computed as d (x . q) + m (sum of x), exactly
the file's affine form, whatever d is (float zero points -m/d would fail at d = 0, and ONNX Runtime's
CPU MatMulNBits refuses float zero points at 8 bits).

Rotated files (RUQuant, format version 2): before each transform group's linears (q/k/v, o, gate/up, down) the
graph applies the file's stored input transform and, at act bits < 8, the per-token activation quantizer, as stock
operators computed once per group (converters/onnx_rotation.py); both variants.

Native variant (onnxruntime + libwqedge_ort, our custom-op library): every quantized linear is one
wqedge.ChunkLinear node whose weight is the GGUF tensor's row-block bytes as a uint8 initializer, run by
the C++ runtime's kernels (cpp/src/ort_ops.cpp has the op's schema); the rest of the graph is the
portable one. Open it with wqedge.runtime.onnx_session.make_session.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wqedge.blocks import BLOCK_TYPES, ChunkData, block_type, expanded, pack_chunk
from wqedge.converters.onnx_rotation import lower_group_input
from wqedge.fileio import atomic_output
from wqedge.rotation_format import GROUPS as ROT_GROUPS
from wqedge.runtime.gguf_reader import WqGGUF

OPSET = 21
MS_DOMAIN = "com.microsoft"
NBITS_WIDTHS = (8, 4, 2)                           # code widths with a MatMulNBits CPU kernel
# affine actions of those widths go to MatMulNBits; the other quantized ones are unpacked in the graph with
# standard operators, or with lowering="widen" stored in the narrowest wider MatMulNBits
STOCK_BITS = {b.name: b.bits for b in BLOCK_TYPES if b.is_affine and b.bits in NBITS_WIDTHS}
UNPACKED = tuple(b.name for b in BLOCK_TYPES if not b.is_float and b.name not in STOCK_BITS)
WIDENED_BITS = {b.name: min(w for w in NBITS_WIDTHS if (1 << w) >= b.levels) for b in BLOCK_TYPES
                if b.name in UNPACKED}
LOWERINGS = ("compact", "widen", "int4")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000            # bytes of initializers; protobuf's hard limit is 2 GiB
VARIANTS = ("portable", "native")
NATIVE_DOMAIN = "wqedge"                            # libwqedge_ort's custom-op domain (ChunkLinear, version 1)


def _onnx():
    import onnx
    return onnx


# ---------------------------------------------------------------- packing helpers (numpy)

def pack_matmulnbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Codes uint8[N, K] -> MatMulNBits' B uint8[N, ceil(K/block), block*bits/8] (low bits first along K)."""
    n, k = q.shape
    nb = -(-k // block)
    full = np.zeros((n, nb * block), np.uint8)
    full[:, :k] = q
    per = 8 // bits
    v = full.reshape(n, -1, per)
    out = np.zeros(v.shape[:2], np.uint8)
    for i in range(per):
        out |= (v[:, :, i] << (bits * i)).astype(np.uint8)
    return out.reshape(n, nb, block * bits // 8)


def _block_size(group: int) -> int:
    """MatMulNBits' block: G when it is a power of two (>= 16), else 32 (G is a multiple of 32)."""
    return group if group >= 16 and (group & (group - 1)) == 0 else 32


# ---------------------------------------------------------------- graph builder

class _Graph:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0
        self._consts: dict = {}

    def name(self, stem):
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, stem, arr) -> str:
        from onnx import numpy_helper
        n = self.name(stem) if not stem.startswith("=") else stem[1:]
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def const(self, value, dtype) -> str:
        """A small shared constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("c", arr)
        return self._consts[key]

    def op(self, op_type, inputs, n_out=1, domain=None, stem=None, **attrs):
        from onnx import helper
        outs = [self.name(stem or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type, inputs, output, **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.name("n_" + op_type), **attrs))
        return output

    # conveniences
    def i64(self, v):
        return self.const(v, np.int64)

    def f32(self, v):
        return self.const(v, np.float32)

    def slice_last(self, x, start, end, axis=-1):
        return self.op("Slice", [x, self.i64([start]), self.i64([end]), self.i64([axis])])

    def cast(self, x, to):
        return self.op("Cast", [x], to=to)


def _tensor_dtype(f: WqGGUF, name: str):
    t = f.tensors[name]
    return np.float16 if np.asarray(t.data).dtype == np.float16 else np.float32


class _Exporter:
    """The portable decoder graph; subclasses change how a quantized linear is lowered (linear())."""
    variant = "portable"
    domains = {MS_DOMAIN: 1}

    def __init__(self, f: WqGGUF, lowering: str = "compact", accuracy_level: int = 0):
        from onnx import TensorProto
        self.lowering, self.accuracy_level = lowering, int(accuracy_level)
        self.f, self.spec, self.G = f, f.spec, f.group_size
        self.g = _Graph()
        self.FLOAT, self.F16, self.I64, self.BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL
        self.INT32, self.UINT8 = TensorProto.INT32, TensorProto.UINT8
        self.stats: dict[str, int] = {}
        self.transforms = f.transforms()   # RUQuant (format version 2): {(layer, group): StoredTransform}
        self.act_bits = f.act_bits

    def group_input(self, x, layer: int, group: int) -> str:
        """What the linears of transform group `group` (rotation_format.GROUPS) of `layer` read: x, or for a
        rotated / activation-quantized file its transform and per-token quantizer (converters/onnx_rotation.py)."""
        st = self.transforms.get((layer, group))
        if st is None and self.act_bits >= 8:
            return x
        n0 = len(self.g.inits)
        y = lower_group_input(self.g, x, st, self.act_bits, f"blk_{layer}_rot_{ROT_GROUPS[group]}")
        self._count("rotation", sum(len(t.raw_data) for t in self.g.inits[n0:]))
        return y

    # ------------------------------------------------------------ weights as initializers
    def dense_weight(self, name, transpose=False) -> str:
        """A dense tensor stored as in the file (fp16 or fp32), Cast to fp32 in the graph (folded at load)."""
        dt = _tensor_dtype(self.f, name)
        w = self.f.dense(name).astype(dt)
        if transpose:
            w = w.T
        n = self.g.init(name.replace(".", "_"), w)
        return n if dt == np.float32 else self.g.cast(n, self.FLOAT)

    def _count(self, key, nbytes):
        self.stats[key] = self.stats.get(key, 0) + int(nbytes)

    # ------------------------------------------------------------ one quantized linear
    def linear(self, x, name) -> str:
        g = self.g
        chunks = [expanded(c) for c in self.f.chunks(name)]   # compact kinds as their fp16-header base kinds
        lay = self.f.layout(name)
        N, K = lay.out_features, lay.in_features
        stem = name.replace(".weight", "").replace(".", "_")
        parts = []
        groups: dict[str, list[ChunkData]] = {}  # one group per lowering: MatMulNBits of one width, unpacked
        for c in chunks:                          # kind, dense (fp16)
            if block_type(c.action).is_float:
                key = "dense"
            elif self.lowering == "int4":
                key = "matmulnbits4"
            else:
                bits = STOCK_BITS.get(c.action) or (WIDENED_BITS.get(c.action) if self.lowering == "widen" else None)
                key = f"matmulnbits{bits}" if bits else c.action
            groups.setdefault(key, []).append(c)
        for a, cs in groups.items():
            if a == "dense":
                xg = self._columns(x, cs, K)
                wt = np.concatenate([c.values for c in cs], axis=1).T  # [kg, N] fp16
                self._count(cs[0].action, wt.nbytes)
                parts.append(g.op("MatMul", [xg, g.cast(g.init(stem + "_fp16", wt), self.FLOAT)]))
            elif a.startswith("matmulnbits"):
                bits = int(a[len("matmulnbits"):])
                entries = []  # (start, end, codes uint8[N, g], scale float32[N]) along the node's K
                hi = []
                for c in cs:
                    if block_type(c.action).bits == 8 and bits == 4:  # q = 16 hi + lo: nibble planes, scales d, 16 d
                        entries.append((c.start, c.end, c.codes & 0x0F, c.d))
                        hi.append((c.start, c.end, c.codes >> 4, 16.0 * c.d))
                    else:
                        entries.append((c.start, c.end, c.codes, c.d))
                parts.append(self._matmulnbits(x, K, N, entries + hi, bits, f"{stem}_{a}"))
            else:
                parts.append(g.op("MatMul", [self._columns(x, cs, K), self._unpacked_weight_t(stem, a, cs, N)]))
        # offsets: x . m^T per chunk = (sum of x over the chunk's columns) * m
        mt = np.zeros((len(chunks), N), np.float16)
        for i, c in enumerate(chunks):
            bt = block_type(c.action)
            if not bt.is_float:
                mt[i] = bt.affine_offset(c.d, c.m)   # ternary: a (t - 1) = a t - a
        if mt.any():
            self._count("offsets", mt.nbytes)
            parts.append(g.op("MatMul", [self._chunk_sums(x, K), g.cast(g.init(stem + "_m", mt), self.FLOAT)]))
        # protected columns: residuals added on top of the dequantized codes
        prot = [c for c in chunks if c.n_protected]
        if prot:
            idx = np.concatenate([c.protected + c.start for c in prot]).astype(np.int64)
            rt = np.concatenate([c.residuals for c in prot], axis=1).T  # [P, N] fp16
            self._count("residuals", rt.nbytes + idx.nbytes)
            xp = g.op("Gather", [x, g.init(stem + "_pidx", idx)], axis=2)
            parts.append(g.op("MatMul", [xp, g.cast(g.init(stem + "_resid", rt), self.FLOAT)]))
        out = parts[0]
        for p in parts[1:]:
            out = g.op("Add", [out, p])
        return out

    def _matmulnbits(self, x, K, N, entries, bits, stem) -> str:
        """x . (scale * codes)^T over `entries` (column ranges of x, possibly repeated) with one MatMulNBits.

        Blocks (block_size = G, or 32) must not straddle entries: every entry narrower than G that is not the
        last is padded to G with a zero column (x padded by one zero column at index K, gathered for the padding).
        """
        g, G = self.g, self.G
        bs = _block_size(G)
        pad = any(e - s < G for s, e, _, _ in entries[:-1])
        widths = [G if (pad and e - s < G and i < len(entries) - 1) else e - s for i, (s, e, _, _) in enumerate(entries)]
        kg = sum(widths)
        q = np.zeros((N, kg), np.uint8)
        scales, off = [], 0
        for (s, e, codes, d), w in zip(entries, widths):
            q[:, off: off + e - s] = codes
            scales += [d.astype(np.float32)] * -(-w // bs)
            off += w
        B = pack_matmulnbits(q, bits, bs)
        nb = B.shape[1]
        scales = np.stack(scales, axis=1)
        assert scales.shape == (N, nb)
        zp = np.zeros((N, -(-nb * bits // 8)), np.uint8)
        self._count(f"matmulnbits{bits}", B.nbytes + scales.nbytes + zp.nbytes)
        cols = [(s, e) for s, e, _, _ in entries]
        if all(a[1] == b[0] for a, b in itertools.pairwise(cols)):
            xg = x if (cols[0][0], cols[-1][1]) == (0, K) else g.slice_last(x, cols[0][0], cols[-1][1])
        else:
            idx = np.concatenate([np.concatenate([np.arange(s, e), np.full(w - (e - s), K)])
                                  for (s, e), w in zip(cols, widths)]).astype(np.int64)
            src = x
            if pad:
                src = g.op("Pad", [x, g.i64([0, 0, 0, 0, 0, 1])])
            xg = g.op("Gather", [src, g.init("cols", idx)], axis=2)
        return g.op("MatMulNBits", [xg, g.init(stem + "_B", B), g.init(stem + "_scales", scales), g.init(stem + "_zp", zp)],
                    domain=MS_DOMAIN, K=kg, N=N, bits=bits, block_size=bs, accuracy_level=self.accuracy_level)

    def _columns(self, x, cs, K):
        """x restricted to the chunks' columns, in chunk order: x itself, a Slice or a Gather."""
        g = self.g
        s, e = cs[0].start, cs[-1].end
        if all(a.end == b.start for a, b in itertools.pairwise(cs)):
            return x if (s, e) == (0, K) else g.slice_last(x, s, e)
        idx = np.concatenate([np.arange(c.start, c.end) for c in cs]).astype(np.int64)
        return g.op("Gather", [x, g.init("cols", idx)], axis=2)

    def _chunk_sums(self, x, K):
        """[B, S, K] -> [B, S, n_chunks]: the sum of x over each chunk's columns (computed once per input)."""
        key = ("sums", x)
        if key in self._sums:
            return self._sums[key]
        g, G = self.g, self.G
        n = -(-K // G)
        if n * G != K:
            x = g.op("Pad", [x, g.i64([0, 0, 0, 0, 0, n * G - K])])
        r = g.op("Reshape", [x, g.i64([0, 0, n, G])])
        out = g.op("ReduceSum", [r, g.i64([-1])], keepdims=0)
        self._sums[key] = out
        return out

    def _unpacked_weight_t(self, stem, a, cs, N) -> str:
        """(scale * codes)^T [kg, N] fp32, computed in the graph from the packed codes (folded at load)."""
        g, G = self.g, self.G
        bt = block_type(a)
        n = len(cs)
        q = np.full((N, n, G), bt.zero_code, np.uint8)
        for i, c in enumerate(cs):
            q[:, i, : c.g] = c.codes
        payload = bt.pack(q.reshape(N * n, G)).reshape(N, n, -1)  # our layouts, each chunk at width G
        scale = np.stack([c.d for c in cs], axis=1).astype(np.float16).reshape(N, n, 1)
        self._count(a, payload.nbytes + scale.nbytes)
        p = g.init(f"{stem}_{a}_codes", payload)
        u8 = lambda v: g.const(v, np.uint8)
        if bt.levels == 2:      # the 1-bit layout
            codes = self._unpack_bits(p, N, n, G, 1)
        elif bt.levels == 8:    # the 3-bit layout: 2-bit plane + 1-bit plane
            v = g.op("Reshape", [p, g.i64([N, n, G // 32, 12])])
            lo = self._unpack_bits(g.slice_last(v, 0, 8), N, n, G, 2)
            hi = self._unpack_bits(g.slice_last(v, 8, 12), N, n, G, 1)
            codes = g.op("BitwiseOr", [lo, g.op("BitShift", [hi, u8(2)], direction="LEFT")])
        else:  # ternary: trit i of byte j = column i*B + j, t_i = (((byte * 3^i) mod 256) * 3) >> 8
            nbytes = payload.shape[2]
            v = g.op("Unsqueeze", [g.cast(p, self.INT32), g.i64([2])])                    # [N, n, 1, B]
            pw = g.const(np.array([1, 3, 9, 27, 81], np.int32).reshape(5, 1), np.int32)
            t = g.op("Mul", [g.op("BitwiseAnd", [g.op("Mul", [v, pw]), g.const(255, np.int32)]), g.const(3, np.int32)])
            t = g.op("Div", [t, g.const(256, np.int32)])                                  # [N, n, 5, B]
            t = g.op("Reshape", [t, g.i64([N, n, 5 * nbytes])])
            codes = g.slice_last(t, 0, G)
        w = g.op("Mul", [g.cast(codes, self.FLOAT), g.cast(g.init(f"{stem}_{a}_d", scale), self.FLOAT)])
        w = g.op("Reshape", [w, g.i64([N, n * G])])
        kg = sum(c.g for c in cs)
        if kg != n * G:
            w = g.slice_last(w, 0, kg)
        return g.op("Transpose", [w], perm=[1, 0])

    def _unpack_bits(self, p, N, n, G, bits) -> str:
        """Packed 1- or 2-bit codes (docs/format.md layouts) -> uint8 codes [N, n, G]."""
        g = self.g
        if bits == 1:  # 4 bytes per 32 columns, bit j of the little-endian u32 = column j
            v = g.op("Reshape", [p, g.i64([N, n, G // 8, 1])])
            sh = g.const(np.arange(8, dtype=np.uint8), np.uint8)
            mask = g.const(1, np.uint8)
        else:  # 8 bytes per 32 columns, bits 2k..2k+1 of byte j = column 8k + j
            v = g.op("Reshape", [p, g.i64([N, n, G // 32, 1, 8])])
            sh = g.const(np.array([0, 2, 4, 6], np.uint8).reshape(4, 1), np.uint8)
            mask = g.const(3, np.uint8)
        b = g.op("BitwiseAnd", [g.op("BitShift", [v, sh], direction="RIGHT"), mask])
        return g.op("Reshape", [b, g.i64([N, n, G])])

    # ------------------------------------------------------------ the decoder
    def rms_norm(self, x, weight_name):
        g = self.g
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.i64([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.f32(self.spec.rms_norm_eps)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), self.dense_weight(weight_name)])

    def rope(self, x, cos, sin):
        g = self.g
        h = self.spec.head_dim // 2
        x1 = g.slice_last(x, 0, h)
        x2 = g.slice_last(x, h, 2 * h)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def build(self, progress=None):
        from onnx import TensorProto, helper
        g, sp = self.g, self.spec
        hd, V = sp.head_dim, sp.vocab_size   # head counts per layer (a pruned model's differ)
        self._sums = {}
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
        for i in range(sp.n_layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                            ["batch_size", sp.kv_heads(i), "past_sequence_length", hd]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                             ["batch_size", sp.kv_heads(i), "total_sequence_length", hd]))
        # embeddings
        emb = g.init("token_embd_weight", self.f.dense("token_embd.weight").astype(_tensor_dtype(self.f, "token_embd.weight")))
        x = g.op("Gather", [emb, "input_ids"], axis=0)
        if _tensor_dtype(self.f, "token_embd.weight") != np.float32:
            x = g.cast(x, self.FLOAT)
        # RoPE tables from position_ids (fp32, as transformers computes them)
        inv = 1.0 / (sp.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
        if "rope_freqs.weight" in self.f.tensors:
            inv = inv / self.f.dense("rope_freqs.weight").astype(np.float32)
        pos = g.op("Unsqueeze", [g.cast("position_ids", self.FLOAT), g.i64([-1])])
        fr = g.op("Mul", [pos, g.f32(inv.astype(np.float32))])
        fr = g.op("Unsqueeze", [g.op("Concat", [fr, fr], axis=-1), g.i64([1])])   # [B, 1, S, hd]
        cos, sin = g.op("Cos", [fr]), g.op("Sin", [fr])
        # mask: key j is visible to query i iff j <= past + i and attention_mask[b, j]
        shp_ids = g.op("Shape", ["input_ids"])
        S = g.op("Gather", [shp_ids, g.i64(1)], axis=0)
        T = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.i64(1)], axis=0)
        P = g.op("Sub", [T, S])
        kpos = g.op("Range", [g.i64(0), T, g.i64(1)])
        qpos = g.op("Unsqueeze", [g.op("Range", [P, T, g.i64(1)]), g.i64([1])])
        causal = g.op("LessOrEqual", [kpos, qpos])                                    # [S, T]
        pad = g.op("Unsqueeze", [g.cast("attention_mask", self.BOOL), g.i64([1, 2, 3])])  # [B, 1, 1, 1, T]
        allowed = g.op("And", [causal, pad])                                          # [B, 1, 1, S, T]
        neg = g.f32(np.finfo(np.float32).min)
        scale = g.f32(1.0 / np.sqrt(hd))
        n_steps = sp.n_layers * 7 + 1
        step = 0

        def tick(what):
            nonlocal step
            step += 1
            if progress:
                progress(step, n_steps, what)

        def lin(x, name):
            out = self.linear(x, name)
            tick(name[: -len(".weight")])
            return out

        for i in range(sp.n_layers):
            H, KV = sp.heads(i), sp.kv_heads(i)
            rep = H // KV
            self._sums = {}
            hn = self.group_input(self.rms_norm(x, f"blk.{i}.attn_norm.weight"), i, 0)
            q = lin(hn, f"blk.{i}.attn_q.weight")
            k = lin(hn, f"blk.{i}.attn_k.weight")
            v = lin(hn, f"blk.{i}.attn_v.weight")
            q = g.op("Transpose", [g.op("Reshape", [q, g.i64([0, 0, H, hd])])], perm=[0, 2, 1, 3])
            k = g.op("Transpose", [g.op("Reshape", [k, g.i64([0, 0, KV, hd])])], perm=[0, 2, 1, 3])
            v = g.op("Transpose", [g.op("Reshape", [v, g.i64([0, 0, KV, hd])])], perm=[0, 2, 1, 3])
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            kall = g.op_to("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
            vall = g.op_to("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
            q5 = g.op("Reshape", [q, g.i64([0, KV, rep, -1, hd])])                     # [B, KV, rep, S, hd]
            k5 = g.op("Transpose", [g.op("Unsqueeze", [kall, g.i64([2])])], perm=[0, 1, 2, 4, 3])  # [B, KV, 1, hd, T]
            v5 = g.op("Unsqueeze", [vall, g.i64([2])])                                 # [B, KV, 1, T, hd]
            sc = g.op("Mul", [g.op("MatMul", [q5, k5]), scale])
            pr = g.op("Softmax", [g.op("Where", [allowed, sc, neg])], axis=-1)
            o = g.op("MatMul", [pr, v5])                                               # [B, KV, rep, S, hd]
            o = g.op("Transpose", [g.op("Reshape", [o, g.i64([0, H, -1, hd])])], perm=[0, 2, 1, 3])
            o = self.group_input(g.op("Reshape", [o, g.i64([0, 0, H * hd])]), i, 1)
            x = g.op("Add", [x, lin(o, f"blk.{i}.attn_output.weight")])
            self._sums = {}
            hn = self.group_input(self.rms_norm(x, f"blk.{i}.ffn_norm.weight"), i, 2)
            gate = lin(hn, f"blk.{i}.ffn_gate.weight")
            up = lin(hn, f"blk.{i}.ffn_up.weight")
            act = self.group_input(g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]), i, 3)
            self._sums = {}
            x = g.op("Add", [x, lin(act, f"blk.{i}.ffn_down.weight")])
        hn = self.rms_norm(x, "output_norm.weight")
        if "output.weight" in self.f.tensors:
            wout = self.dense_weight("output.weight", transpose=True)
        else:  # tied: the embedding, transposed in the graph (folded at load)
            e = emb if _tensor_dtype(self.f, "token_embd.weight") == np.float32 else g.cast(emb, self.FLOAT)
            wout = g.op("Transpose", [e], perm=[1, 0])
        g.op_to("MatMul", [hn, wout], "logits")
        tick("output")
        graph = helper.make_graph(g.nodes, f"wqedge_{sp.name}", inputs, outputs, g.inits)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="wqedge", producer_version="1")
        model.ir_version = 10
        props = {"wqedge.variant": self.variant, "wqedge.group_size": str(self.G),
                 "wqedge.effective_bits": f"{self.f.effective_bits:.6f}"}
        if self.f.format_version >= 2:
            props.update({"wqedge.rotation": self.f.rotation or "none", "wqedge.act_bits": str(self.act_bits)})
        if self.variant == "portable":
            props.update({"wqedge.lowering": self.lowering, "wqedge.accuracy_level": str(self.accuracy_level)})
        helper.set_model_props(model, props)
        return model


class _NativeExporter(_Exporter):
    """The native variant: one wqedge.ChunkLinear node per quantized linear (schema in cpp/src/ort_ops.cpp)."""
    variant = "native"
    domains = {NATIVE_DOMAIN: 1}

    def linear(self, x, name) -> str:
        lay = self.f.layout(name)
        actions = lay.actions
        if any(block_type(a).compact for a in actions):   # the op reads fp16-header kinds: the same weights repacked
            chunks = [expanded(c) for c in self.f.chunks(name)]
            rows = np.concatenate([pack_chunk(c) for c in chunks], axis=1)
            actions = [c.action for c in chunks]
        else:
            rows = np.asarray(self.f.tensors[name].data).view(np.uint8).reshape(lay.out_features, lay.row_bytes)
        prot = self.f.protected_indices(name)
        self._count("rows", rows.nbytes)
        attrs = dict(N=lay.out_features, K=lay.in_features, group_size=self.G,
                     chunk_actions=[block_type(a).code for a in actions])
        if len(prot):
            attrs.update(chunk_protected=lay.protected_counts, protected_columns=[int(c) for c in prot])
        w = self.g.init(name.replace(".weight", "").replace(".", "_") + "_rows", rows)
        y = self.g.op("ChunkLinear", [x, w], domain=NATIVE_DOMAIN, **attrs)
        node = self.g.nodes[-1]
        node.name = name  # libwqedge_ort's errors name the node: the GGUF tensor
        if len(prot):
            self._count("protected_columns", sum(a.ByteSize() for a in node.attribute if a.name == "protected_columns"))
        return y


def _check_options(lowering, accuracy_level):
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; known: {', '.join(LOWERINGS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level!r}")


def build_model(gguf_path, progress=None, lowering: str = "compact", accuracy_level: int = 0,
                variant: str = "portable"):
    """The onnx.ModelProto of a variant for a wqedge GGUF (in memory), and bytes per weight kind."""
    _check_options(lowering, accuracy_level)
    ex = (_NativeExporter if variant == "native" else _Exporter)(WqGGUF(gguf_path), lowering, accuracy_level)
    model = ex.build(progress)
    return model, ex.stats


def genai_config(spec, filename: str) -> dict:
    """A genai_config.json for onnxruntime-genai (decoder only; search defaults to greedy)."""
    return {"model": {"type": "llama", "context_length": spec.max_position_embeddings, "vocab_size": spec.vocab_size,
                      "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
                      "pad_token_id": spec.eos_token_id,
                      "decoder": {"filename": filename, "head_size": spec.head_dim, "hidden_size": spec.hidden_size,
                                  "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
                                  "num_hidden_layers": spec.n_layers,
                                  "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                             "position_ids": "position_ids",
                                             "past_key_names": "past_key_values.%d.key",
                                             "past_value_names": "past_key_values.%d.value"},
                                  "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                              "present_value_names": "present.%d.value"}}},
            "search": {"do_sample": False, "max_length": spec.max_position_embeddings}}


def _refuse_two_level(gguf_path) -> None:
    """The portable lowering has no graph for per-sub-block scales (q4s, q3s, q2s: MatMulNBits takes one scale
    per block, no per-block offset codes): say so before any work instead of writing a wrong graph."""
    f = WqGGUF(gguf_path)
    kinds = sorted({a for n in f.linear_names() for a in f.layout(n).actions if block_type(a).has_subscales})
    if kinds:
        raise ValueError(f"the portable ONNX export does not lower two-level block kinds ({', '.join(kinds)}) yet; "
                         "convert with one-scale kinds for ONNX (--no-two-level: the greedy allocator offers them by "
                         "default at 4 bits and up; or a one-scale --preset such as q4), or use --onnx-variant native")


def export_onnx(gguf_path, out_path, variant: str = "portable",
                progress: Callable[[int, int, str], None] | None = None, lowering: str = "compact",
                accuracy_level: int = 0) -> dict:
    """Write the ONNX model of a wqedge GGUF to out_path; returns a summary dict.

    variant "portable": stock onnxruntime (com.microsoft.MatMulNBits + standard operators).
    variant "native": one wqedge.ChunkLinear per quantized linear, holding the GGUF's row-block bytes; needs
      libwqedge_ort registered in onnxruntime (wqedge.runtime.onnx_session.make_session does it).
    progress(step, total, what) is called after each linear is lowered.
    lowering (portable only; docs/onnx.md has the measured costs):
      "compact" (default): q8/q4/q2 as MatMulNBits of their own width; q3/ternary/q1 packed at their own width
          and unpacked by standard operators (onnxruntime folds them into fp32 weights at session creation);
      "widen": q3 in 4-bit, ternary and q1 in 2-bit MatMulNBits (packed in memory; larger file);
      "int4": every quantized chunk in one 4-bit MatMulNBits per linear (q8 as two nibble planes, the rest
          widened) — the only MatMulNBits path onnxruntime's CPU runs fast in fp32 (accuracy_level 0).
    accuracy_level (portable only): MatMulNBits' attribute; 0 = fp32 (exact), 4 = int8 activations (fast 2- and 8-bit kernels,
      logits no longer within the parity tolerance of the reference in general).
    Weights go to an external data file `<out>.data` when they exceed ~1.8 GB (protobuf's 2 GiB limit).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; known: {', '.join(VARIANTS)}")
    _check_options(lowering, accuracy_level)
    if variant == "native" and (lowering, accuracy_level) != ("compact", 0):
        raise ValueError("lowering and accuracy_level apply to the portable variant; the native one has no options")
    if variant == "portable":
        _refuse_two_level(gguf_path)
    onnx = _onnx()
    out_path = Path(out_path)
    model, stats = build_model(gguf_path, progress, lowering, accuracy_level, variant)
    init_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = init_bytes > EXTERNAL_DATA_THRESHOLD
    data_name = out_path.name + ".data"
    with atomic_output(out_path) as tmp:
        if external:
            (out_path.parent / data_name).unlink(missing_ok=True)
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # the data file was written next to tmp under its final name
            onnx.checker.check_model(str(tmp), full_check=True)
        else:
            onnx.save_model(model, str(tmp))
            onnx.checker.check_model(model, full_check=True)
    spec = WqGGUF(gguf_path).spec
    (out_path.parent / "genai_config.json").write_text(json.dumps(genai_config(spec, out_path.name), indent=2))
    size = out_path.stat().st_size + ((out_path.parent / data_name).stat().st_size if external else 0)
    portable = variant == "portable"
    return {"path": str(out_path), "variant": variant, "lowering": lowering if portable else None,
            "accuracy_level": accuracy_level if portable else None, "external_data": external, "bytes": size,
            "initializer_bytes": init_bytes, "linear_bytes_by_kind": stats,
            "gguf_bytes": os.path.getsize(gguf_path)}
