"""WINDQuant: PPO allocation over column chunks.

The MDP: one step per unit, in the fixed unit order (layer by layer; q k v o gate up down; chunks left to
right); 7 actions (fp16, q8, q4, q3, q2, ternary, q1). State of step t: the unit's depth, projection type
and chunk position, its weight/activation/gradient statistics (wqedge.damage.FEATURE_NAMES), the
predicted damage and effective bits of every action, and the budget left per weight left (with the slack
over the cheapest completion). Actions that would make the budget unreachable (used + bits + cheapest
completion > cap) are masked, so every episode ends inside the budget. Reward: −predicted damage of the
step (normalised by the knapsack plan's total), plus at episode end, for measured episodes, the gap
between the *measured* loss increase of the plan on held-out calibration windows and its prediction
(so a measured episode's return is minus its measured loss increase, in units of the knapsack plan's).

Policy and value are small MLPs (torch, CPU or CUDA). Training: behaviour cloning of the knapsack plan
(wqedge.alloc.greedy) as a warm start, then PPO (clipped objective, GAE) on batches of sampled
episodes. The answer is the plan with the lowest measured held-out loss among every measured episode and
the greedy rollout of the final policy. Everything is seeded: same seed, same plan.
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
from .greedy import greedy_allocate

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
    measure: bool = True          # measure episodes' loss on held-out windows (needs ctx with a model)
    measure_windows: int = 4
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
                p = torch.softmax(lg, 1)
                a = torch.multinomial(p, 1, generator=gen)[:, 0]
            lp = torch.log_softmax(lg, 1).gather(1, a[:, None])[:, 0]
            S.append(s); M.append(m); Act.append(a); LP.append(lp); V.append(pol.v(s)[:, 0])
            used = used + env.bits[t][a]
    return (torch.stack(S, 1), torch.stack(M, 1), torch.stack(Act, 1), torch.stack(LP, 1), torch.stack(V, 1))


# ---------------------------------------------------------------- measuring plans on held-out windows

class Measurer:
    """Loss of a plan on held-out calibration windows, with RTN chunk fits cached per (unit, action)."""

    def __init__(self, table: DamageTable, ctx: PlanningContext, n_windows: int, method: str = "neuqi", threads: int | None = None):
        from ..calib import heldout_loss
        self.threads = threads or torch.get_num_threads()
        self.t = table
        self.model = ctx.model
        self.dev = torch.device(ctx.device)
        self.home = next(self.model.parameters()).device
        self.model.to(self.dev)
        self.stats = ctx.input_stats or {}
        ho = ctx.calib.heldout
        self.tokens = ho[:n_windows] if len(ho) else ctx.calib.train[-n_windows:]
        self.method = method
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.params = {}
        for u in table.units:
            n = u.linear.hf_name
            if n not in self.params:
                self.params[n] = self.model.get_parameter(n)
        self.orig = {n: p.detach().clone() for n, p in self.params.items()}
        self._loss = heldout_loss
        inner = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.base = self._loss(self.model, self.tokens, self.dev)
        torch.set_num_threads(inner)
        self.n = 0
        self.seconds = 0.0

    def _fit(self, ui: int, ai: int) -> torch.Tensor:
        from ..blocks import block_type
        from ..quant.fit import dequantize_chunk, fit_chunk
        k = (ui, ai)
        if k not in self.cache:
            u = self.t.units[ui]
            w = self.orig[u.linear.hf_name][:, u.start:u.end].float()
            a = self.t.actions[ai]
            st = self.stats.get(u.linear.hf_name)
            h = None if st is None else st.diag[u.start:u.end].float()
            self.cache[k] = (w.half().float() if block_type(a).is_float
                             else dequantize_chunk(fit_chunk(w, a, self.method, h)).to(w.device))
        return self.cache[k]

    def close(self):
        self.model.to(self.home)
        self.cache.clear()

    def __call__(self, choice) -> float:
        t0 = time.time()
        inner = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            for ui, ai in enumerate(choice):
                u = self.t.units[ui]
                self.params[u.linear.hf_name].data[:, u.start:u.end] = self._fit(ui, int(ai)).to(
                    self.params[u.linear.hf_name].dtype)
            loss = self._loss(self.model, self.tokens, self.dev)
            for n, p in self.params.items():
                p.data.copy_(self.orig[n])
        torch.set_num_threads(inner)
        self.n += 1
        self.seconds += time.time() - t0
        return loss - self.base


# ---------------------------------------------------------------- training

def ppo_allocate(table: DamageTable, budget_bits: float, cfg: PPOConfig | None = None, ctx: PlanningContext | None = None,
                 progress=None):
    """Train the policy and return (choice [U] action indices, info dict)."""
    cfg = cfg or PPOConfig()
    outer_threads = torch.get_num_threads()
    try:
        return _ppo(table, budget_bits, cfg, ctx, progress, outer_threads)
    finally:
        torch.set_num_threads(outer_threads)


def _ppo(table, budget_bits, cfg, ctx, progress, outer_threads):
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)     # the policy's tiny matrices: one thread (no barrier spinning)
    env = Env(table, budget_bits, dev)
    pol = Policy(env.n_features, env.A, cfg.hidden).to(dev)
    opt = torch.optim.Adam(pol.parameters(), lr=cfg.lr)
    ks = torch.as_tensor(greedy_allocate(table, budget_bits), device=dev)
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

    measurer = None
    if cfg.measure and ctx is not None and ctx.calib is not None:
        measurer = Measurer(table, ctx, cfg.measure_windows, threads=outer_threads)
        ref_meas = measurer(ks.tolist())
        info["knapsack_measured"] = ref_meas
    else:
        ref_meas = None
    best = (float("inf"), None)
    history = []
    dmg = env.dmg
    for it in range(cfg.iterations):
        if time.time() - t_start > cfg.time_limit:
            break
        S, M, Act, LP, V = rollout(env, pol, cfg.episodes, gen=gen)
        E, U = Act.shape
        r = -dmg[torch.arange(U, device=dev)[None, :].expand(E, U), Act]          # [E, U]
        pred = -r.sum(1)
        meas = []
        for e in range(E):
            if measurer is not None:
                m = measurer(Act[e].tolist()) / max(abs(ref_meas), 1e-9)
                r[e, -1] += -(m - float(pred[e]))        # measured replaces predicted in the return
                meas.append(m)
                score = m
            else:
                score = float(pred[e])
            if score < best[0]:
                best = (score, Act[e].clone())
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
                idx = perm[i:i + cfg.minibatch]
                lg = pol.logits(fS[idx], fM[idx])
                logp = torch.log_softmax(lg, 1)
                lp = logp.gather(1, fA[idx, None])[:, 0]
                ratio = torch.exp(lp - fLP[idx])
                a = fAdv[idx]
                pl = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
                ent = -(torch.softmax(lg, 1) * logp.clamp_min(-1e4)).sum(1).mean()
                vl = ((pol.v(fS[idx])[:, 0] - fRet[idx]) ** 2).mean()
                loss = pl + 0.5 * vl - cfg.entropy * ent
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
                opt.step()
        h = {"iter": it, "pred_mean": float(pred.mean()), "pred_min": float(pred.min())}
        if meas:
            h["measured_mean"] = float(np.mean(meas))
            h["measured_min"] = float(np.min(meas))
        history.append(h)
        if progress:
            progress(f"ppo iter {it + 1}/{cfg.iterations}: predicted {h['pred_mean']:.3f}"
                     + (f", measured {h['measured_mean']:.3f} (best {best[0]:.3f})" if meas else "")
                     + f" x knapsack, {time.time() - t_start:.0f} s")
    # the final policy's greedy plan competes too
    _, _, G, _, _ = rollout(env, pol, 1, greedy=True)
    g = G[0]
    gscore = measurer(g.tolist()) / max(abs(ref_meas), 1e-9) if measurer is not None else float(dmg[torch.arange(env.U), g].sum())
    if gscore <= best[0]:
        best = (gscore, g)
    if measurer is not None:
        measurer.close()
    choice = best[1].cpu().numpy().astype(np.int64)
    used = int(table.bits[np.arange(env.U), choice].sum())
    assert used <= env.cap, "masking failed: plan over budget"
    info.update(history=history, best_score=best[0], greedy_score=gscore, seconds=time.time() - t_start,
                measured_episodes=0 if measurer is None else measurer.n,
                measure_seconds=0.0 if measurer is None else measurer.seconds,
                predicted_vs_knapsack=float(dmg[torch.arange(env.U), best[1]].sum()))
    return choice, info
