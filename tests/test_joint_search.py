"""The joint pruning search's measured check (issue 16; wqedge.alloc.joint).

The search predicts each pruned fraction's damage (chunk + structure, second-order); on llama-s at 2.0 bits the
prediction preferred 5% pruned, which measured 5.1% worse than quantization only. Every candidate is now converted
and measured on held-out windows, and a pruned plan is kept only if it measures lower than the quantization-only
plan by more than one paired standard error. Criteria:
- `choose_measured`: the least mean loss wins when it beats index 0 by more than one paired s.e.; within that
  noise, or when worse, index 0 (quantization only) is kept;
- `joint_allocate` with a measure: the measured loss overrules the prediction both ways (structure damage set to
  zero makes the prediction prune the most; a measure that says pruning hurts keeps 0%, one that says the most
  pruned plan is better keeps that one), and every trial records its measured loss;
- `ConvertedPlanLoss`: its loss is the loss of the model converted by wqedge.quant.feedback.quantize_model (to
  1e-12 nats: the same conversion), and the model's weights are bit-identical afterwards.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wqedge.alloc.joint import choose_measured, joint_allocate  # noqa: E402
from wqedge.checkpoint import LlamaCheckpoint  # noqa: E402

SHAPE = dict(hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=256, vocab_size=512)


@pytest.fixture(scope="module")
def planned(tiny_model_factory):
    """(ckpt, table, ctx, structure damage) of a tiny random model with calibration statistics."""
    from wqedge.alloc.planner import prepare
    from wqedge.structure_damage import structure_damage
    from wqedge.tinymodel import tiny_corpus
    ckpt = LlamaCheckpoint.open(tiny_model_factory(**SHAPE))
    table, ctx = prepare(ckpt, 128, " ".join(tiny_corpus(400)), 0, "cpu", progress=False, n_seqs=6, seqlen=64,
                         n_heldout=4, n_grad_seqs=6, full_xtx=True, stream_layers=False)
    sd = structure_damage(ctx.model, ctx.calib.train, 32, device=ctx.device, batch_size=2)
    return ckpt, table, ctx, sd


def test_choose_measured_keeps_quantization_only_within_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.05, 16)
    noise = lambda s: rng.normal(0, s, 16)  # noqa: E731
    # clearly better: kept
    assert choose_measured([base, base + 0.02 + noise(0.001), base - 0.05 + noise(0.001)])[0] == 2
    # better on average by far less than the paired noise: quantization only
    d = noise(0.02)
    k, se = choose_measured([base, base + d - d.mean() - 0.0005])
    assert k == 0 and se > 0.0005
    # worse: quantization only, whatever the prediction said
    assert choose_measured([base, base + 0.01 + noise(0.001)]) == (0, 0.0)


def test_measured_loss_overrules_the_prediction(planned):
    ckpt, table, ctx, sd = planned
    # no structure damage: the prediction sees only the freed bits, so it prunes as much as allowed
    free = dataclasses.replace(sd, ffn=np.zeros_like(sd.ffn), heads=np.zeros_like(sd.heads),
                               kv_groups=np.zeros_like(sd.kv_groups))
    blind = joint_allocate(ckpt, table, ctx, 2.5, free, max_prune=0.2, step=0.1)
    assert len(blind.trials) >= 2 and blind.pruning is not None and not blind.measured

    windows = np.linspace(0.1, 0.3, 8)
    seen = []

    def pruning_hurts(pr, t, choice):
        kept = t.n_weights / table.n_weights
        seen.append(kept)
        return windows + 0.5 * (1 - kept)
    res = joint_allocate(ckpt, table, ctx, 2.5, free, max_prune=0.2, step=0.1, measure=pruning_hurts)
    assert res.measured and res.pruning is None and res.table is table
    assert len(seen) == len(res.trials) and all("measured" in tr for tr in res.trials)
    assert res.trials[0]["chosen"]["by"] == "measured"

    def pruning_helps(pr, t, choice):
        return windows - 0.5 * (1 - t.n_weights / table.n_weights)
    res = joint_allocate(ckpt, table, ctx, 2.5, free, max_prune=0.2, step=0.1, measure=pruning_helps)
    assert res.pruning is not None and res.pruning.to_dict() == blind.pruning.to_dict()
    assert "chosen" in res.trials[-1] and res.trials[-1]["measured"] == min(t["measured"] for t in res.trials)


def test_calibrated_prediction_screens_candidates(planned):
    """Pruned candidates whose calibrated prediction (chunk damage x measured / predicted of the quantization-only
    plan, + structure damage) is far above the quantization-only plan's measured loss are not converted; with
    screen_margin None every candidate is."""
    ckpt, table, ctx, sd = planned
    costly = dataclasses.replace(sd, ffn=1e3 * sd.ffn + 1, heads=1e3 * sd.heads + 1, kv_groups=1e3 * sd.kv_groups + 1)
    calls = []

    def measure(pr, t, choice):
        calls.append(pr)
        return np.linspace(0.1, 0.3, 8)
    res = joint_allocate(ckpt, table, ctx, 2.5, costly, max_prune=0.2, step=0.1, measure=measure)
    assert len(res.trials) >= 2 and calls == [None] and res.pruning is None
    assert all("measured" not in t and t["calibrated"] > 1.25 * res.trials[0]["measured"] for t in res.trials[1:])
    calls.clear()
    res = joint_allocate(ckpt, table, ctx, 2.5, costly, max_prune=0.2, step=0.1, measure=measure, screen_margin=None)
    assert len(calls) == len(res.trials) and all("measured" in t for t in res.trials)


def test_converted_plan_loss_is_the_converted_models(planned):
    from wqedge.alloc.joint import pruned_allocation
    from wqedge.alloc.measure import ConvertedPlanLoss, window_losses
    from wqedge.alloc.planner import plan_from_choice
    from wqedge.alloc.prune import select_pruning
    from wqedge.quant.feedback import quantize_model
    ckpt, table, ctx, sd = planned
    model, fb, held = ctx.model, ctx.calib.train[:4], ctx.calib.heldout
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = ConvertedPlanLoss(model, fb, held, "cpu", original=ckpt.linear_weight)
    assert all(c is None for c in loss.copies.values())     # restored from the checkpoint: nothing held twice
    pr = select_pruning(ckpt.spec, sd, 0.1)
    t, choice, _, _ = pruned_allocation(ckpt, table, ctx, 2.5, sd, pr)
    plan = plan_from_choice(ckpt, t, choice, 2.5, "greedy", pruning=pr)
    got = loss(plan)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    base = window_losses(model, held, "cpu", 4)
    quantize_model(model, plan, fb, device="cpu")
    want = window_losses(model, held, "cpu", 4) - base
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data.copy_(before[n])
    assert got.shape == (len(held),) and np.abs(got - want).max() < 1e-12
    assert np.abs(got).max() > 1e-4          # the plan changed the model (a random model's loss may fall or rise)


def test_plan_measurer_on_pruned_shapes(planned):
    """PPO's reward on a pruned model: with every chunk fp16 the measured loss is that of the unpruned model with
    the pruned structures zeroed (1e-9 nats: the same weights), a quantized plan leaves exact zeros where
    structures were pruned, and close() restores the weights bit for bit."""
    from wqedge.alloc.joint import pruned_allocation, pruned_input_stats
    from wqedge.alloc.measure import PlanMeasurer, window_losses
    from wqedge.alloc.prune import select_pruning
    ckpt, table, ctx, sd = planned
    model, held = ctx.model, ctx.calib.heldout
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pr = select_pruning(ckpt.spec, sd, 0.15)
    assert pr.layers
    t, choice, _, _ = pruned_allocation(ckpt, table, ctx, 2.5, sd, pr)
    base = window_losses(model, held, "cpu", 4)
    with torch.no_grad():                      # the masked fp16 model, built directly
        for lin in ckpt.spec.linears():
            p = model.get_parameter(lin.hf_name)
            kept = pr.prune_weight(lin.layer, lin.proj, before[lin.hf_name]).half().float()
            p.data.copy_(pr.unprune_weight(lin.layer, lin.proj, kept, tuple(p.shape)))
        want = window_losses(model, held, "cpu", 4) - base
        for n, p in model.named_parameters():
            p.data.copy_(before[n])
    m = PlanMeasurer(t, model, "cpu", pruned_input_stats(ckpt, ctx, pr), {"search": held}, pruning=pr)
    try:
        fp16 = np.full(len(t.units), t.actions.index("fp16"))
        got = m.measure(fp16)
        assert np.abs(got - want).max() < 1e-9 and np.abs(want).max() > 1e-4
        m.measure(choice)
        for lin in ckpt.spec.linears():
            w = model.get_parameter(lin.hf_name).detach().numpy()
            gone = ~pr.mask(lin.layer, lin.proj, w.shape)
            assert (w[gone] == 0).all() and np.abs(w[~gone]).max() > 0
    finally:
        m.close()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rl_allocator_plans_pruned_shapes(tiny_model_factory, monkeypatch):
    """`plan --allocator rl --prune`: the joint search chooses the structures, PPO allocates the bits of the kept
    shapes from their knapsack plan, its reward measured on the pruned model; the plan meets the budget and
    validates. Structure damage is set to zero and the check off, so the search prunes whatever a random model says
    and the pruned path is always the one taken."""
    import wqedge.structure_damage as sdm
    from wqedge.alloc.planner import make_plan
    from wqedge.plan import Plan
    from wqedge.tinymodel import tiny_corpus
    real = sdm.structure_damage

    def no_damage(*a, **k):
        d = real(*a, **k)
        return dataclasses.replace(d, ffn=0 * d.ffn, heads=0 * d.heads, kv_groups=0 * d.kv_groups)
    monkeypatch.setattr(sdm, "structure_damage", no_damage)
    ckpt = LlamaCheckpoint.open(tiny_model_factory(**SHAPE))
    plan = make_plan(ckpt, 2.5, "rl", calib_text=" ".join(tiny_corpus(400)), progress=False, prune=("ffn", "heads"),
                     max_prune=0.2, n_seqs=6, seqlen=64, n_heldout=8, n_grad_seqs=6, iterations=2, episodes=4,
                     measure_windows=4, confirm_windows=4, bc_steps=20, prune_check=False)
    assert plan.allocator == "rl" and plan.pruning is not None
    assert plan.meta["pruning"]["chosen_by"] == "predicted damage"
    info = plan.meta["ppo"]
    assert np.isfinite(info["knapsack_measured"])  # the measured reward ran (on the pruned model: test above)
    assert plan.effective_bits() <= 2.5
    back = Plan.from_dict(json.loads(plan.to_json()))
    back.validate(ckpt.spec, ckpt.fingerprint())
    assert back.pruning.to_dict() == plan.pruning.to_dict()


def test_band_of_xtx_is_exact_within_and_zero_beyond():
    """calib.XtxBand: each 128-column block's products with itself and the next `width` blocks equal the dense XᵀX's
    (ragged last block too), and `kept_blocks` over kept columns gives the dense matrix's blocks where the pairs lie
    within the band, zeros beyond it, and counts those."""
    from wqedge.calib import XtxBand, _Accumulator
    g = torch.Generator().manual_seed(0)
    k = 352                                            # 2 x 128 + a ragged 96
    x = torch.randn(300, k, generator=g) * torch.rand(k, generator=g) * 3
    dense, band = _Accumulator(k, True, "cpu"), _Accumulator(k, XtxBand(128, 1), "cpu")
    for i in range(0, 300, 100):
        dense.add(x[i:i + 100])
        band.add(x[i:i + 100])
    d, b = dense.result(), band.result()
    assert (b.xtx_block, b.xtx_band) == (128, 1)
    for s, e in ((0, 128), (128, 256), (256, 352)):
        torch.testing.assert_close(b.block(s, e), d.block(s, e), rtol=1e-12, atol=0)
    near = torch.tensor([c for c in range(k) if not (32 <= c < 96 or 160 <= c < 200)])   # every chunk within 2 blocks
    got, missing = b.kept_blocks(near, 128)
    want, _ = d.kept_blocks(near, 128)
    assert missing == 0 and [t.shape[0] for t in got] == [128, 120]
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)
    far = torch.tensor(list(range(32)) + list(range(100, 140)) + list(range(300, 352)))   # blocks 0 and 2 in one chunk
    (got,), missing = b.kept_blocks(far, 128)
    (want,), _ = d.kept_blocks(far, 128)
    apart = (far[:, None] // 128 - far[None, :] // 128).abs() > 1
    assert missing == int(apart.sum()) > 0
    assert (got[apart] == 0).all() and torch.equal(got[~apart], want[~apart])


def test_pruned_damage_table_from_the_band_equals_the_dense_one(planned):
    """The joint search's pruned tables read XᵀX on the kept columns; with the band (what `prepare(full_xtx=True)`
    gathers now) they equal the tables from the dense matrix when the kept chunks lie within the band."""
    from wqedge.alloc.joint import pruned_allocation
    from wqedge.alloc.prune import select_pruning
    from wqedge.calib import layerwise_stats
    ckpt, table, ctx, sd = planned
    st = next(iter(ctx.input_stats.values()))
    assert st.xtx_band is not None                       # the fixture's prepare(full_xtx=True) gathered a band
    pr = select_pruning(ckpt.spec, sd, 0.15)
    assert pr.layers
    dense = layerwise_stats(ctx.model, ctx.calib.train, full_xtx=True)
    t_band, c_band, d_band, _ = pruned_allocation(ckpt, table, ctx, 2.5, sd, pr)
    t_dense, c_dense, d_dense, _ = pruned_allocation(ckpt, table, dataclasses.replace(ctx, input_stats=dense), 2.5,
                                                     sd, pr)
    assert t_band.meta["xtx_outside_band"] == 0          # (FFN 256: two blocks, every pair within the band)
    np.testing.assert_allclose(t_band.damage, t_dense.damage, rtol=1e-9, atol=1e-15)
    assert np.array_equal(c_band, c_dense) and abs(d_band - d_dense) <= 1e-9 * abs(d_dense)


def test_rl_refines_every_measured_candidate(planned):
    """joint_allocate(refine=...): the second allocator (PPO under --allocator rl) runs on every candidate the
    measure converts, from that candidate's knapsack plan; each candidate keeps whichever of its two plans measures
    lower, and those compete as before (so a pruned shape wins when its re-allocated plan measures best)."""
    ckpt, table, ctx, sd = planned
    free = dataclasses.replace(sd, ffn=np.zeros_like(sd.ffn), heads=np.zeros_like(sd.heads),
                               kv_groups=np.zeros_like(sd.kv_groups))
    windows = np.linspace(0.1, 0.3, 8)
    seen, refined_for = [], []

    def refine(pr, t, choice):
        refined_for.append(t.n_weights)
        better = choice.copy()
        better[0] = 0                      # a marker: unit 0 at the first action (fp16, the top of every budget)
        return t, better, {"marker": t.n_weights}

    def measure(pr, t, choice):
        seen.append((t.n_weights, int(choice[0])))
        kept = t.n_weights / table.n_weights
        # the refined plan of the most pruned candidate measures best; elsewhere refining makes it worse
        bonus = 0.6 if (choice[0] == 0 and kept < 0.85) else (-0.1 if choice[0] == 0 else 0.0)
        return windows + 0.5 * (1 - kept) - bonus
    res = joint_allocate(ckpt, table, ctx, 2.5, free, max_prune=0.2, step=0.1, measure=measure, refine=refine,
                         screen_margin=None)
    n = len(res.trials)
    assert n >= 2
    assert len(refined_for) == n and len(seen) == 2 * n          # each candidate: knapsack, then refined
    assert all("refined" in tr and "measured" in tr["refined"] for tr in res.trials)
    kept = [tr["refined"]["kept"] for tr in res.trials]
    assert kept[0] is False                                       # unpruned: refining measured worse
    assert res.pruning is not None and res.choice[0] == 0 and res.info == {"marker": res.table.n_weights}
    assert res.trials[-1].get("chosen") and res.trials[-1]["refined"]["kept"] is True

    # without a measure the predicted best is refined, alone
    refined_for.clear()
    res = joint_allocate(ckpt, table, ctx, 2.5, free, max_prune=0.2, step=0.1, refine=refine)
    assert len(refined_for) == 1 and res.choice[0] == 0 and res.info is not None


def test_rl_with_the_measured_check_refines_the_measured_candidates(tiny_model_factory):
    """`plan --allocator rl --prune` with the measured check: PPO ran on every candidate the check converted
    (each trial with a measured loss has a re-allocated one beside it), and the plan meets the budget."""
    from wqedge.alloc.planner import make_plan
    from wqedge.tinymodel import tiny_corpus
    ckpt = LlamaCheckpoint.open(tiny_model_factory(**SHAPE))
    plan = make_plan(ckpt, 2.5, "rl", calib_text=" ".join(tiny_corpus(400)), progress=False, prune=("ffn",),
                     max_prune=0.1, n_seqs=6, seqlen=64, n_heldout=8, n_grad_seqs=6, iterations=1, episodes=4,
                     measure_windows=4, confirm_windows=4, bc_steps=10, prune_check_fb_seqs=4)
    trials = plan.meta["pruning"]["search"]
    measured = [t for t in trials if "measured" in t]
    assert measured and all("measured" in t["refined"] and "kept" in t["refined"] for t in measured)
    assert all("refined" not in t for t in trials if "measured" not in t)
    assert plan.meta["pruning"]["chosen_by"] == "measured loss" and "ppo" in plan.meta
    assert plan.effective_bits() <= 2.5
