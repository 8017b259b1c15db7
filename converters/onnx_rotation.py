"""The RUQuant group input of a rotated wqedge GGUF (format version 2 or 3) as stock ONNX operators.

A rotated file's folded weights are only right for transformed inputs, so before each transform group's
linears (q/k/v, o, gate/up, down) the exported graph computes what wqedge.reference runs
(wqedge.rotation.Transform.apply, then wqedge.actquant.fake_quant) and the C++ runtime's group_input:

    x' = H R2 P R1 (x / s)                       (docs/ruquant.md; s, H optional)
    x̂  = s_t (clamp(round(x' / s_t) + z, 0, 2^b - 1) - z)   per token, when the file's act bits b < 8

with the same operations in the same order, in fp32:
  x / s        Div by the stored divisors (not Mul by their reciprocals: the reference divides);
  R1, R2       the shared B x B matrix applied to every full block as one MatMul on a [.., nf, B] Reshape of
               the first nf B channels (the matrix is stored once, 2 d B multiply-adds a token), the ragged
               tail block (d mod B channels, or all of them when d < B) by its own matrix, then Concat;
               int8 matrices (format 3: diag(scale) codes): MatMul by the codes (as float32), then Mul by
               the row scales, the runtime's order;
  P            Gather along the last axis;
  H            x - 2 (x . v) v: MatMul with v as a [d, 1] column, Mul, Mul, Sub (left out when v = 0);
  fake quant   ReduceMin / ReduceMax over the token, s_t = max((hi - lo) / (2^b - 1), 1e-8),
               z = Round(-lo / s_t), Round, Add, Clip, Sub, Mul (ONNX Round is half to even, like torch.round
               and nearbyint).
Computed once per group; every linear of the group reads the result. numpy and onnx only (no torch).
"""
from __future__ import annotations

import numpy as np

from wqedge.rotation_format import StoredTransform, is_identity


def _int_product(g, x: str, codes: np.ndarray, scale: np.ndarray, stem: str) -> str:
    """diag(scale) codes applied along the last axis, in the runtime's order: (x codesᵀ) · scale (the codes
    as float32 initializers: ONNX MatMul takes no int8 x float)."""
    acc = g.op("MatMul", [x, g.init(stem, np.ascontiguousarray(codes.T, dtype=np.float32))])
    return g.op("Mul", [acc, g.init(stem + "_scale", scale.astype(np.float32))])


def _block_product(g, x, st: StoredTransform, field: str, dim: int, stem: str) -> str:
    """R x along the last axis for a block-diagonal R: matrix `field` (r1 / r2) on each whole block of B
    channels, its tail matrix on the rest."""
    full, tail = getattr(st, field), getattr(st, field + "_tail")
    b = full.shape[0]
    nf = dim // b

    def product(v, m, scale, name):
        if scale is not None:
            return _int_product(g, v, m, scale, name)
        return g.op("MatMul", [v, g.init(name, np.ascontiguousarray(m.T, dtype=np.float32))])
    parts = []
    if nf:
        head = x if nf * b == dim else g.slice_last(x, 0, nf * b)
        r = g.op("Reshape", [head, g.i64([0, 0, nf, b])])
        r = product(r, full, getattr(st, field + "_scale"), stem)
        parts.append(g.op("Reshape", [r, g.i64([0, 0, nf * b])]))
    if tail is not None:
        rest = x if nf == 0 else g.slice_last(x, nf * b, dim)
        parts.append(product(rest, tail, getattr(st, field + "_tail_scale"), stem + "_tail"))
    return parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=-1)


def lower_transform(g, x: str, st: StoredTransform, stem: str) -> str:
    """x' = H R2 P R1 (x / s) of x [batch, seq, d] (the graph builder `g` of onnx_export)."""
    d = st.dim
    if st.smooth is not None:
        x = g.op("Div", [x, g.init(stem + "_smooth", st.smooth.astype(np.float32))])
    x = _block_product(g, x, st, "r1", d, stem + "_r1t")
    x = g.op("Gather", [x, g.init(stem + "_perm", st.perm.astype(np.int64))], axis=-1)
    x = _block_product(g, x, st, "r2", d, stem + "_r2t")
    v = st.householder.astype(np.float32)
    if v.any():   # all zero: no reflection (the reference's x - 0 is x exactly)
        dot = g.op("MatMul", [x, g.init(stem + "_hh", v.reshape(d, 1))])            # [.., 1]
        x = g.op("Sub", [x, g.op("Mul", [g.op("Mul", [dot, g.f32(2.0)]), g.init(stem + "_v", v)])])
    return x


def lower_act_quant(g, x: str, bits: int) -> str:
    """Per-token asymmetric quantize-dequantize of x [.., d] at `bits` (wqedge.actquant.fake_quant, clip 1)."""
    hc = g.f32(float((1 << bits) - 1))
    lo = g.op("ReduceMin", [x, g.i64([-1])], keepdims=1)
    hi = g.op("ReduceMax", [x, g.i64([-1])], keepdims=1)
    s = g.op("Max", [g.op("Div", [g.op("Sub", [hi, lo]), hc]), g.f32(1e-8)])
    z = g.op("Round", [g.op("Div", [g.op("Neg", [lo]), s])])
    q = g.op("Clip", [g.op("Add", [g.op("Round", [g.op("Div", [x, s])]), z]), g.f32(0.0), hc])
    return g.op("Mul", [s, g.op("Sub", [q, z])])


def lower_group_input(g, x: str, st: StoredTransform | None, act_bits: int | None, stem: str) -> str:
    """The input every linear of one group reads: the transform (if any), then the activation quantizer when
    act_bits < 8 (8 bits: float, as the reference and the runtime's float path). An identity transform (method
    "hadamard"'s untouched groups) is left out, as the C++ runtime skips it."""
    if st is not None and not is_identity(st):
        x = lower_transform(g, x, st, stem)
    if act_bits is not None and act_bits < 8:
        x = lower_act_quant(g, x, act_bits)
    return x


def group_input_model(st: StoredTransform | None, act_bits: int | None):
    """A standalone onnx.ModelProto x [batch, seq, d] -> the group input (for tests and inspection)."""
    from onnx import TensorProto, helper

    from wqedge.converters.onnx_export import OPSET, _Graph
    g = _Graph()
    d = st.dim if st is not None else "d"
    y = lower_group_input(g, "x", st, act_bits, "rot")
    g.op_to("Identity", [y], "y")
    io = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", d])  # noqa: E731
    graph = helper.make_graph(g.nodes, "wqedge_group_input", [io("x")], [io("y")], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="wqedge")
    model.ir_version = 10
    return model
