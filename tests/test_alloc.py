"""Allocation: damage table, knapsack, PPO, error feedback, planner, report (tiny models, CPU, fast)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from wqedge import blocks
from wqedge.alloc.deterministic import knapsack
from wqedge.alloc.ppo import PPOConfig, ppo_allocate
from wqedge.damage import ACTIONS, DamageTable, build_damage_table, unit_bits
from wqedge.plan import Plan, PlanError
from wqedge.units import decoder_linears, enumerate_units

torch.set_num_threads(2)


def synthetic_table(n_layers=2, hidden=128, inter=352, seed=0, g=128):
    lins = decoder_linears(n_layers, hidden, inter, hidden, hidden // 2)
    units = enumerate_units(lins, g)
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0, 1.5, len(units))
    per_action = np.array([0.0, 1e-5, 0.01, 0.04, 0.17, 0.45, 0.9])
    dmg = scale[:, None] * per_action[None, :] * rng.uniform(0.7, 1.3, (len(units), len(ACTIONS)))
    dmg[:, 0] = 0.0
    t = DamageTable(units, ACTIONS, unit_bits(units), dmg, g,
                    features=rng.normal(size=(len(units), 8)).astype(np.float32))
    return lins, t


def plan_of(lins, table, choice, budget, name="greedy"):
    acts = {}
    for u, c in zip(table.units, choice):
        acts.setdefault(u.linear.hf_name, []).append(table.actions[c])
    return Plan.from_actions(lins, table.group_size, budget, name, acts)


@pytest.mark.parametrize("budget", [1.26, 1.8, 2.25, 2.5, 3.0, 3.25, 4.25, 8.25, 16.0])
def test_knapsack_meets_budget_exactly_as_the_plan_counts(budget):
    lins, t = synthetic_table()
    ch = knapsack(t, budget)
    plan = plan_of(lins, t, ch, budget)
    assert plan.total_bits() == t.plan_bits(ch)
    assert plan.effective_bits() <= budget
    # nearly all of the budget is used (no cheaper upgrade left unused)
    cap = t.budget_cap(budget)
    cur = t.bits[np.arange(len(ch)), ch]
    upgrades = (t.bits - cur[:, None])
    better = t.damage < t.damage[np.arange(len(ch)), ch][:, None]
    assert not np.any(better & (upgrades > 0) & (upgrades <= cap - t.plan_bits(ch)))


def test_knapsack_is_optimal_on_a_small_instance():
    lins, t = synthetic_table(n_layers=1, hidden=128, inter=128)
    sub = t.restrict(("q4", "q3", "q2", "ternary"))
    units = list(range(5))
    small = DamageTable([sub.units[i] for i in units], sub.actions, sub.bits[units], sub.damage[units], 128)
    for budget in (1.9, 2.3, 2.7, 3.1, 3.6):
        cap = small.budget_cap(budget)
        best = min((sum(small.damage[i, a] for i, a in enumerate(c)), c)
                   for c in itertools.product(range(4), repeat=5)
                   if sum(small.bits[i, a] for i, a in enumerate(c)) <= cap)
        ch = knapsack(small, budget)
        assert small.plan_bits(ch) <= cap
        assert small.plan_damage(ch) <= best[0] * 1.05 + 1e-12, (budget, small.plan_damage(ch), best)


def test_infeasible_budget_is_a_plan_error():
    _, t = synthetic_table()
    with pytest.raises(PlanError, match="below the cheapest"):
        knapsack(t, 1.0)
    with pytest.raises(PlanError):
        ppo_allocate(t, 1.0, PPOConfig(iterations=1, episodes=2, bc_steps=1))


def test_ppo_meets_budget_and_is_deterministic():
    lins, t = synthetic_table()
    cfg = PPOConfig(iterations=2, episodes=4, bc_steps=30, seed=3)
    for budget in (1.3, 2.5, 3.25):
        a, info = ppo_allocate(t, budget, cfg)
        b, _ = ppo_allocate(t, budget, cfg)
        assert np.array_equal(a, b)
        plan = plan_of(lins, t, a, budget, "rl")
        assert plan.effective_bits() <= budget
        assert len(info["history"]) == 2
    # behaviour cloning starts it at the knapsack plan's quality
    a, info = ppo_allocate(t, 2.5, PPOConfig(iterations=1, episodes=2, bc_steps=300))
    assert t.plan_damage(a) <= 1.5 * t.plan_damage(knapsack(t, 2.5))


def test_damage_table_orders_actions_and_counts_bits():
    from wqedge.calib import GradStats, InputStats
    lins = decoder_linears(1, 128, 256, 128, 64)
    torch.manual_seed(0)
    W = {l.hf_name: torch.randn(l.out_features, l.in_features) * 0.02 for l in lins}
    st, gs = {}, {}
    for l in lins:
        x = torch.randn(512, l.in_features).double()
        st[l.hf_name] = InputStats(512, (x * x).mean(0), x.abs().mean(0), x.abs().amax(0).float(), x.T @ x / 512)
        gs[l.hf_name] = GradStats(512, torch.rand(l.out_features).double() + 0.1)
    t = build_damage_table(lins, lambda l: W[l.hf_name], 128, st, gs, kind="kfac", max_rows=64)
    assert t.bits.shape == t.damage.shape == (len(t.units), 7)
    for u in t.units:
        for a, name in enumerate(ACTIONS):
            assert t.bits[u.index, a] == blocks.chunk_bits(name, u.linear.out_features, u.width)
    d = t.damage
    assert np.all(d[:, ACTIONS.index("fp16")] < d[:, ACTIONS.index("q8")])
    assert np.all(d[:, ACTIONS.index("q8")] < d[:, ACTIONS.index("q4")])
    assert np.all(d[:, ACTIONS.index("q4")] < d[:, ACTIONS.index("q3")])
    assert np.all(d[:, ACTIONS.index("q3")] < d[:, ACTIONS.index("q2")])
    assert np.all(d[:, ACTIONS.index("q2")] < d[:, ACTIONS.index("q1")])
    # doubling the output sensitivity of a linear doubles its damage
    name = lins[0].hf_name
    gs2 = dict(gs)
    gs2[name] = GradStats(512, gs[name].g2 * 2)
    t2 = build_damage_table(lins, lambda l: W[l.hf_name], 128, st, gs2, kind="kfac", max_rows=64)
    idx = [u.index for u in t.units if u.linear.hf_name == name]
    np.testing.assert_allclose(t2.damage[idx], 2 * t.damage[idx], rtol=1e-6)


def test_error_feedback_chunks_pack_and_beat_rounding():
    from wqedge.alloc.feedback import dequantize, gptq_linear
    from wqedge.quant.fit import dequantize_chunk, fit_linear
    torch.manual_seed(0)
    x = torch.randn(2048, 256) @ (torch.randn(256, 256) * 0.3 + torch.eye(256))
    H = (x.T @ x / 2048).double()
    w = torch.randn(64, 256) * 0.02
    acts = ["q3", "ternary"]
    err = lambda wh: float(((wh - w).double() @ H * (wh - w).double()).sum())
    rtn = torch.cat([dequantize_chunk(c) for c in fit_linear(w, acts, 128, "neuqi", torch.diag(H).float())], 1)
    for ao in (None, "chunk", "global"):
        chunks = gptq_linear(w, H, acts, 128, "neuqi", protected=[[3, 7], []], act_order=ao)
        wh = dequantize(chunks)
        for c in chunks:   # what the file will hold reads back the same
            b = blocks.pack_chunk(c)
            np.testing.assert_array_equal(blocks.unpack_chunk(b, c.action, c.g, c.protected),
                                          dequantize(([c])).numpy())
        assert chunks[0].n_protected == 2
        assert err(wh) < err(rtn)


def test_make_plan_end_to_end(tiny_model_dir, tmp_path):
    from wqedge.alloc.planner import make_plan
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.report import write_report
    from wqedge.tinymodel import tiny_corpus
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    text = "\n".join(tiny_corpus(300))
    opts = dict(n_seqs=2, seqlen=64, n_heldout=1, n_grad_seqs=2, progress=False, device="cpu")
    g1 = make_plan(ckpt, 2.5, "greedy", calib_text=text, **opts)
    g2 = make_plan(ckpt, 2.5, "greedy", calib_text=text, **opts)
    assert g1.effective_bits() <= 2.5 and g1.validate(ckpt.spec, ckpt.fingerprint())
    assert [t.actions for t in g1.tensors] == [t.actions for t in g2.tensors]
    r1 = make_plan(ckpt, 2.5, "rl", calib_text=text, iterations=1, episodes=2, bc_steps=20, measure_windows=1, **opts)
    r2 = make_plan(ckpt, 2.5, "rl", calib_text=text, iterations=1, episodes=2, bc_steps=20, measure_windows=1, **opts)
    assert r1.effective_bits() <= 2.5
    assert [t.actions for t in r1.tensors] == [t.actions for t in r2.tensors]
    assert r1.meta["ppo"]["measured_episodes"] >= 3
    u = make_plan(ckpt, 3.5, "uniform", progress=False)     # the ragged 96-column chunks cost 3.33 bits in q3
    assert u.action_histogram() == {"q3": sum(len(t.actions) for t in u.tensors)}
    nodata = make_plan(ckpt, 3.0, "greedy", calib_text=None, progress=False, device="cpu")
    assert nodata.effective_bits() <= 3.0
    with pytest.raises(PlanError):
        make_plan(ckpt, 1.0, "greedy", calib_text=text, **opts)
    with pytest.raises(PlanError):
        make_plan(ckpt, 2.5, "nonsense", calib_text=text, **opts)
    # a round trip through JSON keeps it valid
    p = Plan.load(g1.save(tmp_path / "p.json"), ckpt.spec, ckpt.fingerprint())
    assert p.total_bits() == g1.total_bits()
    txt, png = write_report(g1, tmp_path / "rep")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "layer" in txt.read_text()


def test_png_writer_round_trip(tmp_path):
    import struct
    import zlib
    from wqedge.report import write_png
    img = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    data = write_png(tmp_path / "x.png", img).read_bytes()
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (7, 5)
    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    rows = np.frombuffer(raw, np.uint8).reshape(5, 1 + 21)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(5, 7, 3), img)
