"""The PPO allocator's measured reward (wqedge.alloc.measure, wqedge.alloc.ppo) on a tiny random model, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wqedge.alloc.greedy import fill_slack, greedy_allocate
from wqedge.alloc.measure import PlanMeasurer, paired_se, window_losses
from wqedge.alloc.ppo import PPOConfig, ppo_allocate

torch.set_num_threads(2)
OPTS = dict(n_seqs=2, seqlen=64, n_heldout=6, n_grad_seqs=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def prepared(tiny_model_dir):
    from wqedge.alloc.planner import prepare
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.tinymodel import tiny_corpus
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    table, ctx = prepare(ckpt, 128, "\n".join(tiny_corpus(400)), 0, **OPTS)
    return ckpt, table, ctx


def cfg(**kw):
    base = dict(iterations=2, episodes=4, bc_steps=20, measure_windows=3, confirm_windows=3, confirm_top=3, seed=5)
    return PPOConfig(**{**base, **kw})


def test_measurer_matches_the_quantized_model_and_restores_it(prepared):
    from wqedge.quant.fit import dequantize_chunk, fit_linear
    _, table, ctx = prepared
    ho = ctx.calib.heldout[:3]
    w0 = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    m = PlanMeasurer(table, ctx.model, "cpu", ctx.input_stats, {"search": ho}, fit="rtn")
    rng = np.random.default_rng(0)
    a = rng.integers(0, len(table.actions), len(table.units))
    b = rng.integers(0, len(table.actions), len(table.units))
    la, lb, la2 = m.measure(a), m.measure(b), m.measure(a)     # incremental assembly: A, B, then A again
    np.testing.assert_array_equal(la, la2)
    assert not np.array_equal(la, lb)
    # the same plan's model built directly from the fits of the quantization core
    m.close()
    for n, p in ctx.model.named_parameters():
        assert torch.equal(p, w0[n]), n                   # close() restored every weight
    base = window_losses(ctx.model, ho, "cpu")
    acts, _ = table.plan_actions(a)
    with torch.no_grad():
        for name, act in acts.items():
            p = ctx.model.get_parameter(name)
            chunks = fit_linear(p.float(), act, 128, "neuqi", ctx.input_stats[name].diag.float())
            p.copy_(torch.cat([dequantize_chunk(c) for c in chunks], 1))
        direct = window_losses(ctx.model, ho, "cpu") - base
        for n, p in ctx.model.named_parameters():
            p.copy_(w0[n])
    np.testing.assert_allclose(la, direct, rtol=1e-5, atol=1e-6)
    assert paired_se(la, la) == 0.0 and paired_se(la, lb) > 0


def test_feedback_fits_are_per_chunk_and_match_the_plans_error_feedback(prepared):
    """The default reward's fits: error feedback inside each chunk. With the block-diagonal XᵀX a chunk's fit
    does not depend on its neighbours' actions, so the cached fits assemble into exactly what gptq_linear gives
    for the plan's mixed actions."""
    from wqedge.alloc.measure import block_diagonal
    from wqedge.quant.gptq import DAMP, gptq_linear
    from wqedge.quant.fit import dequantize_chunk
    from wqedge.units import chunk_bounds
    _, table, ctx = prepared
    ho = ctx.calib.heldout[:2]
    w0 = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    m = PlanMeasurer(table, ctx.model, "cpu", ctx.input_stats, {"search": ho})
    assert m.fit == "feedback"
    a = np.random.default_rng(1).integers(1, len(table.actions), len(table.units))
    la = m.measure(a)
    m.close()
    base = window_losses(ctx.model, ho, "cpu")
    acts, _ = table.plan_actions(a)
    mixed = 0
    with torch.no_grad():
        for name, act in acts.items():
            p = ctx.model.get_parameter(name)
            st = ctx.input_stats[name]
            bd = block_diagonal(st.xtx, chunk_bounds(p.shape[1], 128))
            chunks = gptq_linear(p.float(), bd, act, 128, "neuqi", hdiag=st.diag, damp=DAMP)
            p.copy_(torch.cat([dequantize_chunk(c) for c in chunks], 1))
            mixed += len(set(act)) > 1
        direct = window_losses(ctx.model, ho, "cpu") - base
        for n, p in ctx.model.named_parameters():
            p.copy_(w0[n])
    assert mixed > 0                          # some linear mixes actions across its chunks
    np.testing.assert_allclose(la, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown measurer fit"):
        PlanMeasurer(table, ctx.model, "cpu", ctx.input_stats, {"search": ho}, fit="gptq")


def test_measured_ppo_is_deterministic_and_meets_the_budget(prepared):
    ckpt, table, ctx = prepared
    for budget in (1.75, 2.5):
        a, ia = ppo_allocate(table, budget, cfg(), ctx=ctx)
        b, ib = ppo_allocate(table, budget, cfg(), ctx=ctx)
        np.testing.assert_array_equal(a, b)
        assert ia["best_score"] == ib["best_score"] and ia["noise"] == ib["noise"]
        cap = table.budget_cap(budget)
        assert table.plan_bits(a) <= cap
        # the bits the plan leaves are fewer than any single upgrade of it costs (the slack is spent)
        c = a.copy()
        assert fill_slack(table, c, cap) == table.plan_bits(a) and np.array_equal(c, a)
        from wqedge.alloc.planner import plan_from_choice
        plan = plan_from_choice(ckpt, table, a, budget, "rl")
        assert plan.total_bits() == table.plan_bits(a) and plan.effective_bits() <= budget
        assert ia["measured_episodes"] >= 2 and ia["noise"]["search_windows"] == 3
        assert ia["noise"]["confirm_windows"] == 3
    for n, p in ctx.model.named_parameters():
        assert p.device.type == "cpu"


class FakeMeasurer:
    """A measurer with a known loss: predicted damage plus a pairwise interaction the knapsack cannot see."""

    def __init__(self, table, interact):
        self.t = table
        self.windows = {"search": 1, "confirm": 1}
        self.seconds = 0.0
        self.calls = []
        self.interact = interact

    def prefit(self):
        pass

    def true(self, ch):
        d = float(self.t.damage[np.arange(len(ch)), ch].sum())
        return d + self.interact(ch)

    def measure(self, ch, windows="search"):
        self.calls.append((windows, ch.copy()))
        noise = 0.0 if windows == "confirm" else 1e-3 * (int((ch * np.arange(len(ch))).sum()) % 7)
        v = self.true(ch) + noise
        return np.array([v, v])


def test_keeps_the_best_measured_plan(prepared):
    _, table, _ = prepared
    b = 2.5
    ks = greedy_allocate(table, b)
    # additive loss (what the knapsack solves): the knapsack plan is the answer
    m = FakeMeasurer(table, lambda ch: 0.0)
    ch, info = ppo_allocate(table, b, cfg(), measurer=m)
    confirmed = [c for w, c in m.calls if w == "confirm"]
    assert any(np.array_equal(c, ks) for c in confirmed)
    assert m.true(ch) == min(m.true(c) for c in confirmed)
    assert m.true(ch) <= m.true(ks)
    # an interaction the prediction misses (penalise the knapsack's own top action on unit 0):
    # the answer is the best confirmed plan, never worse than the knapsack's
    pen = lambda c: 10.0 * float(c[0] == ks[0]) * table.damage[np.arange(len(c)), ks].sum()
    m = FakeMeasurer(table, pen)
    ch, info = ppo_allocate(table, b, cfg(iterations=3, episodes=8, bc_steps=5), measurer=m)
    confirmed = [c for w, c in m.calls if w == "confirm"]
    assert m.true(ch) == min(m.true(c) for c in confirmed) <= m.true(ks)
    assert table.plan_bits(ch) <= table.budget_cap(b)
    searched = [c for w, c in m.calls if w == "search"]
    if any(m.true(c) < m.true(ks) for c in searched):
        assert m.true(ch) < m.true(ks) and not info["chose_knapsack"]


def test_a_win_within_the_noise_keeps_the_knapsack_plan(prepared):
    """confirm_z: the best searched plan replaces the knapsack's only when its confirm-window improvement is
    larger than confirm_z paired standard errors."""
    _, table, _ = prepared
    b = 2.5
    ks = greedy_allocate(table, b)

    class Noisy(FakeMeasurer):
        def measure(self, ch, windows="search"):
            self.calls.append((windows, ch.copy()))
            seed = int((ch * np.arange(len(ch))).sum()) % 2**31 + (windows == "confirm")
            return self.true(ch) + np.random.default_rng(seed).normal(0, self.sd, 16)

    scale = table.damage.max(1).sum()                     # more than any plan's damage:
    pen = lambda c: float(c[0] == ks[0]) * scale          # plans that change unit 0 are truly better
    for sd, kept in ((20.0 * scale, True), (1e-6 * scale, False)):
        m = Noisy(table, pen)
        m.sd = sd
        ch, info = ppo_allocate(table, b, cfg(iterations=3, episodes=8, bc_steps=5), measurer=m)
        if not any(c[0] != ks[0] for w, c in m.calls if w == "confirm"):
            pytest.skip("no plan that avoids the penalty was searched")
        assert np.array_equal(ch, ks) == kept, sd
        # kept: another plan measured best on the confirm windows but within the noise, or the knapsack plan did
        confirmed = [c for w, c in list(m.calls) if w == "confirm"]
        best = min(confirmed, key=lambda c: float(m.measure(c, "confirm").mean()))
        assert ("not_significant" in info["noise"] or np.array_equal(best, ks)) == kept
