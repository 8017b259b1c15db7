"""Rotated tiny models for the RUQuant file tests (test_ruquant_runtime, test_onnx_rotated): seeded synthetic
transforms and uniform plans, so both test files build the same kind of file the same way."""
from __future__ import annotations

import torch

from wqedge.plan import Plan
from wqedge.rotation import BLOCK, build_transform, rotation_config, smooth_scales
from wqedge.units import chunk_bounds


def outlier_acts(d: int, seed: int, n: int = 256) -> torch.Tensor:
    """n seeded activations of width d with three outlier channels (x30)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:3]] *= 30
    return x


def synthetic_transforms(ckpt, block: int = BLOCK) -> dict:
    """{(layer, group): Transform} of block size `block` from outlier_acts (build_transform, no calibration); layer
    1's gate/up group smoothed, so the optional divisor path is exercised."""
    s = ckpt.spec
    widths = (s.hidden_size, s.n_heads * s.head_dim, s.hidden_size, s.intermediate_size)
    out = {}
    for li in range(s.n_layers):
        for gi, d in enumerate(widths):
            x = outlier_acts(d, 10 * li + gi)
            sm = None
            if (li, gi) == (1, 2):
                w = [ckpt.linear_weight(f"model.layers.1.mlp.{p}_proj.weight") for p in ("gate", "up")]
                sm = smooth_scales(x.abs().amax(0), w)
            out[(li, gi)] = build_transform(x, seed=li * 16 + gi, block=block, smooth=sm)
    return out


def uniform_plan(ckpt, group: int, action: str, act_bits: int = 8, rotated: bool = True, block: int = BLOCK) -> Plan:
    """`action` on every chunk of group `group`, with the rotation config (of block size `block`, when rotated) and
    act bits recorded."""
    acts = {lin.hf_name: [action] * len(chunk_bounds(lin.in_features, group)) for lin in ckpt.spec.linears()}
    # any budget (32: fp16 chunks of ragged widths count their padding), then the plan's own bits as its budget
    plan = Plan.from_actions(ckpt.spec.linears(), group, 32.0, "uniform", acts, model_fingerprint=ckpt.fingerprint())
    plan.budget_bits = plan.effective_bits()
    plan.rotation, plan.act_bits = (rotation_config(block=block) if rotated else None), act_bits
    return plan.validate()
