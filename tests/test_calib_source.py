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
    # the KV-cached sampling loop sees the whole prefix: every token is among the top 40 of a full forward pass
    with torch.no_grad():
        top = model(ids).logits[:, :-1].topk(40, -1).indices
    assert bool((top == ids[:, 1:, None]).any(-1).all())


def test_convert_without_calib_self_calibrates_unless_told_not_to(tiny_model_factory, tmp_path):
    from click.testing import CliRunner

    from wqedge.cli import main
    from wqedge.runtime.gguf_reader import WqGGUF
    model = tiny_model_factory(seed=11)
    runs = {}
    for flag in ("--self-calib", "--no-self-calib"):
        out = tmp_path / f"{flag}.gguf"
        res = CliRunner().invoke(main, ["convert", str(model), "-o", str(out), "--bits", "4.25", flag])
        assert res.exit_code == 0, res.output
        runs[flag] = (res.output, out)
        assert WqGGUF(out).measured_bits() <= 4.25 + 1e-9
    sampled, plain = runs["--self-calib"][0], runs["--no-self-calib"][0]
    assert "sampling 32 x 256 tokens from the model itself" in sampled and "error feedback" in sampled
    assert "allocator greedy" in sampled                 # self text plans like --calib text
    assert "sampling" not in plain and "error feedback" not in plain and "allocator uniform" in plain
    # the check never scores a file on the text it was fitted on
    assert "tokens of self-generated text" in sampled
    assert runs["--self-calib"][1].read_bytes() != runs["--no-self-calib"][1].read_bytes()
