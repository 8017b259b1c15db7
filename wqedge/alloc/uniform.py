"""The uniform allocator: one action everywhere, the most precise one the budget allows.

The baseline every other allocator is measured against, and the default without calibration text.
"Allows" is judged per chunk width: a chunk gets the most precise action whose stored bits per weight
*at that chunk's width* fit the budget. A ragged last chunk (hidden 576 at G = 128 leaves 64 columns)
pays its fp16 scale and offset over fewer columns, so q4 costs 4.5 bits there: judged over the whole
model, "q4 at 4.25 bits" would not fit and everything would fall to q3; judged per width, the full
chunks stay q4 and only the ragged ones take q3, and the plan is within budget by construction. Then the
few narrower widths get the actions that minimise a data-free error proxy within the whole budget (so
ragged chunks keep q4 when the model can pay for it, and never drop to a needlessly coarse kind). What was
done and why is recorded in plan.meta["uniform"] for the command line to say.
"""
from __future__ import annotations

from .. import blocks
from ..plan import Plan, PlanError
from ..units import Linear, chunk_bounds

# Precision order of the actions, most precise first (fp16, q8, q4, q4c, q3, q3c, ..., q1, q1c).
ORDER = tuple(sorted(blocks.UNIFORM_ACTIONS, key=lambda a: -blocks.effective_bits(a, blocks.SUBBLOCK * 8)))


def model_bits(linears: list[Linear], group_size: int, action: str) -> float:
    """Effective bits of the whole model if every chunk took `action`."""
    bits = sum(blocks.chunk_bits(action, lin.out_features, e - s)
               for lin in linears for s, e in chunk_bounds(lin.in_features, group_size))
    return bits / sum(lin.out_features * lin.in_features for lin in linears)


def check_budget(linears: list[Linear], group_size: int, budget_bits: float) -> None:
    """Reject budgets no plan can meet (below the cheapest action) or that mean nothing (above fp16)."""
    cheapest = min(blocks.UNIFORM_ACTIONS, key=lambda a: model_bits(linears, group_size, a))
    lo = model_bits(linears, group_size, cheapest)
    hi = model_bits(linears, group_size, blocks.FLOAT_ACTION)
    if budget_bits < lo - 1e-12:
        raise PlanError(f"budget {budget_bits} bits is below the cheapest plan ({cheapest} everywhere: "
                        f"{lo:.4f} bits at group size {group_size})")
    if budget_bits > hi + 1e-12:
        raise PlanError(f"budget {budget_bits} bits is above keeping every weight in fp16 ({hi:.4f} bits)")


def _best_narrow_actions(linears, group_size, budget_bits, per_width, widths, order=ORDER) -> dict[int, str]:
    """With the full-width action fixed, the actions (that one or coarser) of the few narrower widths that
    minimise a data-free error proxy, Σ weights · 4^-nominal bits (a uniform quantizer's MSE), within the
    budget: so a ragged chunk keeps the main action when the whole model can pay for it, and otherwise
    takes the best it can afford rather than whatever happens to fit at its own width."""
    import itertools
    n_weights = sum(lin.out_features * lin.in_features for lin in linears)
    cap = budget_bits * n_weights + 1e-6
    main_g = widths[0]
    weights_at = {g: 0 for g in widths}
    bits_at = {g: {a: 0 for a in order} for g in widths}
    for lin in linears:
        for s, e in chunk_bounds(lin.in_features, group_size):
            weights_at[e - s] += lin.out_features * (e - s)
            for a in order:
                bits_at[e - s][a] += blocks.chunk_bits(a, lin.out_features, e - s)
    fixed = bits_at[main_g][per_width[main_g]]
    narrow = widths[1:]
    best, best_err = per_width, None
    below = order[order.index(per_width[main_g]):]   # never more precise than the main action: it is uniform
    for combo in itertools.product(below, repeat=len(narrow)):
        if fixed + sum(bits_at[g][a] for g, a in zip(narrow, combo)) > cap:
            continue
        err = sum(weights_at[g] * 4.0 ** -blocks.block_type(a).nominal_bits for g, a in zip(narrow, combo))
        if best_err is None or err < best_err:
            best, best_err = {main_g: per_width[main_g], **dict(zip(narrow, combo))}, err
    return best


def action_for_width(g: int, budget_bits: float, order=ORDER) -> str | None:
    """The most precise action whose bits per weight at chunk width g fit the budget (None if none does)."""
    return next((a for a in order if blocks.effective_bits(a, g) <= budget_bits + 1e-12), None)


def uniform_plan(linears: list[Linear], group_size: int, budget_bits: float, method: str = "neuqi",
                 action: str | None = None, compact: bool = True, **plan_kw) -> Plan:
    """Every chunk gets `action` (a preset), or the most precise action that fits the budget at its width (among
    every kind of UNIFORM_ACTIONS, or, compact=False, among those without compact headers)."""
    order = ORDER if compact else tuple(a for a in ORDER if not blocks.block_type(a).compact)
    check_budget(linears, group_size, budget_bits)
    widths = sorted({e - s for lin in linears for s, e in chunk_bounds(lin.in_features, group_size)}, reverse=True)
    if action is not None:
        per_width = {g: action for g in widths}
    else:
        per_width = {g: action_for_width(g, budget_bits, order) for g in widths}
        if any(a is None for a in per_width.values()):  # only very narrow chunks under a tiny budget
            cheapest = min(order, key=lambda a: model_bits(linears, group_size, a))
            per_width = {g: a or cheapest for g, a in per_width.items()}
            if model_bits(linears, group_size, cheapest) > budget_bits + 1e-12:
                raise PlanError(f"budget {budget_bits} bits cannot be met with one action per chunk width")
    main = per_width[widths[0]]
    if action is None and 1 < len(widths) <= 4:
        per_width = _best_narrow_actions(linears, group_size, budget_bits, per_width, widths, order)
    actions = {lin.hf_name: [per_width[e - s] for s, e in chunk_bounds(lin.in_features, group_size)]
               for lin in linears}
    plan = Plan.from_actions(linears, group_size, budget_bits, "uniform", actions, method, **plan_kw)
    plan.meta["uniform"] = {
        "action": main,
        "preset": action is not None,
        "by_width": {str(g): a for g, a in per_width.items()},
        "all_main_bits": model_bits(linears, group_size, main),
    }
    return plan
