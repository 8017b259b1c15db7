"""Structured pruning as a plan states it: which FFN channel groups and attention heads vanish, per layer.

Removing a structure deletes weights from the file, so a pruned model really is smaller: an FFN channel
group is rows of gate_proj and up_proj and the matching columns of down_proj; a query head is rows of
q_proj and columns of o_proj; a KV group is rows of k_proj and v_proj together with all its query heads.
What remains is a model with per-layer shapes (ModelSpec.layer_ff / layer_heads / layer_kv_heads), which
GGUF expresses with per-layer `feed_forward_length` / `head_count` / `head_count_kv` arrays.

Every kept KV group of a layer keeps the same number of query heads: llama.cpp, ONNX Runtime's attention
and our runtime all share one group size per layer. Plan JSON: docs/plan.md ("pruning"). numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .spec import ModelSpec, with_layer_shapes


class PruningError(ValueError):
    """Pruning that cannot be lowered: an index out of range, a layer left without heads, uneven groups."""


@dataclass
class LayerPruning:
    """What one decoder layer loses (original indices, ascending)."""
    layer: int
    ffn_groups: list[int] = field(default_factory=list)   # FFN channel groups of ffn_group_size channels
    heads: list[int] = field(default_factory=list)        # query heads, outside removed KV groups
    kv_groups: list[int] = field(default_factory=list)    # KV heads, removed with all their query heads

    def empty(self) -> bool:
        return not (self.ffn_groups or self.heads or self.kv_groups)


@dataclass
class Pruning:
    """The removed structures of a model whose original (unpruned) shape is given by the fields below."""
    ffn_group_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layers: dict[int, LayerPruning] = field(default_factory=dict)   # only layers that lose something

    @classmethod
    def for_spec(cls, spec: ModelSpec, ffn_group_size: int = 32,
                 layers: list[LayerPruning] | dict[int, LayerPruning] = ()) -> "Pruning":
        ls = layers.values() if isinstance(layers, dict) else layers
        return cls(ffn_group_size, spec.intermediate_size, spec.n_heads, spec.n_kv_heads, spec.head_dim,
                   {lp.layer: lp for lp in ls if not lp.empty()})

    def layer(self, i: int) -> LayerPruning:
        return self.layers.get(i) or LayerPruning(i)

    @property
    def group(self) -> int:
        """Query heads per KV head in the original model."""
        return self.n_heads // self.n_kv_heads

    def ffn_groups(self) -> list[tuple[int, int]]:
        """[start, end) channels of each FFN group; the last one is ragged when the size does not divide."""
        return [(s, min(s + self.ffn_group_size, self.intermediate_size))
                for s in range(0, self.intermediate_size, self.ffn_group_size)]

    # ------------------------------------------------------------ kept structures
    def kept_channels(self, i: int) -> np.ndarray:
        gone = set(self.layer(i).ffn_groups)
        return np.array([c for g, (s, e) in enumerate(self.ffn_groups()) if g not in gone for c in range(s, e)],
                        dtype=np.int64)

    def kept_kv(self, i: int) -> np.ndarray:
        gone = set(self.layer(i).kv_groups)
        return np.array([k for k in range(self.n_kv_heads) if k not in gone], dtype=np.int64)

    def kept_heads(self, i: int) -> np.ndarray:
        lp = self.layer(i)
        gone = set(lp.heads) | {h for k in lp.kv_groups for h in range(k * self.group, (k + 1) * self.group)}
        return np.array([h for h in range(self.n_heads) if h not in gone], dtype=np.int64)

    def _rows_of(self, heads: np.ndarray) -> np.ndarray:
        d = self.head_dim
        return (heads[:, None] * d + np.arange(d)[None, :]).reshape(-1)

    def kept(self, layer: int, proj: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(kept rows, kept columns) of projection `proj` (q_proj, ..., down_proj) of a layer; None = all."""
        if proj in ("q_proj", "o_proj"):
            idx = self._rows_of(self.kept_heads(layer))
            return (idx, None) if proj == "q_proj" else (None, idx)
        if proj in ("k_proj", "v_proj"):
            return self._rows_of(self.kept_kv(layer)), None
        ch = self.kept_channels(layer)
        return (None, ch) if proj == "down_proj" else (ch, None)

    def prune_weight(self, layer: int, proj: str, w):
        """The kept part of one linear's weight [out, in] (numpy array or torch tensor, original shape)."""
        rows, cols = self.kept(layer, proj)
        if rows is not None:
            w = w[rows.tolist()]
        if cols is not None:
            w = w[:, cols.tolist()]
        return w

    def unprune_weight(self, layer: int, proj: str, w, shape: tuple[int, int]):
        """The kept weight `w` (torch) back in the original shape, zero where structures were pruned: the
        unpruned model with them masked computes what the pruned one does."""
        rows, cols = self.kept(layer, proj)
        rows = np.arange(shape[0]) if rows is None else rows
        cols = np.arange(shape[1]) if cols is None else cols
        out = w.new_zeros(shape)
        out[np.ix_(rows, cols)] = w
        return out

    def mask(self, layer: int, proj: str, shape: tuple[int, int]) -> np.ndarray:
        """bool [out, in] of the original weight: True where the weight is kept."""
        m = np.zeros(shape, dtype=bool)
        rows, cols = self.kept(layer, proj)
        m[rows if rows is not None else slice(None), :] = True
        if cols is not None:
            keep = np.zeros(shape[1], dtype=bool)
            keep[cols] = True
            m &= keep[None, :]
        return m

    def pruned_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shape of the pruned model (per-layer arrays where layers differ)."""
        self.check_spec(spec)
        r = range(spec.n_layers)
        return with_layer_shapes(spec, [len(self.kept_channels(i)) for i in r], [len(self.kept_heads(i)) for i in r],
                                 [len(self.kept_kv(i)) for i in r])

    # ------------------------------------------------------------ validation
    def check_spec(self, spec: ModelSpec) -> None:
        if spec.uneven:
            raise PruningError("pruning applies to an evenly shaped (unpruned) model")
        mine = (self.intermediate_size, self.n_heads, self.n_kv_heads, self.head_dim)
        theirs = (spec.intermediate_size, spec.n_heads, spec.n_kv_heads, spec.head_dim)
        if mine != theirs:
            raise PruningError(f"pruning is for intermediate size, heads, KV heads, head dim {mine}, the model has "
                               f"{theirs}")
        bad = [i for i in self.layers if not (0 <= i < spec.n_layers)]
        if bad:
            raise PruningError(f"pruning names layer {bad[0]}, the model has {spec.n_layers} layers")

    def validate(self) -> "Pruning":
        """PruningError on anything that could not be lowered."""
        for name in ("ffn_group_size", "intermediate_size", "n_heads", "n_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PruningError(f"pruning.{name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise PruningError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} KV groups")
        n_groups = len(self.ffn_groups())
        for i, lp in sorted(self.layers.items()):
            if lp.layer != i or i < 0:
                raise PruningError(f"pruning entry for layer {lp.layer} filed under {i}")
            for what, idx, n in (("ffn_groups", lp.ffn_groups, n_groups), ("heads", lp.heads, self.n_heads),
                                 ("kv_groups", lp.kv_groups, self.n_kv_heads)):
                if any(not isinstance(x, int) or isinstance(x, bool) for x in idx):
                    raise PruningError(f"layer {i}: {what} must be integers, got {idx!r}")
                if len(set(idx)) != len(idx):
                    raise PruningError(f"layer {i}: {what} lists an index twice: {idx}")
                out = [x for x in idx if not 0 <= x < n]
                if out:
                    raise PruningError(f"layer {i}: {what} index {out[0]} is out of range [0, {n})")
            if len(lp.ffn_groups) == n_groups:
                raise PruningError(f"layer {i}: prunes all {n_groups} FFN channel groups; a layer keeps at least one")
            in_gone = [h for h in lp.heads if h // self.group in lp.kv_groups]
            if in_gone:
                raise PruningError(f"layer {i}: query head {in_gone[0]} belongs to removed KV group "
                                   f"{in_gone[0] // self.group}; list the group only")
            if len(lp.kv_groups) == self.n_kv_heads:
                raise PruningError(f"layer {i}: prunes every attention head (all {self.n_kv_heads} KV groups); "
                                   "a layer keeps at least one head")
            kept = self.kept_heads(i)
            per_group = {int(k): int(np.sum(kept // self.group == k)) for k in self.kept_kv(i)}
            if 0 in per_group.values():
                k = min(k for k, n in per_group.items() if n == 0)
                raise PruningError(f"layer {i}: prunes every query head of KV group {k}; remove the group "
                                   "(kv_groups) instead, with its key and value heads")
            if len(set(per_group.values())) > 1:
                raise PruningError(f"layer {i}: kept KV groups keep different numbers of query heads "
                                   f"({per_group}); every kept group of a layer must keep the same number "
                                   "(one group size per layer, as llama.cpp and the runtime run attention)")
        return self

    # ------------------------------------------------------------ accounting
    def original_shape(self, layer: int, proj: str, shape: tuple[int, int]) -> tuple[int, int]:
        """The unpruned [out, in] of a pruned linear of `shape`."""
        n, k = shape
        rows, cols = self.kept(layer, proj)
        full = {"q_proj": self.n_heads * self.head_dim, "o_proj": self.n_heads * self.head_dim,
                "k_proj": self.n_kv_heads * self.head_dim, "v_proj": self.n_kv_heads * self.head_dim}
        dim = full.get(proj, self.intermediate_size)
        return (dim if rows is not None else n, dim if cols is not None else k)

    def kept_shape(self, layer: int, proj: str, shape: tuple[int, int]) -> tuple[int, int]:
        """The pruned [out, in] of an unpruned linear of `shape`."""
        rows, cols = self.kept(layer, proj)
        return (len(rows) if rows is not None else shape[0], len(cols) if cols is not None else shape[1])

    def removed_counts(self, spec: ModelSpec) -> list[dict]:
        """Per layer: FFN channels, query heads and KV heads removed (for reports and `inspect`)."""
        return [{"layer": i, "ffn_channels": spec.intermediate_size - len(self.kept_channels(i)),
                 "heads": spec.n_heads - len(self.kept_heads(i)), "kv_heads": spec.n_kv_heads - len(self.kept_kv(i))}
                for i in range(spec.n_layers)]

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"ffn_group_size": self.ffn_group_size, "intermediate_size": self.intermediate_size,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "layers": [{"layer": i, "ffn_groups": sorted(lp.ffn_groups), "heads": sorted(lp.heads),
                            "kv_groups": sorted(lp.kv_groups)} for i, lp in sorted(self.layers.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "Pruning":
        if not isinstance(d, dict):
            raise PruningError(f"pruning must be an object, got {type(d).__name__}")
        try:
            layers = {}
            for e in d.get("layers", []):
                lp = LayerPruning(e["layer"], list(e.get("ffn_groups", [])), list(e.get("heads", [])),
                                  list(e.get("kv_groups", [])))
                if not isinstance(lp.layer, int) or lp.layer in layers:
                    raise PruningError(f"pruning lists layer {lp.layer!r} twice or it is not an integer")
                if not lp.empty():
                    layers[lp.layer] = lp
            p = cls(d["ffn_group_size"], d["intermediate_size"], d["n_heads"], d["n_kv_heads"], d["head_dim"], layers)
        except KeyError as e:
            raise PruningError(f"pruning lacks the field {e}") from None
        except TypeError as e:
            raise PruningError(f"malformed pruning ({e})") from None
        return p.validate()

