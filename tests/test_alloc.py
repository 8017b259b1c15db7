"""Allocation: damage table, knapsack, PPO, error feedback, planner, report (tiny models, CPU, fast)."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from wqedge import blocks
from wqedge.alloc.greedy import greedy_allocate
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
    ch = greedy_allocate(t, budget)
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
    sub = t.restrict(("q4c", "q3c", "q2c", "ternaryc"))
    units = list(range(5))
    small = DamageTable([sub.units[i] for i in units], sub.actions, sub.bits[units], sub.damage[units], 128)
    for budget in (1.775, 2.175, 2.575, 2.975, 3.475):   # between the kinds' costs (q4c 4.125 ... ternaryc 1.69)
        cap = small.budget_cap(budget)
        best = min((sum(small.damage[i, a] for i, a in enumerate(c)), c)
                   for c in itertools.product(range(4), repeat=5)
                   if sum(small.bits[i, a] for i, a in enumerate(c)) <= cap)
        ch = greedy_allocate(small, budget)
        assert small.plan_bits(ch) <= cap
        assert small.plan_damage(ch) <= best[0] * 1.05 + 1e-12, (budget, small.plan_damage(ch), best)


def test_infeasible_budget_is_a_plan_error():
    _, t = synthetic_table()
    with pytest.raises(PlanError, match="below the cheapest"):
        greedy_allocate(t, 1.0)
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
    assert t.plan_damage(a) <= 1.5 * t.plan_damage(greedy_allocate(t, 2.5))


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
    assert np.all(d[:, ACTIONS.index("q8")] < d[:, ACTIONS.index("q4c")])
    assert np.all(d[:, ACTIONS.index("q4c")] < d[:, ACTIONS.index("q3c")])
    assert np.all(d[:, ACTIONS.index("q3c")] < d[:, ACTIONS.index("q2c")])
    assert np.all(d[:, ACTIONS.index("q2c")] < d[:, ACTIONS.index("q1c")])
    # doubling the output sensitivity of a linear doubles its damage
    name = lins[0].hf_name
    gs2 = dict(gs)
    gs2[name] = GradStats(512, gs[name].g2 * 2)
    t2 = build_damage_table(lins, lambda l: W[l.hf_name], 128, st, gs2, kind="kfac", max_rows=64)
    idx = [u.index for u in t.units if u.linear.hf_name == name]
    np.testing.assert_allclose(t2.damage[idx], 2 * t.damage[idx], rtol=1e-6)


def test_error_feedback_chunks_pack_and_beat_rounding():
    from wqedge.quant.feedback import dequantize, gptq_linear
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
            np.testing.assert_array_equal(blocks.unpack_chunk(b, c.action, c.g, c.protected, c.base),
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
    # protected-column actions offered: the plan records k and any protected columns, and meets the budget
    pr = make_plan(ckpt, 2.5, "greedy", calib_text=text, protect=(2,), max_rows=32, **opts)
    assert pr.meta["protect"] == [2] and pr.effective_bits() <= 2.5
    assert all(len(p) in (0, 2) for t in pr.tensors for p in t.protected)
    assert Plan.load(pr.save(tmp_path / "pr.json"), ckpt.spec, ckpt.fingerprint()).total_bits() == pr.total_bits()
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


@functools.lru_cache(maxsize=None)
def _one_linear_with_outliers(seed=0):
    """One 384x384 linear whose inputs have a loud column (5) and whose weights an outlier column (17)."""
    from wqedge.calib import InputStats
    lin = next(l for l in decoder_linears(1, 384, 384, 384, 96) if l.out_features == l.in_features == 384)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 384, generator=g) @ (torch.randn(384, 384, generator=g) * 0.2 + torch.eye(384))
    x[:, 5] *= 8
    H = (x.T @ x / 4096).double()
    w = torch.randn(384, 384, generator=g) * 0.02
    w[:, 17] *= 6
    st = {lin.hf_name: InputStats(4096, torch.diag(H), x.abs().mean(0).double(), x.abs().amax(0).float(), H)}
    return lin, w, H, st


@functools.lru_cache(maxsize=None)
def _outlier_table(feedback: bool, protect=(2,)):
    lin, w, H, st = _one_linear_with_outliers()
    return build_damage_table([lin], lambda l: w, 128, st, None, kind="proxy", max_rows=None, feedback=feedback,
                              protect=protect)


@pytest.mark.parametrize("action", ["q4c", "q3c", "q2c", "ternaryc", "q3c+p2"])
def test_feedback_aware_damage_predicts_the_error_feedback_loss(action):
    """Priced by conditional precision, a chunk's damage matches what gptq_linear then loses (½ ΔW H ΔWᵀ on
    the damped H it works with) within 15%; the plain ΔW H ΔWᵀ prediction of the rounded fit is ~2x off."""
    from wqedge.quant.gptq import damped_hessian
    from wqedge.saliency import split_action
    lin, w, H, st = _one_linear_with_outliers()
    base, k = split_action(action)
    pred = {}
    for fb in (False, True):
        t = _outlier_table(fb)
        pred[fb] = t.damage[:, t.actions.index(action)].sum()
    from wqedge.quant.feedback import dequantize, gptq_linear
    chunks = gptq_linear(w, H, [base] * 3, 128, "neuqi", protected=t.protected[lin.hf_name][k] if k else None)
    d = (dequantize(chunks) - w).double()
    actual = 0.5 * float((d @ damped_hessian(H)[0] * d).sum())
    assert abs(pred[True] / actual - 1) < 0.15, (pred, actual)
    assert abs(pred[True] / actual - 1) < abs(pred[False] / actual - 1)


def test_protected_actions_are_priced_planned_and_lowered():
    """Protected variants cost exactly their residuals and indices, protect the salient columns (the outlier
    column 17 and the loud input column 5), cut damage, and a knapsack plan using them converts and packs."""
    from wqedge.quant.feedback import dequantize, gptq_linear
    from wqedge.saliency import split_action
    lin, w, H, st = _one_linear_with_outliers()
    t = _outlier_table(True, (1, 2))
    assert "q3c+p2" in t.actions and "q1c+p1" in t.actions and len(t.actions) == 7 + 10
    for a, name in enumerate(t.actions):
        base, k = split_action(name)
        for u in t.units:
            assert t.bits[u.index, a] == blocks.chunk_bits(base, 384, u.width, k)
    cols = t.protected[lin.hf_name][2]
    assert 17 in cols[0] and 5 in cols[0]
    q2, q2p = t.actions.index("q2c"), t.actions.index("q2c+p2")
    assert t.damage[0, q2p] < 0.8 * t.damage[0, q2]          # chunk 0 holds both salient columns
    # a budget between q2 and q3 buys protection for chunk 0 first
    budget = (t.bits[0, q2p] + t.bits[1, q2] + t.bits[2, q2]) / w.numel()
    ch = greedy_allocate(t, budget)
    acts, prot = t.plan_actions(ch)
    plan = Plan.from_actions([lin], 128, budget, "greedy", acts, protected=prot)
    assert plan.total_bits() == t.plan_bits(ch) and plan.effective_bits() <= budget
    assert prot[lin.hf_name][0] == cols[0]
    chunks = gptq_linear(w, H, acts[lin.hf_name], 128, "neuqi", protected=prot[lin.hf_name])
    packed_bits = sum(8 * blocks.pack_chunk(c).nbytes + 16 * c.n_protected + 16 * blocks.block_type(c.action).compact
                      for c in chunks)
    assert packed_bits == plan.total_bits()
    for c in chunks:
        np.testing.assert_array_equal(blocks.unpack_chunk(blocks.pack_chunk(c), c.action, c.g, c.protected, c.base),
                                      dequantize([c]).numpy())
    # and protection measurably lowers the loss of the converted linear against plain q2
    plain = gptq_linear(w, H, ["q2c"] * 3, 128, "neuqi")
    loss = lambda ch: float(((dequantize(ch) - w).double() @ H * (dequantize(ch) - w).double()).sum())
    assert loss(chunks) < 0.9 * loss(plain)


def test_parameter_refit_lowers_the_layer_loss_and_keeps_protected_values():
    """refit_params re-solves d, m with the codes fixed: the loss ½ ΔW XᵀX ΔWᵀ only goes down (per row,
    after fp16 rounding), protected columns keep their values, and what is packed reads back the same."""
    from wqedge.quant.feedback import dequantize, gptq_linear
    lin, w, H, st = _one_linear_with_outliers()
    acts, prot = ["q3", "ternary", "q2"], [[5, 17], [], [1]]
    plain = gptq_linear(w, H, acts, 128, "neuqi", protected=prot, refit=False)
    refit = gptq_linear(w, H, acts, 128, "neuqi", protected=prot, refit=True)
    row_loss = lambda ch: (((dequantize(ch) - w).double() @ H) * (dequantize(ch) - w).double()).sum(1)
    lp, lr = row_loss(plain), row_loss(refit)
    assert bool((lr <= lp * (1 + 1e-9)).all()) and float(lr.sum()) < 0.995 * float(lp.sum())
    for a, b in zip(plain, refit):
        np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(dequantize(refit)[:, [5, 17, 257]].numpy(), dequantize(plain)[:, [5, 17, 257]].numpy(),
                               atol=2e-3)
    for c in refit:
        np.testing.assert_array_equal(blocks.unpack_chunk(blocks.pack_chunk(c), c.action, c.g, c.protected, c.base),
                                      dequantize([c]).numpy())


@pytest.mark.parametrize("action", [a for a in blocks.ACTION_NAMES if not blocks.block_type(a).is_float])
def test_error_feedback_column_rounding_is_the_grid_primitive(action):
    """gptq's per-column rounding (_ColumnGrid: the chunk's grid expanded once, then sliced per column) gives exactly
    the codes and values of affine.block_codes / block_dequantize on that column's stored grid (chunk_grid of the
    column alone), for every kind: constant rows (d = 0), values outside the grid, subscale sub-blocks included."""
    from wqedge.quant.affine import block_codes, block_dequantize, chunk_grid
    from wqedge.quant.fit import fit_chunk
    from wqedge.quant.gptq import _ColumnGrid
    torch.manual_seed(3)
    w = torch.randn(40, 96) * 0.05
    w[3] = 0.25                        # a constant row: d = 0
    c = fit_chunk(w, action)
    bt = blocks.block_type(action)
    x = w + torch.randn_like(w) * 0.03  # what error feedback rounds: moved weights, some off the grid's range
    grid = _ColumnGrid(c, torch.device("cpu"))
    for j in range(w.shape[1]):
        d, m = chunk_grid(bt, c, None, j, 1)
        want_q = block_codes(bt, x[:, j:j + 1], d, m)[:, 0]
        want = block_dequantize(bt, want_q[:, None], d, m)[:, 0]
        q, deq = grid.round(x[:, j], j)
        assert torch.equal(q, want_q) and torch.equal(deq, want), j
        assert torch.equal(grid.codes(x[:, j], j), want_q)
