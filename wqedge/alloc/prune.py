"""Choose structures to prune from their loss-aware damage (wqedge.structure_damage), up to a fraction of weights.

The sequential step "prune first, then allocate bits": repeatedly remove the candidate of least damage per
removed decoder weight until `fraction` of the model's linear weights are gone. Candidates per layer:
- an FFN channel group (its rows of gate/up and columns of down);
- a head round: one more query head from every kept KV group (the least damaging one in each), so the groups
  stay even as wqedge.pruning requires; offered while every kept group keeps at least one head after it;
- a whole KV group (its keys, values and remaining query heads), while the layer keeps another; its damage is
  the group's less that of its query heads already removed.
llama.cpp's k- and i-quant types read a row in blocks of 256 columns. With FFN groups of a multiple of 256
(`--prune-group 256`, which keeps ffn_down's input a multiple of 256) and an attention width (query heads x
head_dim) that is one, a head step must remove a multiple of 256 columns too, so attn_output's input stays one:
rounds come in bundles of the fewest rounds that do, and a KV group goes only when its remaining heads span a
multiple of 256.
Damages add up (the diagonal approximation the bit allocators make as well).
"""
from __future__ import annotations

import numpy as np

from ..pruning import LayerPruning, Pruning
from ..spec import ModelSpec
from ..structure_damage import StructureDamage

KINDS = ("ffn", "heads")
BLOCK_COLUMNS = 256   # llama.cpp's k- and i-quant row blocks


def select_pruning(spec: ModelSpec, damage: StructureDamage, fraction: float, kinds=KINDS) -> Pruning:
    """The Pruning of least summed damage that removes at most `fraction` of the decoder linear weights."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown structure kind {sorted(unknown)[0]!r} (known: {', '.join(KINDS)})")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"pruning fraction must be in [0, 1), got {fraction}")
    pr = Pruning.for_spec(spec, damage.ffn_group_size)
    D, hd = spec.hidden_size, spec.head_dim
    total = sum(lin.out_features * lin.in_features for lin in spec.linears())
    budget = int(fraction * total)
    layers = {i: LayerPruning(i) for i in range(spec.n_layers)}
    removed = 0
    group = spec.n_heads // spec.n_kv_heads
    align = damage.ffn_group_size % BLOCK_COLUMNS == 0 and (spec.n_heads * hd) % BLOCK_COLUMNS == 0

    def rounds_per_step(n_kv: int) -> int:
        """Head rounds per step: 1, or with `align` the fewest whose columns (rounds x KV groups x head_dim) are a
        multiple of 256; 0 when more than a group's heads would be needed."""
        for r in range(1, group + 1):
            if not align or (r * n_kv * hd) % BLOCK_COLUMNS == 0:
                return r
        return 0

    def candidates():
        for i, lp in layers.items():
            if "ffn" in kinds:
                bounds = pr.ffn_groups()
                if len(lp.ffn_groups) + 1 < len(bounds):
                    for g, (s, e) in enumerate(bounds):
                        if g not in lp.ffn_groups:
                            yield damage.ffn[i, g], 3 * D * (e - s), ("ffn", i, g)
            if "heads" in kinds:
                kept_kv = [k for k in range(spec.n_kv_heads) if k not in lp.kv_groups]
                kept = {k: [h for h in range(k * group, (k + 1) * group) if h not in lp.heads] for k in kept_kv}
                r = rounds_per_step(len(kept_kv))
                if r and all(len(v) > r for v in kept.values()):
                    pick = [h for v in kept.values() for h in sorted(v, key=lambda h: damage.heads[i, h])[:r]]
                    yield sum(damage.heads[i, h] for h in pick), 2 * D * hd * len(pick), ("round", i, pick)
                if len(kept_kv) > 1:
                    for k, hs in kept.items():   # the group's damage less that of its heads already gone
                        if align and (len(hs) * hd) % BLOCK_COLUMNS:
                            continue
                        gone = sum(damage.heads[i, h] for h in lp.heads if h // group == k)
                        yield max(0.0, damage.kv_groups[i, k] - gone), 2 * D * hd * (len(hs) + 1), ("kv", i, k)

    while True:
        best = None
        for dmg, n, what in candidates():
            if removed + n <= budget and (best is None or dmg / n < best[0] / best[1]):
                best = (dmg, n, what)
        if best is None:
            break
        kind, i, x = best[2]
        lp = layers[i]
        if kind == "ffn":
            lp.ffn_groups.append(x)
        elif kind == "round":
            lp.heads.extend(x)
        else:
            lp.heads = [h for h in lp.heads if h // group != x]
            lp.kv_groups.append(x)
        removed += best[1]
    for lp in layers.values():
        for idx in (lp.ffn_groups, lp.heads, lp.kv_groups):
            idx.sort()
    pr.layers = {i: lp for i, lp in layers.items() if not lp.empty()}
    return pr.validate()


def predicted_damage(damage: StructureDamage, pruning: Pruning) -> float:
    """Σ damage of the pruned structures (nats per token, additive approximation)."""
    tot = 0.0
    for i, lp in pruning.layers.items():
        tot += float(np.sum(damage.ffn[i, lp.ffn_groups])) + float(np.sum(damage.heads[i, lp.heads]))
        tot += float(np.sum(damage.kv_groups[i, lp.kv_groups]))
    return tot
