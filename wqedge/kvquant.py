"""Quantized KV cache in the PyTorch reference (issue 15; docs/format.md "KV cache").

The runtime stores each token's K and V per KV head as 8- or 4-bit codes (wqedge.kv_format); this module applies
the identical quantize/dequantize to a transformers LLaMA, so that the reference's logits are what the runtime's
should be. K (after RoPE) and V are rotated per head by an orthonormal Walsh–Hadamard matrix before quantizing
(so the head's outlier dimensions spread over all of them and a uniform grid fits), quantized per token and group,
dequantized and rotated back. Rotating back K is the same as rotating Q at attention time (q·k = Hq·Hk), and
rotating back V the same as rotating the attention output back: the runtime does the latter, this does the former.
Quantization is per token, so fake-quantizing every token's K/V before attention equals storing them quantized.
"""
from __future__ import annotations

import types

import torch

from .kv_format import KVCacheSpec, hadamard_block

__all__ = ["hadamard", "fake_quant_kv", "kv_round_trip", "apply_kv_cache"]


def hadamard(head_dim: int) -> torch.Tensor:
    """The head's rotation (float64, orthonormal, symmetric: its own inverse): the Walsh–Hadamard matrix for a
    power-of-two head_dim, else block-diagonal with Hadamard blocks of the largest power of two dividing it."""
    b = hadamard_block(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / b ** 0.5
    return torch.block_diag(*[h] * (head_dim // b))


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ H for H = hadamard(x.shape[-1]) by the butterfly the runtime uses (same additions, same order), in x's
    dtype: pairs (i, i + h) for h = 1, 2, .. block/2, then scaled by 1/sqrt(block)."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(*y.shape[:-1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(*y.shape[:-3], block)
        h *= 2
    return (y * torch.tensor(1.0 / block ** 0.5, dtype=x.dtype)).reshape(shape)


def fake_quant_kv(x: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """Quantize-dequantize x [..., head_dim] (float32) per group of spec.group(head_dim) values along the last
    dimension, exactly as the runtime (cpp/src/kvcache.cpp kv_quantize): parameters computed in float32 and
    stored as fp16, codes by round half to even. A 16-bit cache holds each value as fp16 (round half to even)."""
    if spec.bits == 16:
        return x.half().to(x.dtype)
    hd = x.shape[-1]
    g = spec.group(hd)
    y = x.float().reshape(*x.shape[:-1], hd // g, g)
    qmax = float((1 << spec.bits) - 1)
    if spec.symmetric:
        half = float((1 << (spec.bits - 1)) - 1)
        amax = y.abs().amax(-1, keepdim=True)
        d = (amax / half).half().float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.round(y * inv), -half, half)
        out = q * d
    else:
        mn, mx = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
        m = mn.half().float()
        d = ((mx - m) / qmax).half().float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.round((y - m) * inv), 0.0, qmax)
        out = q * d + m
    return out.reshape(x.shape).to(x.dtype)


def kv_round_trip(x: torch.Tensor, spec: KVCacheSpec, rotate: bool) -> torch.Tensor:
    """What the cache gives back for x [..., head_dim], in x's (unrotated) space."""
    if not rotate or spec.rotation == "none":
        return fake_quant_kv(x, spec)
    b = hadamard_block(x.shape[-1])
    return fwht(fake_quant_kv(fwht(x.float(), b), spec), b).to(x.dtype)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                       past_key_values=None, **kwargs):
    """LlamaAttention.forward (transformers 5) with the KV cache's quantization between RoPE and the cache."""
    from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                          eager_attention_forward)
    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    spec: KVCacheSpec = self.wqedge_kv_cache
    k = kv_round_trip(k, spec, spec.rotate_k)
    v = kv_round_trip(v, spec, spec.rotate_v)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def apply_kv_cache(model, spec: KVCacheSpec | None):
    """Give every attention layer of a transformers LLaMA the quantized KV cache `spec` (None or float: none).
    The model is changed in place and returned."""
    if spec is None or spec.bits is None:
        return model
    for layer in model.model.layers:
        att = layer.self_attn
        att.wqedge_kv_cache = spec
        att.forward = types.MethodType(_attention_forward, att)
    return model
