"""Calibration: text -> windows -> per-linear input and gradient statistics (tiny random models, CPU)."""
from __future__ import annotations

import pytest
import torch

from wqedge.calib import (InputStats, calibration_tokens, collect_stats, gradient_stats, heldout_loss,
                          layerwise_stats, windows_from_tokens)
from wqedge.tinymodel import tiny_corpus

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer

    from wqedge.checkpoint import LlamaCheckpoint
    ckpt = LlamaCheckpoint.open(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = ckpt.load_hf_model(torch.float32)
    text = "\n".join(tiny_corpus(400))
    return ckpt, tok, model, text


def test_windows_are_bos_led_disjoint_and_deterministic():
    toks = list(range(1, 20001))
    a = windows_from_tokens(toks, n_seqs=8, seqlen=256, n_heldout=3, bos_id=1, seed=0)
    b = windows_from_tokens(toks, n_seqs=8, seqlen=256, n_heldout=3, bos_id=1, seed=0)
    assert a.train.shape == (8, 256) and a.heldout.shape == (3, 256)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert (a.train[:, 0] == 1).all() and (a.heldout[:, 0] == 1).all()
    starts_train = {int(r[1]) for r in a.train}
    starts_held = {int(r[1]) for r in a.heldout}
    assert not starts_train & starts_held
    # windows are aligned, non-overlapping cuts of the text
    assert all((s - 2) % 256 == 0 for s in starts_train | starts_held)


def test_short_text_gives_one_short_window():
    c = windows_from_tokens(list(range(100)), n_seqs=4, seqlen=512, n_heldout=2)
    assert c.train.shape == (1, 100) and c.heldout.shape[0] == 0
    with pytest.raises(ValueError):
        windows_from_tokens([1, 2, 3], n_seqs=4, seqlen=512)


def test_calibration_tokens_from_text_and_file(tiny, tmp_path):
    _, tok, _, text = tiny
    f = tmp_path / "c.txt"
    f.write_text(text)
    a = calibration_tokens(tok, text, n_seqs=4, seqlen=64, n_heldout=1)
    b = calibration_tokens(tok, str(f), n_seqs=4, seqlen=64, n_heldout=1)
    assert torch.equal(a.train, b.train) and a.train.shape == (4, 64)
    with pytest.raises(FileNotFoundError):
        calibration_tokens(tok, str(tmp_path / "missing.txt"))


def test_a_text_is_tokenized_once_for_planning_and_feedback(tiny):
    """Planning and error feedback cut the same text: the second cut reuses the tokens (same windows), and another
    text or another BOS is tokenized afresh."""
    _, tok, _, text = tiny
    calls = []

    class Counting:
        name_or_path = tok.name_or_path

        def __len__(self):
            return len(tok)

        def __call__(self, t, **kw):
            calls.append(len(t))
            return tok(t, **kw)
    counting = Counting()
    a = calibration_tokens(counting, text, 4, 64, 1, bos_id=1)
    b = calibration_tokens(counting, text, 8, 64, 0, bos_id=1)
    assert len(calls) == 1
    fresh = calibration_tokens(tok, text, 4, 64, 1, bos_id=1)       # another tokenizer object: tokenized again
    assert torch.equal(a.train, fresh.train) and torch.equal(a.heldout, fresh.heldout)
    assert a.n_text_tokens == b.n_text_tokens == fresh.n_text_tokens and b.train.shape[0] == 8
    calibration_tokens(counting, text + " more", 4, 64, 1, bos_id=1)
    calibration_tokens(counting, text, 4, 64, 1, bos_id=2)
    assert len(calls) == 3


def test_layerwise_stats_match_a_full_forward(tiny):
    ckpt, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=3, seqlen=64, n_heldout=0)
    st = layerwise_stats(model, cs.train, device="cpu", batch_size=2)
    # reference: hooks on an ordinary full-model forward
    ref = {}
    hooks = []
    for lin in ckpt.spec.linears():
        mod = model.get_submodule(lin.hf_name[: -len(".weight")])
        hooks.append(mod.register_forward_pre_hook(
            lambda m, args, n=lin.hf_name: ref.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(cs.train)
    for h in hooks:
        h.remove()
    assert set(st) == {lin.hf_name for lin in ckpt.spec.linears()}
    for name, xs in ref.items():
        x = torch.cat(xs).double()
        s = st[name]
        assert isinstance(s, InputStats) and s.n_tokens == x.shape[0]
        torch.testing.assert_close(s.diag, (x * x).mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.mean_abs, x.abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.max_abs.double(), x.abs().amax(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.xtx, x.T @ x / x.shape[0], rtol=1e-3, atol=1e-5)


def test_on_layer_changes_reach_later_layers(tiny):
    _, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=2, seqlen=32, n_heldout=0)
    base = layerwise_stats(model, cs.train, device="cpu", full_xtx=False)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def zero_mlp(li, layer, stats):
        if li == 0:
            layer.mlp.down_proj.weight.data.zero_()
            return True
        return False

    try:
        changed = layerwise_stats(model, cs.train, device="cpu", full_xtx=False, on_layer=zero_mlp)
    finally:
        for n, p in model.named_parameters():
            p.data.copy_(saved[n])
    n0 = "model.layers.0.self_attn.q_proj.weight"
    n1 = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(changed[n0].diag, base[n0].diag)      # before the change: same
    assert not torch.allclose(changed[n1].diag, base[n1].diag)        # after it: the new inputs


def test_gradient_stats(tiny):
    ckpt, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=2, seqlen=32, n_heldout=0)
    gs = gradient_stats(model, cs.train, device="cpu", batch_size=1, fisher_diag=True)
    for lin in ckpt.spec.linears():
        g = gs[lin.hf_name]
        assert g.g2.shape == (lin.out_features,) and bool((g.g2 > 0).all())
        assert g.fisher.shape == (lin.out_features, lin.in_features) and bool((g.fisher >= 0).all())
    assert all(p.grad is None for p in model.parameters())
    assert heldout_loss(model, cs.train) > 0


def test_collect_stats_for_the_converter(tiny):
    ckpt, _, _, text = tiny
    st = collect_stats(ckpt, text, device="cpu", n_seqs=2, seqlen=32)
    for lin in ckpt.spec.linears():
        assert st[lin.hf_name].shape == (lin.in_features,) and st[lin.hf_name].dtype == torch.float32


@pytest.mark.parametrize("k", [96, 300, 640])
def test_xtx_accumulator_full_tiles_and_diagonal_blocks(k):
    """XᵀX gathered tile by tile (upper triangle, mirrored) equals X.T @ X, exactly symmetric; the block form holds
    the diagonal G x G blocks of the same matrix (a ragged last block included) and zeros elsewhere."""
    from wqedge.calib import _Accumulator
    torch.manual_seed(k)
    xs = [torch.randn(3, 50, k) * torch.linspace(0.1, 3, k) for _ in range(2)]
    full, block = _Accumulator(k, True, "cpu"), _Accumulator(k, 128, "cpu")
    for x in xs:
        full.add(x)
        block.add(x)
    X = torch.cat([x.reshape(-1, k) for x in xs]).double()
    want = X.T @ X / X.shape[0]
    f, b = full.result(), block.result()
    assert f.xtx_block is None and b.xtx_block == 128
    assert torch.allclose(f.xtx, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(f.xtx, f.xtx.T)
    mask = torch.zeros(k, k, dtype=torch.bool)
    for s in range(0, k, 128):
        mask[s:s + 128, s:s + 128] = True
    assert torch.allclose(b.xtx[mask], want[mask], rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not bool(b.xtx[~mask].any())
    assert torch.equal(f.diag, b.diag)


def test_damage_table_from_diagonal_blocks_equals_full_xtx(tiny):
    """The planner gathers only XᵀX's chunk blocks (all the K-FAC damage reads): the same table as from the full
    matrix; feedback-aware damage, which needs the whole matrix, refuses block statistics."""
    from wqedge.damage import build_damage_table
    ckpt, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=4, seqlen=64, n_heldout=0)
    g = 64
    full = layerwise_stats(model, cs.train, full_xtx=True)
    block = layerwise_stats(model, cs.train, full_xtx=g)
    gs = gradient_stats(model, cs.train)
    lins = ckpt.spec.linears()[:4]
    a = build_damage_table(lins, ckpt.linear_weight, g, full, gs, max_rows=None)
    b = build_damage_table(lins, ckpt.linear_weight, g, block, gs, max_rows=None)
    assert a.damage.shape == b.damage.shape
    assert torch.allclose(torch.from_numpy(a.damage), torch.from_numpy(b.damage), rtol=1e-4, atol=1e-12)
    with pytest.raises(ValueError, match="needs full XᵀX"):
        build_damage_table(lins, ckpt.linear_weight, g, block, gs, feedback=True)
    with pytest.raises(ValueError, match="do not cover chunks"):
        build_damage_table(lins, ckpt.linear_weight, 128, block, gs)


def test_gradient_pass_gathers_input_stats_for_its_windows(tiny):
    """Planning on CPU gathers the input statistics of the gradient pass's windows in that pass's forward
    (InputStatsHooks) and runs layerwise_stats on the others only: the same statistics as layerwise_stats on every
    window (float summation order aside), and the hooks are gone afterwards."""
    from wqedge.calib import InputStatsHooks
    ckpt, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=5, seqlen=48, n_heldout=0)
    g = 32
    want = layerwise_stats(model, cs.train, full_xtx=g)
    with InputStatsHooks(model, g, "cpu") as seen:
        gradient_stats(model, cs.train[:2], batch_size=2)
    got = layerwise_stats(model, cs.train[2:], full_xtx=g, prior=seen)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert set(got) == set(want)
    for name, w in want.items():
        s = got[name]
        assert s.n_tokens == w.n_tokens == 5 * 48 and s.xtx_block == g
        torch.testing.assert_close(s.diag, w.diag, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s.mean_abs, w.mean_abs, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s.max_abs, w.max_abs, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.xtx, w.xtx, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="full XᵀX"):
        InputStatsHooks(model, True, "cpu")


def test_planning_shares_the_gradient_forward_on_cpu(tiny, monkeypatch):
    """prepare() takes the shared pass on CPU with block statistics, diagonal or the pruning search's band
    (layerwise_stats sees only the windows the gradient pass did not), and the separate passes with dense XᵀX
    (feedback-aware damage)."""
    from wqedge.alloc import planner
    import wqedge.calib as calib
    ckpt, tok, model, text = tiny
    seen = []
    real = calib.layerwise_stats

    def spy(model, tokens, *a, **kw):
        seen.append((tokens.shape[0], kw.get("prior") is not None))
        return real(model, tokens, *a, **kw)
    monkeypatch.setattr(calib, "layerwise_stats", spy)
    opts = dict(n_seqs=6, seqlen=32, n_heldout=0, n_grad_seqs=2, progress=False, group_size=32)
    planner.prepare(ckpt, calib_text=text, **opts)
    assert seen == [(6 - 2, True)]
    seen.clear()
    _, ctx = planner.prepare(ckpt, calib_text=text, full_xtx=True, **opts)
    assert seen == [(6 - 2, True)]
    st = next(iter(ctx.input_stats.values()))
    assert st.xtx_block == 32 and st.xtx_band == calib.PRUNE_XTX_BAND
    seen.clear()
    planner.prepare(ckpt, calib_text=text, feedback_damage=True, **opts)
    assert seen == [(6, False)]


def test_damage_table_is_the_same_with_two_linears_at_once(tiny, monkeypatch):
    """build_damage_table fits two linears at a time on CPU (damage.TABLE_THREADS): the same table, bit for bit,
    as one at a time."""
    from wqedge import damage
    ckpt, tok, model, text = tiny
    cs = calibration_tokens(tok, text, n_seqs=3, seqlen=48, n_heldout=0)
    st = layerwise_stats(model, cs.train, full_xtx=32)
    gs = gradient_stats(model, cs.train)
    lins = ckpt.spec.linears()
    assert damage.TABLE_THREADS == 2
    two = damage.build_damage_table(lins, ckpt.linear_weight, 32, st, gs, actions=("q8", "q4", "q2", "q1", "q4s"))
    monkeypatch.setattr(damage, "TABLE_THREADS", 1)
    one = damage.build_damage_table(lins, ckpt.linear_weight, 32, st, gs, actions=("q8", "q4", "q2", "q1", "q4s"))
    assert one.damage.shape == (len(one.units), 5) and (one.damage > 0).any()
    assert (one.damage == two.damage).all() and (one.features == two.features).all()
