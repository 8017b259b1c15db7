"""Layer streaming (wqedge.stream): planning and error feedback on a model read one decoder layer at a time from its
safetensors files give the in-memory path's statistics, plan and file bytes; the rule that turns it on; the spilled
chunks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wqedge import pipeline
from wqedge.calib import gradient_stats, layerwise_stats
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.stream import ChunkSpill, StreamedModel, planning_model, wants_streaming

CALIB = " ".join(f"item {i} of the list is {i * 7 % 13} and the next one follows." for i in range(600))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tiny_model_factory):
    return LlamaCheckpoint.open(tiny_model_factory(n_layers=2, hidden=128, intermediate=256, vocab_size=512,
                                                   tie_embeddings=request.param))


def _tokens(n=6, t=64):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, 512, (n, t), generator=g)
    x[:, 0] = 1
    return x


def test_streamed_input_stats_equal_in_memory(ckpt):
    """Same float32 layers, same order of operations: the statistics are bit-identical."""
    toks = _tokens()
    whole = layerwise_stats(ckpt.load_planning_model("cpu"), toks, device="cpu", full_xtx=128, batch_size=2)
    streamed = layerwise_stats(StreamedModel(ckpt, "cpu"), toks, device="cpu", full_xtx=128, batch_size=2)
    assert sorted(whole) == sorted(streamed)
    for name in whole:
        a, b = whole[name], streamed[name]
        assert torch.equal(a.diag, b.diag) and torch.equal(a.max_abs, b.max_abs) and torch.equal(a.xtx, b.xtx)


def test_streamed_gradients_match_whole_model_backward(ckpt):
    """Layer-by-layer backward with recomputation: the same gradients up to float summation order (rtol 1e-4)."""
    toks = _tokens(4)
    whole = gradient_stats(ckpt.load_planning_model("cpu"), toks, device="cpu", batch_size=2)
    streamed = gradient_stats(StreamedModel(ckpt, "cpu"), toks, device="cpu", batch_size=2)
    assert sorted(whole) == sorted(streamed)
    for name in whole:
        assert whole[name].n_tokens == streamed[name].n_tokens
        torch.testing.assert_close(streamed[name].g2, whole[name].g2, rtol=1e-4, atol=1e-12)


def _contents(path):
    """A GGUF's metadata and tensor bytes, the plan JSON's predicted damage left out (compared apart)."""
    import json

    import gguf
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    plan = fields["wqedge.plan"] = json.loads(fields["wqedge.plan"])
    plan["meta"].pop("predicted_damage")
    return fields, {t.name: bytes(np.asarray(t.data).tobytes()) for t in r.tensors}


@pytest.mark.parametrize("bits", [3.25, 4.5])
def test_streamed_plan_and_file_equal_in_memory(ckpt, tmp_path, bits):
    """The whole pipeline (greedy plan with calibration text, error-feedback fitting, writing) streamed and in
    memory: the same actions per chunk and the same GGUF tensors and metadata, up to the plan's predicted damage
    (rel 1e-4: in memory, planning gathers some windows' input statistics in the gradient pass, another float
    summation order); at 4.5 bits with the two-level kinds the default offers there (what a model too large for
    memory gets by default)."""
    plans, files = {}, {}
    for stream in (False, True):
        plan = pipeline.make_plan(ckpt, bits, 128, "greedy", calib_text=CALIB, device="cpu", progress=False,
                                  stream_layers=stream)
        out = tmp_path / f"s{int(stream)}.gguf"
        pipeline.convert(ckpt, plan, out, calib_text=CALIB, device="cpu", stream_layers=stream)
        plans[stream], files[stream] = plan, _contents(out)
    assert [t.actions for t in plans[True].tensors] == [t.actions for t in plans[False].tensors]
    assert plans[True].meta["predicted_damage"] == pytest.approx(plans[False].meta["predicted_damage"], rel=1e-4)
    assert files[True] == files[False]
    if bits >= pipeline.TWO_LEVEL_MIN_BITS:
        assert {"q4s", "q3s"} <= set(plans[True].meta["actions"])


def test_streaming_rule(ckpt):
    """On when the 16-bit copy takes more than 40% of the device's memory, or when asked; off when asked."""
    two = 2 * ckpt.n_params
    assert wants_streaming(ckpt, "cpu", memory=int(two / 0.4) - 1000)
    assert not wants_streaming(ckpt, "cpu", memory=int(two / 0.4) + 1000)
    assert wants_streaming(ckpt, "cpu", True, memory=10 ** 15)
    assert not wants_streaming(ckpt, "cpu", False, memory=1)
    assert isinstance(planning_model(ckpt, "cpu", True), StreamedModel)
    assert not isinstance(planning_model(ckpt, "cpu", False), StreamedModel)


def test_streaming_refuses_whole_model_features(ckpt):
    from wqedge.plan import PlanError
    with pytest.raises(PlanError, match="stream-layers"):
        pipeline.make_plan(ckpt, 3.25, 128, "rl", calib_text=CALIB, device="cpu", progress=False, stream_layers=True)


def test_chunk_spill_round_trip(tiny_model_factory):
    from wqedge.blocks import ChunkData
    spill = ChunkSpill()
    chunks = [ChunkData("q4", 128, codes=np.arange(256, dtype=np.uint8).reshape(2, 128),
                        d=np.ones(2, np.float16), m=np.zeros(2, np.float16))]
    spill["a"] = chunks
    spill["b"] = []
    assert list(spill) == ["a", "b"] and len(spill) == 2
    back = spill["a"]
    np.testing.assert_array_equal(back[0].codes, chunks[0].codes)
    where = spill._dir
    spill.close()
    assert not where.exists()


def test_layerwise_stats_keep_false_drops_used_layers(ckpt):
    """Error feedback's statistics pass keeps no layer's XᵀX after its on_layer call (and returns nothing)."""
    seen = []

    def on_layer(li, layer, stats):
        seen.append((li, sorted(stats)))
        assert all(s.xtx is not None for s in stats.values())
        return False

    out = layerwise_stats(StreamedModel(ckpt, "cpu"), _tokens(2), device="cpu", full_xtx=True, on_layer=on_layer,
                          keep=False)
    assert out == {} and [li for li, _ in seen] == [0, 1] and all(len(names) == 7 for _, names in seen)
