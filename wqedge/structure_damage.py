"""Loss-aware damage of removing a structure (FFN channel group, query head, KV group): Fisher on structure masks.

A structure s is a set of input columns c_s of down_proj (FFN channels) or o_proj (a head's outputs): removing
it multiplies those inputs by a mask m_s = 0 instead of 1. With a_t the linear's input at token t and
g_t = dℓ_t/dy_t the gradient of the per-token LM loss at its output (the same backward pass and scaling as
wqedge.calib.gradient_stats, whose squares weight the quantization damage), the mask gradient per token is

    dℓ_t/dm_s = Σ_{j ∈ c_s} a_tj (Wᵀ g_t)_j

and the damage is the second-order term of the loss change, as for quantization (wqedge.damage):

    damage(s) = ½ E_t[(dℓ_t/dm_s)²]          (nats per token; the empirical Fisher of the mask)

where damage.py factors the same expectation Kronecker-wise over Δw = ŵ − w. A KV group's mask covers all its
query heads' columns (removing its keys and values silences exactly those heads). `grad` is E_t[dℓ_t/dm_s],
the first-order term, kept for checks and reports. Rows of gate/up and of q/k/v need no term of their own:
their outputs reach the loss only through these columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .calib import gradient_stats


@dataclass
class StructureDamage:
    """Per layer and structure: damage (½ E[(dℓ/dm)²]) and mean mask gradient E[dℓ/dm], nats per token."""
    ffn_group_size: int
    ffn: np.ndarray        # float64 [L, n_groups]
    heads: np.ndarray      # float64 [L, n_heads]
    kv_groups: np.ndarray  # float64 [L, n_kv_heads]
    ffn_grad: np.ndarray
    heads_grad: np.ndarray
    kv_grad: np.ndarray
    n_tokens: int


def _group_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """[T, K] -> [T, ⌈K/size⌉]: sums over consecutive column groups (the last one ragged)."""
    k = x.shape[-1]
    pad = (-k) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, size).sum(-1)


def structure_damage(model, tokens: torch.Tensor, ffn_group_size: int = 32, device=None, batch_size: int = 1,
                     progress: Callable[[str], None] | None = None) -> StructureDamage:
    """Damage of every FFN channel group, query head and KV group of an HF LlamaForCausalLM over `tokens`."""
    cfg = model.config
    L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    n_groups = math.ceil(cfg.intermediate_size / ffn_group_size)
    acc = {k: torch.zeros(L, n, dtype=torch.float64) for k, n in
           (("ffn", n_groups), ("heads", H), ("kv", KV))}
    grads = {k: torch.zeros_like(v) for k, v in acc.items()}
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def add(key, li, contrib):          # contrib [T, n]: dℓ_t/dm per token and structure
        acc[key][li] += (contrib.double() ** 2).sum(0).cpu()
        grads[key][li] += contrib.double().sum(0).cpu()

    for li, layer in enumerate(model.model.layers):
        for proj in (layer.mlp.down_proj, layer.self_attn.o_proj):
            kind = "ffn" if proj is layer.mlp.down_proj else "attn"

            def pre(mod, args, li=li, kind=kind):
                inputs[(li, kind)] = args[0].detach()

            def bwd(mod, gin, gout, li=li, kind=kind):
                b, t = gout[0].shape[:2]       # d(mean loss)/dy x the batch's B·(T−1) tokens = d(per-token loss)/dy
                g = gout[0].reshape(b * t, -1).float() * (b * (t - 1))
                a = inputs.pop((li, kind)).reshape(b * t, -1).float()
                per_col = a * (g @ mod.weight.float())          # [T, K]: a_tj (Wᵀ g_t)_j
                if kind == "ffn":
                    add("ffn", li, _group_sum(per_col, ffn_group_size))
                else:
                    per_head = _group_sum(per_col, hd)          # [T, H]
                    add("heads", li, per_head)
                    add("kv", li, _group_sum(per_head, H // KV))
            hooks.append(proj.register_forward_pre_hook(pre))
            hooks.append(proj.register_full_backward_hook(bwd))
    try:   # gradient_stats runs the backward passes (and scales its own statistics the same way)
        gs = gradient_stats(model, tokens, device=device, batch_size=batch_size, progress=progress)
    finally:
        for hk in hooks:
            hk.remove()
    n_tok = next(iter(gs.values())).n_tokens
    n = max(n_tok, 1)
    return StructureDamage(ffn_group_size, *(0.5 * acc[k].numpy() / n for k in ("ffn", "heads", "kv")),
                           *(grads[k].numpy() / n for k in ("ffn", "heads", "kv")), n_tok)
