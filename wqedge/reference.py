"""The PyTorch reference: a GGUF read back, dequantized, and rebuilt as a transformers LlamaForCausalLM.

Every runtime (ours in C++, ONNX Runtime, llama.cpp) is checked against this model: it runs
exactly the weights the file defines, in fp32, through the Hugging Face implementation.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .runtime.gguf_reader import WqGGUF
from .spec import ModelSpec, other_tensors


def _irregular(spec: ModelSpec) -> bool:
    """A (pruned) shape LlamaConfig cannot state: per-layer shapes, or heads that do not divide the hidden size."""
    return spec.uneven or spec.hidden_size % spec.n_heads != 0


def hf_config(spec: ModelSpec) -> LlamaConfig:
    """A transformers LlamaConfig for a spec (RoPE given in both the v4 and the v5 form); for an irregular
    spec, one whose layers build_model reshapes (its head counts are placeholders)."""
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    heads, kv = (1, 1) if _irregular(spec) else (spec.n_heads, spec.n_kv_heads)  # then shaped per layer
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, rope_parameters=rope,
        attention_bias=False, mlp_bias=False,
    )
    return cfg


def build_model(spec: ModelSpec, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Instantiate a fp32 LlamaForCausalLM and load `state` (Hugging Face names) into it, strictly."""
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(spec))
        if _irregular(spec):
            _shape_layers(model, spec)
    model = model.to_empty(device="cpu").to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (spec.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"reference model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if spec.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # rebuild inv_freq (was on meta)
    return model.eval()


def _shape_layers(model: LlamaForCausalLM, spec: ModelSpec) -> None:
    """Give each decoder layer its own (pruned) shape: transformers' LlamaAttention reshapes by head_dim and
    repeats KV heads by its num_key_value_groups, so smaller projections and that one number suffice."""
    from torch import nn
    h, d = spec.hidden_size, spec.head_dim
    for i, layer in enumerate(model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        q, kv, f = spec.heads(i) * d, spec.kv_heads(i) * d, spec.ff(i)
        att.q_proj, att.o_proj = nn.Linear(h, q, bias=False), nn.Linear(q, h, bias=False)
        att.k_proj, att.v_proj = nn.Linear(h, kv, bias=False), nn.Linear(h, kv, bias=False)
        att.num_key_value_groups = spec.heads(i) // spec.kv_heads(i)
        mlp.gate_proj, mlp.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        mlp.down_proj = nn.Linear(f, h, bias=False)


def load_reference(path, kv_cache=None) -> LlamaForCausalLM:
    """The dequantized model of a wqedge GGUF, as fp32 transformers model. A rotated file's linears (format
    version 2, docs/format.md "Rotations") run x -> T(x) -> per-token activation quantization at the file's
    act bits when 6 or 4 (wqedge.actquant) -> the folded weights; at 8 bits activations stay float, as for
    every other file (the runtime's int8 path is checked against float). The KV cache is quantized as the
    file's wqedge.kv_cache keys say (wqedge.kvquant), or as `kv_cache` (a wqedge.kv_format.KVCacheSpec; bits
    None = float) when given, as the runtime's --kv-bits overrides the file."""
    f = WqGGUF(path)
    kv = f.kv_cache if kv_cache is None else kv_cache
    state = {hf: torch.from_numpy(f.dense(name)) for hf, name, _ in other_tensors(f.spec)}
    for lin in f.spec.linears():
        state[lin.hf_name] = torch.from_numpy(f.dequantize_linear(lin.gguf_name))
    model = build_model(f.spec, state)
    if f.rotation is not None or f.act_bits != 8:
        from .actquant import quantize_model
        from .rotation import from_stored
        transforms = {k: from_stored(v) for k, v in f.transforms().items()}
        model = quantize_model(model, transforms, None if f.act_bits == 8 else f.act_bits, folded=True)
    if kv.quantized:
        from .kvquant import apply_kv_cache
        model = apply_kv_cache(model, kv)
    return model


def logits_fn(model: LlamaForCausalLM):
    """Adapter for wqedge.perplexity: int32 windows -> float32 logits."""
    def fn(windows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.asarray(windows, dtype=np.int64))).logits.float().numpy()
    return fn
