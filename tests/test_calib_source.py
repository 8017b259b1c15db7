"""Data-free calibration (wqedge.calib_source): text the model writes itself, seeded and usable as calibration."""
from __future__ import annotations

import pytest
import torch

from wqedge.calib import calibration_tokens
from wqedge.calib_source import sample_tokens, self_generated_text
from wqedge.checkpoint import LlamaCheckpoint


@pytest.mark.parametrize("bpe", [False, True])
def test_self_generated_text_is_seeded_and_cuts_into_calibration_windows(tiny_model_factory, bpe):
    from transformers import AutoTokenizer
    ckpt = LlamaCheckpoint.open(tiny_model_factory(bpe=bpe))
    a = self_generated_text(ckpt, n_seqs=4, length=40, seed=3, progress=False)
    assert a == self_generated_text(ckpt, n_seqs=4, length=40, seed=3, progress=False)
    assert a != self_generated_text(ckpt, n_seqs=4, length=40, seed=4, progress=False)
    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    cs = calibration_tokens(tok, a, n_seqs=2, seqlen=32, n_heldout=0, bos_id=ckpt.spec.bos_token_id or 1)
    assert cs.train.shape == (2, 32)


def test_sample_tokens_shape_bos_and_threads_restored(tiny_model_factory):
    ckpt = LlamaCheckpoint.open(tiny_model_factory())
    model = ckpt.load_hf_model(torch.float32)
    threads = torch.get_num_threads()
    ids = sample_tokens(model, ckpt.spec.bos_token_id, 3, 17, seed=0)
    assert ids.shape == (3, 17) and (ids[:, 0] == ckpt.spec.bos_token_id).all()
    assert torch.get_num_threads() == threads
    assert torch.equal(ids, sample_tokens(model, ckpt.spec.bos_token_id, 3, 17, seed=0))
