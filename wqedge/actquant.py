"""Activation fake quantization, and a PyTorch model whose decoder linears run x -> T(x) -> quantize -> W'.

`fake_quant` is the one activation quantizer: per token (last dimension), asymmetric, b bits, with an
integer zero point — what an int8-lane kernel computes (the 6- and 4-bit codes live in int8 lanes too).
The result is dequantized (float), so a float matmul afterwards gives the quantized model's numbers.

`QuantLinear` / `quantize_model` turn a transformers LlamaForCausalLM into the evaluated model of a
weight-and-activation plan: per transform group (wqedge.calib.INPUT_GROUPS) the input is transformed once
(wqedge.rotation.Transform, or nothing), quantized once, and fed to each linear of the group, whose weight
is the folded, (optionally) weight-quantized W'. Attention products, the KV cache, norms and the LM head
stay in float: this is the linear-layer part of RUQuant only.
"""
from __future__ import annotations

from typing import Callable

import torch

from .calib import INPUT_GROUPS

ACT_BITS = (4, 6, 8)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision the quantizer surrogates compute in: float64 for a float64 input (RUQuant stage 2's problem,
    which must not depend on the sums' order), else float32 (the runtime's)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fake_quant(x: torch.Tensor, bits: int | None, clip: float = 1.0) -> torch.Tensor:
    """Per-token asymmetric quantize-dequantize of x [..., d] at `bits` (None or >= 16: unchanged).

    Range [clip·min, clip·max] of each token, s = range / (2^b - 1), integer zero point z = round(-lo / s),
    q = clamp(round(x / s) + z, 0, 2^b - 1), x̂ = s (q - z). With clip = 1 every |x - x̂| <= s / 2.
    Gradients pass straight through (for stage-2 optimisation through the quantizer).
    """
    if bits is None or bits >= 16:
        return x
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS} (or 16), got {bits!r}")
    hi_code = (1 << bits) - 1
    xf = x.detach().to(work_dtype(x))
    lo = xf.amin(-1, keepdim=True) * clip
    hi = xf.amax(-1, keepdim=True) * clip
    s = ((hi - lo) / hi_code).clamp(min=1e-8)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(xf / s) + z, 0, hi_code)
    xq = (s * (q - z)).to(x.dtype)
    return x + (xq - x).detach() if x.requires_grad else xq


class GroupInput(torch.nn.Module):
    """The shared input step of one transform group: x -> T(x) -> fake_quant. q/k/v (gate/up) receive the
    same tensor object in a row, so the result for the last input is reused instead of recomputed."""

    def __init__(self, transform=None, act_bits: int | None = None, clip: float = 1.0):
        super().__init__()
        self.transform, self.act_bits, self.clip = transform, act_bits, clip
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = x if self.transform is None else self.transform.apply(x)
        y = fake_quant(y, self.act_bits, self.clip)
        self._last = (x, y)
        return y


class QuantLinear(torch.nn.Module):
    """y = W' · GroupInput(x): the folded (and weight-quantized) weight on the transformed, quantized input."""

    def __init__(self, weight: torch.Tensor, group_input: GroupInput):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        self.group_input = group_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.group_input(x), self.weight)


WeightFn = Callable[[str, torch.Tensor], torch.Tensor]   # (HF weight name, folded W') -> weight to use


def quantize_model(model, transforms: dict[tuple[int, int], object] | None = None, act_bits: int | None = None,
                   weight_fn: WeightFn | None = None, clip: float = 1.0, folded: bool = False):
    """Replace every decoder linear of `model` (a transformers LlamaForCausalLM, changed in place) by a
    QuantLinear. transforms[(layer, group index in INPUT_GROUPS)] is a Transform or absent (no rotation);
    `weight_fn(name, W')` quantizes a folded weight (None: keep it float); folded=True: the model's weights
    are folded already (a rotated file's, wqedge.reference). Returns the model."""
    transforms = transforms or {}
    for li, layer in enumerate(model.model.layers):
        for gi, group in enumerate(INPUT_GROUPS):
            t = transforms.get((li, gi))
            gin = GroupInput(t, act_bits, clip)
            for name in group:
                parent_name, attr = name.split(".")
                parent = getattr(layer, parent_name)
                w = getattr(parent, attr).weight.detach().float()
                if t is not None and not folded:
                    w = t.fold_into_weight(w)
                if weight_fn is not None:
                    w = weight_fn(f"model.layers.{li}.{name}.weight", w)
                setattr(parent, attr, QuantLinear(w, gin))
    return model
