"""Joint structured pruning and bit allocation under one byte budget (issue 16; METHODS.md §4).

The budget is one number: stored bits over the *unpruned* model's decoder weights. A pruned structure is a
0-bit action on its weights, so every weight pruned frees bits that the knapsack spends on wider codes elsewhere.
The search runs over the amount pruned: for each fraction f of weights (0, step, ..., max_prune), the
structures of least loss-aware damage per weight are pruned (wqedge.alloc.prune.select_pruning on
wqedge.structure_damage), the damage table is rebuilt for the pruned shapes (a pruned group's chunks cost
nothing: gate/up rows, q/k/v rows leave their chunks; down/o chunks are re-cut from the kept columns), and the
greedy knapsack allocates the whole budget over what is left. Every fraction's plan gets a predicted total
damage (chunk damage + structure damage, both second-order nats/token estimates from the same LM-loss
gradients). With a `measure` (what `wqedge plan --prune` uses), the candidate plans are converted and their
loss measured on held-out calibration windows, and the measured loss decides: a pruned plan wins only when it
measures lower than the quantization-only plan (f = 0) by more than one paired standard error of the difference.
Why: on llama-s at 2.0 bits the prediction preferred 5% pruned, which measured 5.1% worse than quantization only
(bench/results/pruning.md): the chunk damage (each chunk fitted alone) is 2.7-13x the loss error feedback leaves
(1.75-3.25 bits), so the raw prediction overvalues the bits a pruned structure frees. Scaled by the
quantization-only plan's measured / predicted ratio it matched the measured losses within 0.3-12% (mostly under 5%),
so that calibrated prediction screens the candidates: only those within SCREEN_MARGIN of the quantization-only
plan are converted (one conversion each). Without a measure, the least raw prediction wins; f = 0 is the
quantization-only plan, so the search never predicts worse.

Approximations, stated: the pruned model's chunk damages use the unpruned model's statistics restricted to
the kept rows and columns, and damages add. XᵀX is gathered as a band around the diagonal (calib.XtxBand, 4 blocks
of 128 columns: 3.8 GB at 7B instead of 44 GB dense); kept columns of one re-cut chunk further apart than that are
taken as uncorrelated.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..pruning import Pruning
from .greedy import greedy_allocate
from .measure import paired_se
from .prune import KINDS, predicted_damage, select_pruning

DEFAULT_STEP = 0.05
# A pruned candidate is converted and measured only if its calibrated prediction is within this margin of the
# quantization-only plan's measured loss. On llama-s (bench/results/pruning.md, 1.75-3.25 bits, 5-15% pruned) the
# calibrated prediction was within 0.3-12% of the measured loss, and the pruned candidates measured 15-750% worse.
SCREEN_MARGIN = 0.25


@dataclasses.dataclass
class JointResult:
    pruning: Pruning | None
    table: object              # the DamageTable the choice indexes (pruned shapes)
    choice: np.ndarray
    predicted: float           # chunk damage + structure damage, nats/token
    trials: list[dict]         # per fraction tried: fraction, weights pruned, predicted damages (+ measured loss)
    measured: bool = False     # True: the measured held-out loss chose among the trials
    info: dict | None = None   # the refining allocator's record for the chosen candidate (PPO's), when it ran


def _sliced_stats(stats: dict | None, pruning: Pruning, spec, what: str, outside: list | None = None):
    """Input (columns) or gradient (rows) statistics of the unpruned model (`spec`) restricted to the kept part;
    `outside` (a list) gets the count of kept-chunk XᵀX entries beyond a gathered band (calib.XtxBand), taken as 0."""
    if not stats:
        return stats
    names = {lin.hf_name: (lin.layer, lin.proj) for lin in spec.linears()}
    out = {}
    for name, st in stats.items():
        rows, cols = pruning.kept(*names[name])
        if what == "input":
            if cols is None:
                out[name] = st
                continue
            c = cols.tolist()
            if st.xtx_band is not None:   # a band (calib.XtxBand): the kept chunks' diagonal blocks, all the table reads
                blocks, missing = st.kept_blocks(cols, st.xtx_block)
                if outside is not None:
                    outside.append(missing)
                out[name] = dataclasses.replace(st, diag=st.diag[c], mean_abs=st.mean_abs[c], max_abs=st.max_abs[c],
                                                xtx=blocks, xtx_band=None)
                continue
            out[name] = dataclasses.replace(st, diag=st.diag[c], mean_abs=st.mean_abs[c], max_abs=st.max_abs[c],
                                            xtx=None if st.xtx is None else st.xtx[c][:, c])
        else:
            out[name] = st if rows is None else dataclasses.replace(st, g2=st.g2[rows.tolist()], fisher=None)
    return out


def pruned_input_stats(ckpt, ctx, pruning: Pruning | None, outside: list | None = None):
    """The planning context's input statistics restricted to the columns `pruning` keeps (as the pruned shapes'
    damage tables and fits see them); unchanged without pruning. outside: as `_sliced_stats`."""
    return ctx.input_stats if pruning is None else _sliced_stats(ctx.input_stats, pruning, ckpt.spec, "input", outside)


def pruned_allocation(ckpt, table, ctx, budget_bits: float, structure_damage, pruning: Pruning | None):
    """`pruning` applied, the damage table rebuilt for the pruned shapes, and the greedy knapsack at the same
    stored bits (budget_bits over the unpruned weights): (table, choice, chunk damage, structure damage; 0 without
    `structure_damage`).
    PlanError when the pruned model cannot meet the budget."""
    from ..damage import build_damage_table

    if pruning is None:
        t = table
    else:
        o = ctx.opts
        outside: list[int] = []
        t = build_damage_table(pruning.pruned_spec(ckpt.spec).linears(),
                               lambda lin: pruning.prune_weight(lin.layer, lin.proj, ckpt.linear_weight(lin.hf_name)),
                               table.group_size, pruned_input_stats(ckpt, ctx, pruning, outside),
                               _sliced_stats(ctx.grad_stats, pruning, ckpt.spec, "grad"), kind=table.kind,
                               device=ctx.device, max_rows=o["max_rows"], feedback=o["feedback_damage"],
                               protect=tuple(o["protect"]),
                               **({"actions": tuple(o["actions"])} if o.get("actions") else {}))  # as prepare offered
        t.meta["xtx_outside_band"] = int(sum(outside))
    choice = greedy_allocate(t, table.budget_cap(budget_bits) / t.n_weights)  # same stored bits as unpruned
    s_dmg = 0.0 if pruning is None or structure_damage is None else predicted_damage(structure_damage, pruning)
    return t, choice, t.plan_damage(choice), s_dmg


def choose_measured(losses: list[np.ndarray]) -> tuple[int, float]:
    """The index of the candidate to keep among per-window held-out losses of plans on the same windows
    (index 0: the quantization-only plan), and the paired standard error it was judged by. The candidate of
    least mean loss wins only if it beats index 0 by more than one paired standard error; else index 0 (the
    plan that removes nothing is the one to keep when the windows cannot tell them apart)."""
    means = [float(np.mean(x)) for x in losses]
    best = int(np.argmin(means))
    if best == 0:
        return 0, 0.0
    se = paired_se(losses[best], losses[0])
    return (best, se) if means[best] < means[0] - se else (0, se)


def joint_allocate(ckpt, table, ctx, budget_bits: float, structure_damage, kinds=KINDS, max_prune: float = 0.3,
                   step: float = DEFAULT_STEP, say=None, measure=None,
                   screen_margin: float | None = SCREEN_MARGIN, refine=None) -> JointResult:
    """The joint plan's pieces for `ckpt` at `budget_bits` (bits over the unpruned model's linear weights).

    table, ctx: wqedge.alloc.planner.prepare's damage table and PlanningContext (with calibration statistics);
    structure_damage: wqedge.structure_damage.StructureDamage of the same model. measure: None, or a callable
    (pruning or None, table, choice) -> per-window held-out loss increase of that plan as converted (float [n],
    the same windows for every call): the measured loss then chooses (`choose_measured`) among the candidates
    measured. The quantization-only plan is always measured; a pruned candidate only if its calibrated prediction
    (chunk damage scaled by the quantization-only plan's measured / predicted, plus structure damage) is below
    (1 + screen_margin) x the quantization-only plan's measured loss (screen_margin None: every candidate).
    refine: None, or a second allocator (pruning or None, table, choice) -> (table, choice, info) that re-allocates
    a candidate's bits from its knapsack plan (PPO, --allocator rl): it runs on every candidate the measure converts
    (without a measure, on the predicted best), so it sees every pruned shape the check does; each candidate then
    keeps whichever of its two plans measures lower (trials record both), and those compete as above.
    """
    cands: list[JointResult] = []
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
        outside = t.meta.get("xtx_outside_band", 0)   # (prepare's own table, f = 0, has none)
        if outside:
            trials[-1]["xtx_outside_band"] = outside
        if say:
            say(f"joint search: prune {100 * f:.0f}% ({table.n_weights - t.n_weights} weights): predicted damage "
                f"{c_dmg:.4f} + {s_dmg:.4f} = {total:.4f} nats"
                + (f" ({outside} XᵀX entries of re-cut chunks beyond the gathered band, taken as 0)" if outside else ""))
        cands.append(JointResult(pr, t, choice, total, trials))
    def refined(i: int) -> JointResult:
        c = cands[i]
        t, choice, info = refine(c.pruning, c.table, c.choice)
        predicted = t.plan_damage(choice) + trials[i]["structure_damage"]
        trials[i]["refined"] = {"predicted": predicted}
        return JointResult(c.pruning, t, choice, predicted, trials, info=info)

    if measure is None or cands[0].pruning is not None:      # (f = 0 fits the budget whenever prepare's table does)
        k = min(range(len(cands)), key=lambda i: cands[i].predicted)   # (every candidate holds one `trials` list)
        return cands[k] if refine is None else refined(k)

    def measured(i: int) -> np.ndarray:
        c = cands[i]
        loss = np.asarray(measure(c.pruning, c.table, c.choice), np.float64)
        trials[i]["measured"] = float(loss.mean())
        if say:
            say(f"joint search: prune {100 * trials[i]['fraction']:.0f}% measured {loss.mean():.4f} nats on "
                f"{len(loss)} held-out windows")
        return loss
    losses = {0: measured(0)}
    ratio = trials[0]["measured"] / trials[0]["chunk_damage"] if trials[0]["chunk_damage"] > 0 else 1.0
    for i in range(1, len(cands)):
        trials[i]["calibrated"] = ratio * trials[i]["chunk_damage"] + trials[i]["structure_damage"]
        if screen_margin is None or trials[i]["calibrated"] < (1 + screen_margin) * trials[0]["measured"]:
            losses[i] = measured(i)
        elif say:
            say(f"joint search: prune {100 * trials[i]['fraction']:.0f}% not measured: calibrated prediction "
                f"{trials[i]['calibrated']:.4f} nats against {trials[0]['measured']:.4f} measured without pruning")
    if refine is not None:
        for i in sorted(losses):
            r = refined(i)
            loss = np.asarray(measure(r.pruning, r.table, r.choice), np.float64)
            trials[i]["refined"]["measured"] = float(loss.mean())
            if say:
                say(f"joint search: prune {100 * trials[i]['fraction']:.0f}% re-allocated: measured "
                    f"{loss.mean():.4f} nats against the knapsack plan's {trials[i]['measured']:.4f}")
            if loss.mean() < losses[i].mean():
                cands[i], losses[i] = r, loss
                trials[i]["refined"]["kept"] = True
            else:    # the knapsack plan measures lower; PPO's record still says what it tried
                info = {**r.info, "plan_used": False} if isinstance(r.info, dict) else r.info
                cands[i] = dataclasses.replace(cands[i], info=info)
                trials[i]["refined"]["kept"] = False
    idx = sorted(losses)
    j, se = choose_measured([losses[i] for i in idx])
    k = idx[j]
    best = cands[k]
    best.measured = True
    trials[k]["chosen"] = {"by": "measured", "paired_se": se}
    if say:
        say(f"joint search: kept prune {100 * trials[k]['fraction']:.0f}% by measured loss"
            + ("" if not se else f" (paired standard error {se:.4f} nats)"))
    return best
