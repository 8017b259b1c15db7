"""WINDQuant: PPO allocation over column chunks, rewarded by the measured held-out loss.

The knapsack (wqedge.alloc.greedy) solves the predicted, additive damage exactly, so PPO can only win on what
that prediction misses: interactions between units and the real loss. Its reward is therefore measured: a
plan's model is assembled from per-(unit, action) fits computed once (wqedge.alloc.measure.PlanMeasurer) and
its loss is measured on held-out calibration windows; the search starts from the knapsack plan (behaviour
cloning, and the knapsack plan is the first "best") and keeps the best measured plan. The best few plans on
the reward's windows and the knapsack's are re-measured on further held-out windows ("confirm"), which pick
the answer (the knapsack's unless beaten by more than confirm_z paired standard errors), so that the minimum of
many noisy measurements is not its own evidence; info["noise"] gives the paired standard errors next to the
differences ranked. The fits are made before the search starts (PlanMeasurer.prefit): time_limit is the search's.

The MDP: one step per unit, in the fixed unit order (layer by layer; q k v o gate up down; chunks left to
right); 7 actions (fp16, q8, q4, q3, q2, ternary, q1). State of step t: the unit's depth, projection type
and chunk position, its weight/activation/gradient statistics (wqedge.damage.FEATURE_NAMES), the
predicted damage and effective bits of every action, and the budget left per weight left (with the slack
over the cheapest completion). Actions that would make the budget unreachable (used + bits + cheapest
completion > cap) are masked, so every episode ends inside the budget; bits an episode leaves unspent are
then spent by the best predicted single upgrades (greedy.fill_slack, part of the environment). Reward:
-predicted damage of each step (shaping, in units of the knapsack plan's), plus at the end the gap between
that and the measured loss increase, so an episode's return is minus its measured loss increase in units of
the knapsack plan's (without measurement: minus its predicted damage).

Policy and value are small MLPs (torch, CPU by default). Training: behaviour cloning of the knapsack plan,
then PPO (clipped objective, GAE) on batches of sampled episodes. Everything is seeded: same seed, same plan.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..damage import DamageTable
from ..plan import PlanError
from ..units import PROJ_TYPES
from .greedy import fill_slack, greedy_allocate

if TYPE_CHECKING:
    from .planner import PlanningContext


@dataclass
class PPOConfig:
    seed: int = 0
    iterations: int = 30          # PPO iterations (each: `episodes` sampled episodes)
    episodes: int = 8
    epochs: int = 4
    minibatch: int = 512
    lr: float = 1e-4
    clip: float = 0.2
    gamma: float = 1.0
    lam: float = 1.0
    entropy: float = 0.0
    target_kl: float = 0.01       # stop an iteration's epochs past this KL from the sampling policy
    hidden: int = 128
    bc_steps: int = 300           # behaviour-cloning steps on the knapsack plan (0: none)
    measure: bool = True          # reward: measured loss on held-out windows (needs ctx with a model)
    measure_windows: int = 32     # held-out windows of the reward (search)
    confirm_windows: int = 32     # further held-out windows deciding between the best plans and the knapsack's
    confirm_top: int = 8          # how many of the best searched plans are re-measured on them
    confirm_z: float = 2.0        # a plan replaces the knapsack's only if it is better there by > z paired SEs
    reward_fit: str = "feedback"  # the measured plans' chunk fits (wqedge.alloc.measure.FITS)
    time_limit: float = 480.0     # seconds; training stops early past it
    device: str = "cpu"


# ---------------------------------------------------------------- environment (vectorised over episodes)

class Env:
    def __init__(self, table: DamageTable, budget_bits: float, dev):
        self.t = table
        self.dev = dev
        self.U, self.A = table.bits.shape
        self.cap = table.budget_cap(budget_bits)
        self.bits = torch.as_tensor(table.bits, dtype=torch.float64, device=dev)
        cheapest = self.bits.min(1).values
        self.minrem = torch.cat([torch.flip(torch.cumsum(torch.flip(cheapest, [0]), 0), [0]),
                                 torch.zeros(1, dtype=torch.float64, device=dev)])   # [U+1]
        if float(self.minrem[0]) > self.cap:
            raise PlanError(f"budget {budget_bits} bits is below the cheapest plan")
        w = torch.as_tensor([u.n_weights for u in table.units], dtype=torch.float64, device=dev)
        self.wrem = torch.cat([torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0]), torch.ones(1, dtype=torch.float64, device=dev)])
        self.static = self._static_features().to(dev)
        ref = table.damage[np.arange(self.U), greedy_allocate(table, budget_bits)].sum()
        self.dref = float(max(ref, 1e-12))
        self.dmg = torch.as_tensor(table.damage, dtype=torch.float32, device=dev) / self.dref

    def _static_features(self) -> torch.Tensor:
        t = self.t
        U = self.U
        layers = np.array([u.linear.layer for u in t.units], dtype=np.float32)
        depth = layers / max(1.0, layers.max())
        proj = np.zeros((U, len(PROJ_TYPES)), np.float32)
        for i, u in enumerate(t.units):
            proj[i, PROJ_TYPES.index(u.linear.proj)] = 1.0
        nch = np.array([-(-u.linear.in_features // t.group_size) for u in t.units], dtype=np.float32)
        pos = np.array([u.chunk for u in t.units], dtype=np.float32) / np.maximum(nch - 1, 1)
        f = t.features if t.features is not None else np.zeros((U, 0), np.float32)
        f = (f - f.mean(0)) / (f.std(0) + 1e-6)
        ld = np.log(np.maximum(t.damage, 1e-30) / max(t.damage[t.damage > 0].mean() if (t.damage > 0).any() else 1.0, 1e-30))
        ld = np.clip(ld, -30, 10) / 10.0
        eb = t.bits / np.array([u.n_weights for u in t.units], dtype=np.float64)[:, None] / 16.0
        return torch.as_tensor(np.concatenate([depth[:, None], proj, pos[:, None], f, ld, eb], 1), dtype=torch.float32)

    @property
    def n_features(self) -> int:
        return self.static.shape[1] + 3

    def state(self, step: int, used: torch.Tensor) -> torch.Tensor:
        left = (self.cap - used) / self.wrem[step] / 16.0
        slack = (self.cap - used - self.minrem[step]) / self.wrem[step] / 16.0
        frac = torch.full_like(used, step / self.U)
        dyn = torch.stack([left, slack, frac], 1).float()
        return torch.cat([self.static[step].expand(used.shape[0], -1), dyn], 1)

    def mask(self, step: int, used: torch.Tensor) -> torch.Tensor:
        return (used[:, None] + self.bits[step][None, :] + self.minrem[step + 1]) <= self.cap


class Policy(nn.Module):
    def __init__(self, n_in: int, n_act: int, hidden: int):
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                nn.Linear(hidden, n_act))
        self.v = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                               nn.Linear(hidden, 1))

    def logits(self, s, mask):
        return self.pi(s).masked_fill(~mask, -1e9)


def rollout(env: Env, pol: Policy, n: int, greedy: bool = False, gen: torch.Generator | None = None,
            forced: torch.Tensor | None = None):
    """n episodes; returns states [n,U,F], masks [n,U,A], actions [n,U], logp [n,U], values [n,U]."""
    U = env.U
    used = torch.zeros(n, dtype=torch.float64, device=env.dev)
    S, M, Act, LP, V = [], [], [], [], []
    with torch.no_grad():
        for t in range(U):
            s = env.state(t, used)
            m = env.mask(t, used)
            lg = pol.logits(s, m)
            if forced is not None:
                a = forced[:, t]
            elif greedy:
                a = lg.argmax(1)
            else:
                p = torch.softmax(lg, 1).cpu()      # sampled on the CPU generator: same seed, same plan
                a = torch.multinomial(p, 1, generator=gen)[:, 0].to(env.dev)
            lp = torch.log_softmax(lg, 1).gather(1, a[:, None])[:, 0]
            S.append(s); M.append(m); Act.append(a); LP.append(lp); V.append(pol.v(s)[:, 0])
            used = used + env.bits[t][a]
    return (torch.stack(S, 1), torch.stack(M, 1), torch.stack(Act, 1), torch.stack(LP, 1), torch.stack(V, 1))


# ---------------------------------------------------------------- measured plans

def heldout_windows(ctx: PlanningContext, cfg: PPOConfig) -> dict[str, torch.Tensor]:
    """The reward's windows ("search": the first measure_windows held-out windows) and the windows that decide
    between the best measured plans and the knapsack's ("confirm": the next confirm_windows; none when the
    calibration set holds no more). Without held-out windows: the last training windows (not held out)."""
    ho = ctx.calib.heldout
    if not len(ho):
        return {"search": ctx.calib.train[-max(1, cfg.measure_windows):]}
    w = min(cfg.measure_windows, len(ho))
    return {"search": ho[:w], "confirm": ho[w:w + cfg.confirm_windows]}


def measurer_for(table: DamageTable, ctx: PlanningContext, cfg: PPOConfig):
    """A PlanMeasurer on the planning model and device with the held-out windows of `heldout_windows`."""
    from .measure import PlanMeasurer
    return PlanMeasurer(table, ctx.model, ctx.device, ctx.input_stats, heldout_windows(ctx, cfg), fit=cfg.reward_fit)


class _Plans:
    """Every plan measured so far (by its bytes), so a plan sampled twice is measured once."""

    def __init__(self, measurer):
        self.m = measurer
        self.search: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, choice: np.ndarray) -> np.ndarray:
        k = choice.tobytes()
        if k not in self.search:
            self.search[k] = (choice.copy(), self.m.measure(choice, "search"))
        return self.search[k][1]


# ---------------------------------------------------------------- training

def ppo_allocate(table: DamageTable, budget_bits: float, cfg: PPOConfig | None = None, ctx: PlanningContext | None = None,
                 progress=None, measurer=None):
    """Train the policy and return (choice [U] action indices, info dict).

    With `ctx` (a PlanningContext with calibration) or a `measurer` (wqedge.alloc.measure.PlanMeasurer, e.g. one
    shared by several budgets so its fits are computed once), the reward is the measured held-out loss and the
    answer is the best measured plan, the knapsack's included; else the predicted damage (the knapsack's plan
    then wins). The plan never exceeds the budget: over-budget actions are masked, and sampled plans that leave
    bits unspent are completed by the best predicted single upgrades (greedy.fill_slack)."""
    cfg = cfg or PPOConfig()
    outer_threads = torch.get_num_threads()
    own = None
    if measurer is None and cfg.measure and ctx is not None and ctx.calib is not None:
        measurer = own = measurer_for(table, ctx, cfg)
    try:
        return _ppo(table, budget_bits, cfg, measurer if cfg.measure else None, progress)
    finally:
        torch.set_num_threads(outer_threads)
        if own is not None:
            own.close()


def _ppo(table, budget_bits, cfg, measurer, progress):
    from .measure import paired_se
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)     # the policy's tiny matrices: one thread (no barrier spinning)
    env = Env(table, budget_bits, dev)
    U = env.U
    pol = Policy(env.n_features, env.A, cfg.hidden).to(dev)
    opt = torch.optim.Adam(pol.parameters(), lr=cfg.lr)
    ks_np = greedy_allocate(table, budget_bits)
    ks = torch.as_tensor(ks_np, device=dev)
    info = {"config": asdict(cfg), "knapsack_damage": env.dref}

    # behaviour cloning of the knapsack plan (teacher forcing along its trajectory)
    if cfg.bc_steps:
        S, M, _, _, _ = rollout(env, pol, 1, forced=ks[None])
        S, M = S[0], M[0]
        bc_opt = torch.optim.Adam(pol.pi.parameters(), lr=1e-3)
        for _ in range(cfg.bc_steps):
            loss = nn.functional.cross_entropy(pol.logits(S, M), ks)
            bc_opt.zero_grad()
            loss.backward()
            bc_opt.step()
        info["bc_loss"] = float(loss.detach())

    idx = np.arange(U)
    plans = _Plans(measurer) if measurer is not None else None
    if plans is not None:
        measurer.prefit()                            # the fits are a one-time cost, outside the time limit
        info["prefit_seconds"] = time.time() - t_start
        ks_loss = plans(ks_np)
        ref = max(float(ks_loss.mean()), 1e-9)       # scores: measured loss increase in units of the knapsack's
        info["knapsack_measured"] = float(ks_loss.mean())
        score = lambda ch: float(plans(ch).mean()) / ref
    else:
        score = lambda ch: float(table.damage[idx, ch].sum()) / env.dref
    best = (score(ks_np), ks_np.copy())              # start from the knapsack plan: PPO must beat it
    history = []
    t_loop = time.time()
    dmg = env.dmg
    for it in range(cfg.iterations):
        if time.time() - t_loop > cfg.time_limit:
            break
        S, M, Act, LP, V = rollout(env, pol, cfg.episodes, gen=gen)
        E = Act.shape[0]
        r = -dmg[torch.arange(U, device=dev)[None, :].expand(E, U), Act]          # [E, U] predicted shaping
        scores = []
        for e in range(E):
            ch = Act[e].cpu().numpy().astype(np.int64)
            fill_slack(table, ch, env.cap)           # the environment completes the plan within the budget
            sc = score(ch)
            r[e, -1] += -(sc + float(r[e].sum()))    # the return is minus the (measured) score
            scores.append(sc)
            if sc < best[0]:
                best = (sc, ch)
        # GAE
        adv = torch.zeros_like(r)
        last = torch.zeros(E, device=dev)
        for t in reversed(range(U)):
            nv = V[:, t + 1] if t + 1 < U else torch.zeros(E, device=dev)
            delta = r[:, t] + cfg.gamma * nv - V[:, t]
            last = delta + cfg.gamma * cfg.lam * last
            adv[:, t] = last
        ret = adv + V
        fS, fM, fA, fLP = S.reshape(E * U, -1), M.reshape(E * U, -1), Act.reshape(-1), LP.reshape(-1)
        fAdv, fRet = adv.reshape(-1), ret.reshape(-1)
        fAdv = (fAdv - fAdv.mean()) / (fAdv.std() + 1e-8)
        n = E * U
        for _ in range(cfg.epochs):
            with torch.no_grad():
                kl = float((fLP - torch.log_softmax(pol.logits(fS, fM), 1).gather(1, fA[:, None])[:, 0]).mean())
            if kl > cfg.target_kl:
                break
            perm = torch.randperm(n, generator=gen).to(dev)
            for i in range(0, n, cfg.minibatch):
                j = perm[i:i + cfg.minibatch]
                lg = pol.logits(fS[j], fM[j])
                logp = torch.log_softmax(lg, 1)
                lp = logp.gather(1, fA[j, None])[:, 0]
                ratio = torch.exp(lp - fLP[j])
                a = fAdv[j]
                pl = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
                ent = -(torch.softmax(lg, 1) * logp.clamp_min(-1e4)).sum(1).mean()
                vl = ((pol.v(fS[j])[:, 0] - fRet[j]) ** 2).mean()
                loss = pl + 0.5 * vl - cfg.entropy * ent
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
                opt.step()
        h = {"iter": it, "score_mean": float(np.mean(scores)), "score_min": float(np.min(scores)), "best": best[0]}
        history.append(h)
        if progress:
            progress(f"ppo iter {it + 1}/{cfg.iterations}: {'measured' if plans else 'predicted'} "
                     f"{h['score_mean']:.3f} (best {best[0]:.4f}) x knapsack, {time.time() - t_start:.0f} s")
    # the final policy's greedy plan competes too
    _, _, G, _, _ = rollout(env, pol, 1, greedy=True)
    g = G[0].cpu().numpy().astype(np.int64)
    fill_slack(table, g, env.cap)
    gscore = score(g)
    if gscore < best[0]:
        best = (gscore, g)
    choice = best[1]
    if plans is not None:
        choice = _confirm(plans, measurer, ks_np, cfg, info, paired_se)
    used = table.plan_bits(choice)
    assert used <= env.cap, "masking failed: plan over budget"
    info.update(history=history, best_score=best[0], greedy_score=gscore, seconds=time.time() - t_start,
                measured_episodes=0 if measurer is None else len(plans.search),
                measure_seconds=0.0 if measurer is None else measurer.seconds,
                units_changed=int((choice != ks_np).sum()), chose_knapsack=bool(np.array_equal(choice, ks_np)),
                predicted_vs_knapsack=float(table.damage[idx, choice].sum()) / env.dref)
    return choice, info


def _confirm(plans: _Plans, measurer, ks: np.ndarray, cfg: PPOConfig, info: dict, paired_se) -> np.ndarray:
    """The answer among the best measured plans: the `confirm_top` lowest on the search windows and the knapsack's,
    re-measured on the confirm windows (so the pick among many noisy measurements is not its own evidence), where
    the best replaces the knapsack's only if better by more than `confirm_z` paired standard errors;
    without confirm windows, the lowest on the search windows. Records the noise: paired standard errors of
    measured plans against the knapsack's on the same windows, next to the differences being ranked."""
    ks_s = plans(ks)
    ranked = sorted(plans.search.values(), key=lambda v: float(v[1].mean()))
    others = [v for v in plans.search.values() if not np.array_equal(v[0], ks)]
    ses = [paired_se(v[1], ks_s) for v in others]
    diffs = [abs(float(v[1].mean() - ks_s.mean())) for v in others]
    noise = {"search_windows": len(ks_s), "knapsack_search": float(ks_s.mean()),
             "median_paired_se": float(np.median(ses)) if ses else None,
             "median_abs_diff": float(np.median(diffs)) if diffs else None,
             "best_search_diff": float(ranked[0][1].mean() - ks_s.mean())}
    if "confirm" not in measurer.windows:
        info["noise"] = noise
        return ranked[0][0].copy()
    cands = [v[0] for v in ranked[:cfg.confirm_top]]
    if not any(np.array_equal(c, ks) for c in cands):
        cands.append(ks)
    conf = [measurer.measure(c, "confirm") for c in cands]
    k_ks = next(i for i, c in enumerate(cands) if np.array_equal(c, ks))
    i = int(np.argmin([float(c.mean()) for c in conf]))
    if i != k_ks and float(conf[k_ks].mean() - conf[i].mean()) <= cfg.confirm_z * paired_se(conf[i], conf[k_ks]):
        noise["not_significant"] = float(conf[i].mean() - conf[k_ks].mean())
        i = k_ks                                    # within the noise: keep the knapsack plan
    noise.update(confirm_windows=len(conf[k_ks]), knapsack_confirm=float(conf[k_ks].mean()),
                 chosen_confirm_diff=float(conf[i].mean() - conf[k_ks].mean()),
                 chosen_confirm_se=paired_se(conf[i], conf[k_ks]) if i != k_ks else 0.0,
                 chosen_search_diff=float(plans(cands[i]).mean() - ks_s.mean()),
                 chosen_search_se=paired_se(plans(cands[i]), ks_s) if i != k_ks else 0.0,
                 confirmed=len(cands))
    info["noise"] = noise
    return cands[i].copy()
