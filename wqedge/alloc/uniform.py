"""The uniform allocator: the same action for every chunk, the most precise one the budget allows.

The baseline every other allocator is measured against.
"""
from __future__ import annotations

from .. import blocks
from ..plan import Plan, PlanError
from ..units import Linear, chunk_bounds


def model_bits(linears: list[Linear], group_size: int, action: str) -> float:
    """Effective bits of the whole model if every chunk took `action`."""
    bits = sum(blocks.chunk_bits(action, lin.out_features, e - s)
               for lin in linears for s, e in chunk_bounds(lin.in_features, group_size))
    return bits / sum(lin.out_features * lin.in_features for lin in linears)


def check_budget(linears: list[Linear], group_size: int, budget_bits: float) -> None:
    """Reject budgets no plan can meet (below the cheapest action) or that mean nothing (above fp16)."""
    cheapest = min(blocks.ACTION_NAMES, key=lambda a: model_bits(linears, group_size, a))
    lo = model_bits(linears, group_size, cheapest)
    hi = model_bits(linears, group_size, "fp16")
    if budget_bits < lo - 1e-12:
        raise PlanError(f"budget {budget_bits} bits is below the cheapest plan ({cheapest} everywhere: "
                        f"{lo:.4f} bits at group size {group_size})")
    if budget_bits > hi + 1e-12:
        raise PlanError(f"budget {budget_bits} bits is above keeping every weight in fp16 ({hi:.4f} bits)")


def uniform_plan(linears: list[Linear], group_size: int, budget_bits: float, method: str = "neuqi",
                 action: str | None = None, **plan_kw) -> Plan:
    """Every chunk gets `action`, or the most precise action whose whole-model cost fits the budget."""
    check_budget(linears, group_size, budget_bits)
    if action is None:
        fitting = [a for a in blocks.ACTION_NAMES if model_bits(linears, group_size, a) <= budget_bits + 1e-12]
        action = max(fitting, key=lambda a: model_bits(linears, group_size, a))
    actions = {lin.hf_name: [action] * len(chunk_bounds(lin.in_features, group_size)) for lin in linears}
    return Plan.from_actions(linears, group_size, budget_bits, "uniform", actions, method, **plan_kw)
