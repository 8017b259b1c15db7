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
