"""A checkpoint seen through a pruning: the unpruned shapes, with every removed structure's weights zeroed.

Why: RUQuant's o and down transforms must be built on, and folded into, the heads and FFN channels a pruning
keeps (wqedge.rotation.RotatedCheckpoint with `columns`), and everything the pipeline measures on the way
(calibration activations, XᵀX, gradients, error feedback) must come from the model the pruned file computes. The
masked model computes exactly that: a removed FFN group's gate/up rows are zero, so its down input is zero; a
removed query head's o_proj columns are zero (its q rows too), so it adds nothing; a removed KV group's k/v rows and
its query heads go the same way. Keeping the unpruned shapes lets every consumer that already slices a pruning
plan's kept rows and columns (Plan.prune_weight, the joint search's statistics) work on it unchanged.
"""
from __future__ import annotations

import torch

from .checkpoint import CheckpointView
from .pruning import Pruning


class MaskedCheckpoint(CheckpointView):
    """`ckpt` with `pruning`'s removed structures zeroed in every decoder linear, as read (`get`,
    `linear_weight`) and as loaded (`load_hf_model`, `load_planning_model`); everything else is `ckpt`'s,
    including its fingerprint (a plan made on it is a plan for `ckpt`)."""

    def __init__(self, ckpt, pruning: Pruning):
        pruning.check_spec(ckpt.spec)
        super().__init__(ckpt)
        self.pruning = pruning
        self._where = {lin.hf_name: (lin.layer, lin.proj) for lin in ckpt.spec.linears()}

    def _mask(self, name: str, w: torch.Tensor) -> torch.Tensor:
        where = self._where.get(name)
        if where is None or where[0] not in self.pruning.layers:
            return w
        keep = torch.from_numpy(self.pruning.mask(*where, tuple(w.shape)))
        return w * keep.to(w.device, w.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._mask(name, self._ckpt.get(name))

    def view_key(self) -> str:
        """The pruning."""
        import json
        return f"masked:{json.dumps(self.pruning.to_dict(), sort_keys=True)}"

    def linear_weight(self, linear) -> torch.Tensor:
        name = linear if isinstance(linear, str) else linear.hf_name
        return self._mask(name, self._ckpt.linear_weight(linear))

    def transform_model(self, model):
        return self.mask_model(model)

    def mask_model(self, model):
        """Zero the removed structures of a transformers model of the unpruned shape, in place; returns it."""
        with torch.no_grad():
            for name in self._where:
                mod = model.get_submodule(name.removesuffix(".weight"))
                mod.weight.data = self._mask(name, mod.weight.data)
        return model

