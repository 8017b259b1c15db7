"""Joint structured pruning and bit allocation under one byte budget (issue 16; METHODS.md §4).

The budget is one number: stored bits over the *unpruned* model's decoder weights. A pruned structure is a
0-bit action on its weights, so every weight pruned frees bits that the knapsack spends on wider codes elsewhere.
The search runs over the amount pruned: for each fraction f of weights (0, step, ..., max_prune), the
structures of least loss-aware damage per weight are pruned (wqedge.alloc.prune.select_pruning on
wqedge.structure_damage), the damage table is rebuilt for the pruned shapes (a pruned group's chunks cost
nothing: gate/up rows, q/k/v rows leave their chunks; down/o chunks are re-cut from the kept columns), and the
greedy knapsack allocates the whole budget over what is left. The plan of least predicted total damage
(chunk damage + structure damage, both second-order nats/token estimates from the same LM-loss gradients)
wins; f = 0 is the quantization-only plan, so the joint search never predicts worse than it.

Approximations, stated: the pruned model's chunk damages use the unpruned model's statistics restricted to
the kept rows and columns, and damages add.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..pruning import Pruning
from .greedy import greedy_allocate
from .prune import KINDS, predicted_damage, select_pruning

DEFAULT_STEP = 0.05


@dataclasses.dataclass
class JointResult:
    pruning: Pruning | None
    table: object              # the DamageTable the choice indexes (pruned shapes)
    choice: np.ndarray
    predicted: float           # chunk damage + structure damage, nats/token
    trials: list[dict]         # per fraction tried: fraction, weights pruned, predicted damages


def _sliced_stats(stats: dict | None, pruning: Pruning, names: dict[str, tuple[int, str]], what: str):
    """Input (columns) or gradient (rows) statistics of the unpruned model restricted to the kept part."""
    if not stats:
        return stats
    out = {}
    for name, st in stats.items():
        rows, cols = pruning.kept(*names[name])
        if what == "input":
            if cols is None:
                out[name] = st
                continue
            c = cols.tolist()
            out[name] = dataclasses.replace(st, diag=st.diag[c], mean_abs=st.mean_abs[c], max_abs=st.max_abs[c],
                                            xtx=None if st.xtx is None else st.xtx[c][:, c])
        else:
            out[name] = st if rows is None else dataclasses.replace(st, g2=st.g2[rows.tolist()], fisher=None)
    return out


def pruned_allocation(ckpt, table, ctx, budget_bits: float, structure_damage, pruning: Pruning | None):
    """`pruning` applied, the damage table rebuilt for the pruned shapes, and the greedy knapsack at the same
    stored bits (budget_bits over the unpruned weights): (table, choice, chunk damage, structure damage).
    PlanError when the pruned model cannot meet the budget."""
    from ..damage import build_damage_table

    if pruning is None:
        t = table
    else:
        names = {lin.hf_name: (lin.layer, lin.proj) for lin in ckpt.spec.linears()}
        o = ctx.opts
        t = build_damage_table(pruning.pruned_spec(ckpt.spec).linears(),
                               lambda lin: pruning.prune_weight(lin.layer, lin.proj, ckpt.linear_weight(lin.hf_name)),
                               table.group_size, _sliced_stats(ctx.input_stats, pruning, names, "input"),
                               _sliced_stats(ctx.grad_stats, pruning, names, "grad"), kind=table.kind,
                               device=ctx.device, max_rows=o["max_rows"], feedback=o["feedback_damage"],
                               protect=tuple(o["protect"]),
                               **({"actions": tuple(o["actions"])} if o.get("actions") else {}))  # as prepare offered
    choice = greedy_allocate(t, table.budget_cap(budget_bits) / t.n_weights)  # same stored bits as unpruned
    s_dmg = 0.0 if pruning is None else predicted_damage(structure_damage, pruning)
    return t, choice, t.plan_damage(choice), s_dmg


def joint_allocate(ckpt, table, ctx, budget_bits: float, structure_damage, kinds=KINDS, max_prune: float = 0.3,
                   step: float = DEFAULT_STEP, say=None) -> JointResult:
    """The joint plan's pieces for `ckpt` at `budget_bits` (bits over the unpruned model's linear weights).

    table, ctx: wqedge.alloc.planner.prepare's damage table and PlanningContext (with calibration statistics);
    structure_damage: wqedge.structure_damage.StructureDamage of the same model.
    """
    best: JointResult | None = None
    trials = []
    last = None
    for f in [0.0] + list(np.arange(step, max_prune + 1e-12, step)):
        pr = select_pruning(ckpt.spec, structure_damage, float(f), kinds) if f > 0 else None
        if pr is not None and (not pr.layers or (last is not None and pr.to_dict() == last.to_dict())):
            continue                                          # nothing (new) to prune at this fraction
        last = pr
        try:
            t, choice, c_dmg, s_dmg = pruned_allocation(ckpt, table, ctx, budget_bits, structure_damage, pr)
        except ValueError:
            continue                                          # (PlanError) the pruned model cannot use the budget
        total = c_dmg + s_dmg
        trials.append({"fraction": round(float(f), 4), "pruned_weights": table.n_weights - t.n_weights,
                       "chunk_damage": c_dmg, "structure_damage": s_dmg, "predicted": total})
        if say:
            say(f"joint search: prune {100 * f:.0f}% ({table.n_weights - t.n_weights} weights): predicted damage "
                f"{c_dmg:.4f} + {s_dmg:.4f} = {total:.4f} nats")
        if best is None or total < best.predicted:
            best = JointResult(pr, t, choice, total, trials)
    best.trials = trials
    return best
