"""Error feedback over linears that share an input (wqedge.quant.gptq.gptq_linears): one column loop over the stacked
rows of q/k/v (gate/up) gives what one loop per linear gives.

Each row's arithmetic is the same in both; only the float summation order of the block updates (addmm_ over more
rows) may differ, so the tolerance stated is: dequantized weights within 1e-5 of the weights' scale and at most
0.1% of codes different (on the CPU they came out bit-identical)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wqedge.checkpoint import LlamaCheckpoint
from wqedge.plan import Plan
from wqedge.quant.feedback import dequantize, input_groups, quantize_model
from wqedge.quant.gptq import gptq_linear, gptq_linears

CODE_TOL = 1e-3
DEQ_TOL = 1e-5


def _compare(sep, bat, scale):
    n_codes = n_diff = 0
    for a, b in zip(sep, bat):
        assert [c.action for c in a] == [c.action for c in b]
        assert float((dequantize(a) - dequantize(b)).abs().max()) <= DEQ_TOL * scale
        for x, y in zip(a, b):
            if x.codes is not None:
                n_codes += x.codes.size
                n_diff += int((x.codes != y.codes).sum())
            if x.residuals is not None:
                np.testing.assert_allclose(x.residuals.astype(np.float32), y.residuals.astype(np.float32),
                                           atol=DEQ_TOL * scale)
    assert n_diff <= CODE_TOL * n_codes


@pytest.mark.parametrize("act_order", ["chunk", "global", None])
def test_stacked_loop_matches_one_loop_per_linear(act_order):
    """Mixed actions per linear and chunk (one kind per chunk across linears and different kinds; fp16, ternary,
    a subscale kind), protected columns in some linears only, GQA-shaped rows."""
    torch.manual_seed(0)
    K = 320
    X = torch.randn(2000, K) * torch.rand(K) * 2
    xtx = (X.T @ X).double() / 2000
    ws = [torch.randn(96, K), torch.randn(32, K), torch.randn(32, K) * 0.5]
    acts = [["q4", "q3", "fp16"], ["q2", "q3", "q4s"], ["q4", "q3", "ternary"]]
    prot = [[[3, 7], [], []], None, [[], [1], []]]
    sep = [gptq_linear(w, xtx, a, 128, "neuqi", protected=p, act_order=act_order) for w, a, p in zip(ws, acts, prot)]
    bat = gptq_linears(ws, xtx, acts, 128, None, prot, act_order=act_order)
    _compare(sep, bat, 1.0)


def _cycled_plan(ckpt, actions):
    """A plan of 32-column chunks whose actions cycle through `actions` (shifted by one per linear)."""
    linears = ckpt.spec.linears()
    acts = {lin.hf_name: [actions[(i + c) % len(actions)] for c in range(-(-lin.in_features // 32))]
            for i, lin in enumerate(linears)}
    return Plan.from_actions(linears, 32, 16.0, "greedy", acts, "neuqi", model_name=ckpt.spec.name,
                             model_fingerprint=ckpt.fingerprint())


def test_quantize_model_batched_equals_per_linear(tiny_model_factory):
    """A whole tiny model through quantize_model: batched groups (q/k/v, o, gate/up, down) give the per-linear
    chunks within the stated tolerance."""
    ckpt = LlamaCheckpoint.open(tiny_model_factory(n_layers=2, hidden=64, intermediate=128, vocab_size=512))
    plan = _cycled_plan(ckpt, ["q2", "ternary", "q3", "q4", "fp16"])
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(3, 512, (8, 32), generator=g)
    toks[:, 0] = 1
    model = ckpt.load_hf_model()
    from wqedge.calib import layerwise_stats
    st = layerwise_stats(model, toks[:2], device="cpu", full_xtx=False)
    seen = input_groups({k: v for k, v in st.items() if k.startswith("model.layers.0.")}, plan)
    assert [len(g) for g in seen] == [3, 1, 2, 1]
    bat = quantize_model(ckpt.load_hf_model(), plan, toks, device="cpu")
    sep = quantize_model(ckpt.load_hf_model(), plan, toks, device="cpu", batch_linears=False)
    names = sorted(bat)
    assert names == sorted(sep)
    _compare([sep[n] for n in names], [bat[n] for n in names], max(float(ckpt.linear_weight(n).abs().max())
                                                                   for n in names))


def test_quantize_model_fits_a_layers_groups_concurrently_with_the_same_result(tiny_model_factory, monkeypatch):
    """On CPU a layer's groups are fitted two at a time (feedback.FIT_THREADS): the chunks are exactly those of one
    group at a time (the groups are independent)."""
    from wqedge.quant import feedback
    ckpt = LlamaCheckpoint.open(tiny_model_factory(n_layers=2, hidden=64, intermediate=160, vocab_size=512))
    plan = _cycled_plan(ckpt, ["q4", "q3s", "q2", "q4s", "ternary"])
    toks = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(2))
    toks[:, 0] = 1
    assert feedback.FIT_THREADS == 2
    two = quantize_model(ckpt.load_hf_model(), plan, toks, device="cpu")
    monkeypatch.setattr(feedback, "FIT_THREADS", 1)
    one = quantize_model(ckpt.load_hf_model(), plan, toks, device="cpu")
    assert sorted(two) == sorted(one)
    for n in one:
        for a, b in zip(one[n], two[n]):
            assert a.action == b.action
            for f in ("codes", "d", "m", "sc", "mn", "values"):
                x, y = getattr(a, f), getattr(b, f)
                assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), (n, f)
