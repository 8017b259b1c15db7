"""The "greedy" allocator (`greedy_allocate`): the plan of least predicted damage under the bit budget.

A multiple-choice knapsack over the damage table (wqedge.damage): every unit takes exactly one action;
total stored bits <= budget x weights. Solved by the greedy-on-convex-hulls method (optimal for the
Lagrangian relaxation, i.e. optimal up to the last partially taken upgrade), then the remaining slack is
filled with the best affordable single upgrades. Runs in milliseconds for thousands of units.
"""
from __future__ import annotations

import heapq

import numpy as np

from ..damage import DamageTable
from ..plan import PlanError


def _hull(bits: np.ndarray, dmg: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (bits, damage), cheapest first, damage strictly decreasing."""
    order = sorted(range(len(bits)), key=lambda a: (bits[a], dmg[a]))
    pts: list[int] = []
    for a in order:
        if pts and dmg[a] >= dmg[pts[-1]]:
            continue                      # dominated: no cheaper-or-equal option does better
        if pts and bits[a] == bits[pts[-1]]:
            pts.pop()
        while len(pts) >= 2:
            a0, a1 = pts[-2], pts[-1]
            # slope a0->a1 must be steeper (more damage saved per bit) than a1->a
            s01 = (dmg[a0] - dmg[a1]) / (bits[a1] - bits[a0])
            s1a = (dmg[a1] - dmg[a]) / (bits[a] - bits[a1])
            if s1a >= s01:
                pts.pop()
            else:
                break
        pts.append(a)
    return pts


def greedy_allocate(table: DamageTable, budget_bits: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """Action index per unit minimising Σ damage subject to Σ bits <= cap. Raises PlanError if infeasible."""
    bits, dmg = table.bits, table.damage
    U, A = bits.shape
    cap = table.budget_cap(budget_bits)
    ok = np.ones((U, A), bool) if allowed is None else allowed
    cheapest = np.where(ok, bits, np.iinfo(np.int64).max).argmin(1)
    base = int(bits[np.arange(U), cheapest].sum())
    if base > cap:
        raise PlanError(f"budget {budget_bits} bits is below the cheapest plan "
                        f"({base / table.n_weights:.4f} bits at group size {table.group_size})")
    hulls = []
    for u in range(U):
        idx = np.flatnonzero(ok[u])
        h = [int(idx[i]) for i in _hull(bits[u, idx], dmg[u, idx])]
        hulls.append(h)
    choice = np.array([h[0] for h in hulls], dtype=np.int64)
    pos = np.zeros(U, dtype=np.int64)
    total = int(bits[np.arange(U), choice].sum())
    heap = []
    for u, h in enumerate(hulls):
        if len(h) > 1:
            db = bits[u, h[1]] - bits[u, h[0]]
            heap.append((-(dmg[u, h[0]] - dmg[u, h[1]]) / db, u))
    heapq.heapify(heap)
    skipped = []
    while heap:
        neg, u = heapq.heappop(heap)
        h = hulls[u]
        a0, a1 = h[pos[u]], h[pos[u] + 1]
        db = int(bits[u, a1] - bits[u, a0])
        if total + db > cap:
            skipped.append(u)          # does not fit; later (cheaper) upgrades of others may
            continue
        total += db
        pos[u] += 1
        choice[u] = a1
        if pos[u] + 1 < len(h):
            a2 = h[pos[u] + 1]
            heapq.heappush(heap, (-(dmg[u, a1] - dmg[u, a2]) / (bits[u, a2] - bits[u, a1]), u))
    total = fill_slack(table, choice, cap, ok, total)
    assert total <= cap
    return choice


def fill_slack(table: DamageTable, choice: np.ndarray, cap: int, allowed: np.ndarray | None = None,
               total: int | None = None) -> int:
    """Spend what `choice` leaves under `cap` (in place): the best affordable single upgrade by predicted damage,
    repeatedly. Returns the plan's stored bits (<= cap). Also the repair of the PPO allocator's sampled plans."""
    bits, dmg = table.bits, table.damage
    U = len(choice)
    ok = np.ones(bits.shape, bool) if allowed is None else allowed
    total = int(bits[np.arange(U), choice].sum()) if total is None else total
    while True:
        slack = cap - total
        cur_b = bits[np.arange(U), choice][:, None]
        cur_d = dmg[np.arange(U), choice][:, None]
        gain = np.where(ok & (bits - cur_b <= slack) & (bits > cur_b), cur_d - dmg, 0.0)
        u, a = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[u, a] <= 0:
            return total
        total += int(bits[u, a] - bits[u, choice[u]])
        choice[u] = a
