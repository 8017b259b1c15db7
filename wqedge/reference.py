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


def hf_config(spec: ModelSpec) -> LlamaConfig:
    """A transformers LlamaConfig for a spec (RoPE given in both the v4 and the v5 form)."""
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    cfg = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
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
    model = model.to_empty(device="cpu").to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (spec.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"reference model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if spec.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # rebuild inv_freq (was on meta)
    return model.eval()


def load_reference(path) -> LlamaForCausalLM:
    """The dequantized model of a wqedge GGUF, as fp32 transformers model."""
    f = WqGGUF(path)
    state = {hf: torch.from_numpy(f.dense(name)) for hf, name, _ in other_tensors(f.spec)}
    for lin in f.spec.linears():
        state[lin.hf_name] = torch.from_numpy(f.dequantize_linear(lin.gguf_name))
    return build_model(f.spec, state)


def logits_fn(model: LlamaForCausalLM):
    """Adapter for wqedge.perplexity: int32 windows -> float32 logits."""
    def fn(windows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.asarray(windows, dtype=np.int64))).logits.float().numpy()
    return fn
