"""The shared perplexity definition (llama.cpp's), checked on logits whose answer is known."""
import math

import numpy as np
import pytest

from wqedge.perplexity import make_windows, perplexity


def test_windows_replace_first_token_with_bos_and_do_not_overlap():
    toks = np.arange(1, 1 + 512 * 3 + 100)
    w = make_windows(toks, bos_id=7, n_ctx=512, n_windows=None)
    assert w.shape == (3, 512)
    assert (w[:, 0] == 7).all()
    assert (w[1, 1:] == toks[513:1024]).all()


def test_uniform_logits_give_vocab_size_and_255_scored_per_window():
    vocab = 50
    toks = np.random.default_rng(0).integers(0, vocab, 512 * 4)
    r = perplexity(lambda w: np.zeros(w.shape + (vocab,), np.float32), toks, 1, 512, 3, batch_size=2)
    assert r.n_scored == 3 * 255
    assert r.perplexity == pytest.approx(vocab)


def test_only_second_half_is_scored():
    vocab = 16
    toks = np.random.default_rng(1).integers(0, vocab, 1024)

    def logits(w):
        # perfect predictions from position 256 on, uniform before
        out = np.zeros(w.shape + (vocab,), np.float32)
        for b in range(w.shape[0]):
            for j in range(256, w.shape[1] - 1):
                out[b, j, w[b, j + 1]] = 50.0
        return out

    r = perplexity(logits, toks, 1, 512, None)
    assert r.perplexity == pytest.approx(1.0, abs=1e-9)
    assert r.perplexity_all > 2.0  # first half uniform counts there
    expect_all = math.exp((2 * 256 * math.log(vocab)) / (2 * 511))
    assert r.perplexity_all == pytest.approx(expect_all, rel=1e-6)


def test_too_short_text_rejected():
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(range(100), 1, 512)


def test_paired_change_and_its_standard_error():
    """change_vs: the relative perplexity change and the standard error of the per-window NLL differences."""
    vocab = 32
    toks = np.random.default_rng(2).integers(0, vocab, 512 * 6)
    rng = np.random.default_rng(3)
    base_logits = rng.normal(size=(6, 512, vocab)).astype(np.float32)
    order = {}

    def fn_of(shift_per_window):
        def fn(w):  # the same logits for a window wherever it appears, its target's logit lowered by the shift
            out = np.empty(w.shape + (vocab,), np.float32)
            for b in range(w.shape[0]):
                i = order.setdefault(w[b].tobytes(), len(order))
                out[b] = base_logits[i]
                out[b, np.arange(511), w[b, 1:]] -= shift_per_window[i]
            return out
        return fn

    base = perplexity(fn_of(np.zeros(6)), toks, 1, 512, 6, batch_size=4)
    assert base.window_nll.shape == (6,)
    assert math.exp(base.window_nll.mean()) == pytest.approx(base.perplexity, rel=1e-12)  # equal windows' counts
    nll = base.window_nll
    assert base.uncertainty == pytest.approx(base.perplexity * nll.std(ddof=1) / math.sqrt(6), rel=1e-12)
    assert perplexity(fn_of(np.zeros(6)), toks, 1, 512, 1).uncertainty is None
    same = perplexity(fn_of(np.zeros(6)), toks, 1, 512, 6)
    assert same.change_vs(base) == pytest.approx((0.0, 0.0), abs=1e-9)
    # lowering the target's logit by s raises that window's NLL by between 0 and s; the SE is the differences'
    shifts = np.array([0.0, 0.1, 0.2, 0.0, 0.3, 0.1])
    worse = perplexity(fn_of(shifts), toks, 1, 512, 6)
    d = worse.window_nll - base.window_nll
    assert (d >= -1e-12).all() and (d <= shifts + 1e-12).all() and d.max() > 0
    rel, se = worse.change_vs(base)
    assert rel == pytest.approx(100 * (worse.perplexity / base.perplexity - 1), rel=1e-9)
    assert rel == pytest.approx(100 * (math.exp(d.mean()) - 1), rel=1e-9)
    assert se == pytest.approx(100 * d.std(ddof=1) / math.sqrt(6), rel=1e-9)
    with pytest.raises(ValueError, match="same windows"):
        perplexity(fn_of(np.zeros(6)), toks, 1, 512, 5).change_vs(base)
