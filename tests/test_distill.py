"""NeUQI light distillation (wqedge.quant.distill): what it tunes, what it keeps, and the file it leads to."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wqedge import blocks, pipeline
from wqedge.checkpoint import LlamaCheckpoint
from wqedge.plan import Plan
from wqedge.quant.distill import TunableLinear, distill_model
from wqedge.quant.feedback import dequantize, quantize_model

STEPS = 12
CALIB = " ".join(f"item {i} of the list is {i * 7 % 13} and the next one follows." for i in range(400))


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    """A tiny random model, a mixed plan (every quantized kind, two-level ones too, one fp16 chunk, protected columns), its
    error-feedback chunks, random token windows (train / held out) and one distillation of it."""
    torch.manual_seed(0)
    ckpt = LlamaCheckpoint.open(tiny_model_factory(n_layers=2, hidden=64, intermediate=128, vocab_size=512))
    actions = ["q2", "ternary", "q1", "q3", "q4", "fp16", "q8", "q3s", "q2s"]
    linears = ckpt.spec.linears()
    acts, prot = {}, {}
    for i, lin in enumerate(linears):
        n_chunks = -(-lin.in_features // 32)
        acts[lin.hf_name] = [actions[(i + c) % len(actions)] for c in range(n_chunks)]
        prot[lin.hf_name] = [[3] if (i + c) % 5 == 0 and acts[lin.hf_name][c] != "fp16" else [] for c in range(n_chunks)]
    plan = Plan.from_actions(linears, 32, 16.0, "greedy", acts, "neuqi", protected=prot, model_name=ckpt.spec.name,
                             model_fingerprint=ckpt.fingerprint())
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(3, 512, (20, 32), generator=g)
    toks[:, 0] = 1
    fitted = quantize_model(ckpt.load_hf_model(), plan, toks[:16], device="cpu")
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], STEPS, device="cpu", lr=1e-2)
    return ckpt, plan, fitted, toks, res


def test_distillation_lowers_heldout_block_mse(setup):
    """Every layer's output on held-out windows is closer to the fp layer's after tuning than before."""
    *_, res = setup
    assert len(res.layers) == 2
    for layer in res.layers:
        assert layer["after"] < layer["before"], layer


def test_codes_kept_parameters_and_norms_changed(setup):
    ckpt, plan, fitted, toks, res = setup
    changed_d = changed_m = 0
    for name, chunks in fitted.items():
        for c0, c1 in zip(chunks, res.chunks[name]):
            assert c0.action == c1.action
            if blocks.block_type(c0.action).is_float:
                np.testing.assert_array_equal(c0.values, c1.values)
                continue
            np.testing.assert_array_equal(c0.codes, c1.codes)
            assert np.asarray(c1.d).dtype == np.float16
            changed_d += int(np.any(c0.d != c1.d))
            if c0.m is not None:
                changed_m += int(np.any(c0.m != c1.m))
            if c0.n_protected:   # the protected columns keep their weights up to the fp16 residual
                w0 = blocks.dequantize_chunk(c0)[:, c0.protected]
                w1 = blocks.dequantize_chunk(c1)[:, c1.protected]
                np.testing.assert_allclose(w1, w0, atol=2e-3 * np.abs(w0).max())
    assert changed_d > 10 and changed_m > 10
    model = ckpt.load_hf_model()
    for name, w in res.norms.items():
        assert not torch.equal(w, model.get_parameter(name).detach().float()), name
    assert res.skipped == []
    assert res.seconds > 0 and res.peak_bytes > 0


def test_tunable_linear_reproduces_chunks_and_rounds_to_them(setup):
    """Untouched, a TunableLinear is the fitted weight exactly; after a change, round_to_file's chunks hold
    exactly what the rounded module computes (protected columns up to their fp16 residual)."""
    _, _, fitted, _, _ = setup
    name = "model.layers.1.mlp.down_proj.weight"
    tl = TunableLinear(fitted[name], "cpu")
    assert torch.equal(tl.weight().detach(), dequantize(fitted[name]))
    with torch.no_grad():
        tl.a.add_(0.05 * torch.randn_like(tl.a))
        tl.b.add_(0.05 * torch.randn_like(tl.b))
    chunks = tl.round_to_file()
    torch.testing.assert_close(tl.weight().detach(), dequantize(chunks), rtol=0, atol=1e-3)
    unprotected = [c for c in chunks if not c.n_protected]
    assert unprotected
    s = 0
    for c in chunks:
        if not c.n_protected:
            assert torch.equal(tl.weight().detach()[:, s:s + c.g], torch.from_numpy(blocks.dequantize_chunk(c)))
        s += c.g


@pytest.mark.parametrize("action", [b.name for b in blocks.BLOCK_TYPES if not b.is_float])
def test_every_kind_tuned_through_its_traits(action):
    """Each quantized kind of the traits table (sub-scale kinds included: their d and dmin per row, sub-block
    codes frozen) is rebuilt exactly, and its tuned row-blocks, packed and decoded, are what the module computes."""
    from wqedge.quant.fit import fit_chunk
    torch.manual_seed(0)
    c = fit_chunk(0.05 * torch.randn(8, 96), action, protected=[5])
    skipped: list[str] = []
    tl = TunableLinear([c], "cpu", skipped)
    assert skipped == [] and tl.tuned_chunks == [True]
    assert torch.equal(tl.weight().detach(), dequantize([c]))
    with torch.no_grad():
        tl.a.add_(0.03)
        tl.b.add_(0.05)
    (c1,) = tl.round_to_file()
    np.testing.assert_array_equal(c1.codes, c.codes)
    back = blocks.decode_chunk(blocks.pack_chunk(c1), action, c1.g, c1.protected, c1.base)
    torch.testing.assert_close(torch.from_numpy(blocks.dequantize_chunk(back)), tl.weight().detach(), rtol=0,
                               atol=1e-3)
    assert not np.array_equal(back.d, np.asarray(c.d, np.float32))


def test_kinds_without_row_form_are_skipped(setup, monkeypatch):
    """A chunk whose weights are not d·A + m·B of its header (as a sub-scale kind's would not be, were its
    sub-scales trained) is left as fitted and named in `skipped`."""
    ckpt, _, fitted, toks, _ = setup
    real = blocks.dequantize_chunk

    def nonlinear(c):
        w = real(c)
        return w * w if c.action == "q1" else w
    monkeypatch.setattr(blocks, "dequantize_chunk", nonlinear)
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:4], None, 2, device="cpu")
    assert res.skipped and all("q1" in s for s in res.skipped)
    for name, chunks in fitted.items():
        for c0, c1 in zip(chunks, res.chunks[name]):
            if c0.action == "q1":
                assert c1 is c0


def test_file_matches_tuned_model(setup, tmp_path):
    """The GGUF written from the distilled fits, read back by the PyTorch reference, is the tuned model:
    distilled codes identical to the undistilled file's, d/m and norms different, logits equal to the
    in-memory model's within 1e-4 (fp32 against fp32 on the same weights)."""
    from wqedge.quantize import convert_to_gguf
    from wqedge.reference import build_model, load_reference
    from wqedge.runtime.gguf_reader import WqGGUF
    from wqedge.spec import other_tensors
    ckpt, plan, fitted, toks, res = setup
    fits = pipeline.Fits("feedback", fitted=res.chunks, norms=res.norms)
    tuned_path = convert_to_gguf(fits.source(ckpt), plan, tmp_path / "tuned.gguf", fitted=res.chunks)
    plain_path = convert_to_gguf(ckpt, plan, tmp_path / "plain.gguf", fitted=fitted)

    tuned, plain = WqGGUF(tuned_path), WqGGUF(plain_path)
    for lin in ckpt.spec.linears():
        for c0, c1 in zip(plain.chunks(lin.gguf_name), tuned.chunks(lin.gguf_name)):
            if not blocks.block_type(c0.action).is_float:
                np.testing.assert_array_equal(c0.codes, c1.codes)
    assert any(not np.array_equal(c0.d, c1.d) for lin in ckpt.spec.linears()
               for c0, c1 in zip(plain.chunks(lin.gguf_name), tuned.chunks(lin.gguf_name)) if c0.d is not None)
    assert not np.array_equal(plain.dense("blk.0.attn_norm.weight"), tuned.dense("blk.0.attn_norm.weight"))

    state = {hf: ckpt.get(hf).float() for hf, _, _ in other_tensors(ckpt.spec)}
    state.update(res.norms)
    state.update({name: dequantize(ch) for name, ch in res.chunks.items()})
    mem = build_model(ckpt.spec, state)
    ref = load_reference(tuned_path)
    with torch.no_grad():
        a, b = mem(toks[16:]).logits, ref(toks[16:]).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_e2e_stage_lowers_heldout_kl(setup):
    ckpt, _, fitted, toks, _ = setup
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=10, device="cpu",
                        e2e_lr=1e-2)
    assert res.e2e["after"] < res.e2e["before"]
    assert "model.norm.weight" in res.norms


def test_e2e_stage_with_text_cross_entropy(setup):
    """e2e_ce mixes the text's next-token cross-entropy into the end-to-end loss: it changes what is trained, the
    guard compares that held-out loss (KL alone is still reported), and the plan's record says so; KL alone
    (e2e_ce 0, the default) records nothing new."""
    ckpt, _, fitted, toks, _ = setup
    kw = dict(device="cpu", e2e_lr=1e-2)
    kl_only = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=6, **kw)
    mixed = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=6, e2e_ce=0.5, **kw)
    e = mixed.e2e
    assert e["ce"] == 0.5 and "ce" not in kl_only.e2e and "e2e_ce" not in kl_only.record()
    # same block stage, same KL before the end-to-end stage; the objective adds half the text's cross-entropy,
    # which on random tokens over a 512-word vocabulary is several nats
    assert e["before"] == pytest.approx(kl_only.e2e["before"], rel=1e-6)
    assert e["objective_before"] > 0.5 * e["before"] + 1.0
    assert e["kept"] == (e["objective_after"] <= e["objective_before"])
    assert mixed.record()["e2e_ce"] == 0.5 and "CE" in mixed.summary()
    if e["kept"] and kl_only.e2e["kept"]:   # different losses, different norms
        assert not torch.equal(mixed.norms["model.norm.weight"], kl_only.norms["model.norm.weight"])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="cross-entropy weight"):
            distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 1, e2e_steps=1, e2e_ce=bad, **kw)


def test_e2e_stage_trains_an_untied_head(setup, tmp_path):
    """e2e_head_lr > 0 trains the untied output head with the rest of the end-to-end stage: the result carries it,
    lower held-out KL than without it here, the plan's record says so, and the written file's head is the trained
    one (q8 of it); a tied model's head (its embedding table) stays."""
    from wqedge.quantize import convert_to_gguf
    from wqedge.reference import load_reference
    ckpt, plan, fitted, toks, _ = setup
    kw = dict(device="cpu", e2e_lr=1e-2)
    base = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=10, **kw)
    head = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=10, e2e_head_lr=3e-2, **kw)
    assert "lm_head.weight" not in base.norms and "e2e_head_lr" not in base.record()
    assert head.e2e["kept"] and head.record()["e2e_head_lr"] == 3e-2
    w0 = ckpt.get("lm_head.weight").float()
    w1 = head.norms["lm_head.weight"]
    assert w1.shape == w0.shape and float((w1 - w0).abs().max()) > 1e-3
    assert head.e2e["after"] < base.e2e["after"]
    fits = pipeline.Fits("feedback", fitted=head.chunks, norms=head.norms)
    path = convert_to_gguf(fits.source(ckpt), plan, tmp_path / "h.gguf", fitted=head.chunks, head="q8")
    w_file = load_reference(path).lm_head.weight.detach().float()
    assert float((w_file - w1).abs().max()) < 0.02 * float(w1.abs().max())   # q8 of the trained head
    assert float((w_file - w0).abs().max()) > 0.5 * float((w1 - w0).abs().max())
    with pytest.raises(ValueError, match="head learning rate"):
        distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 1, e2e_steps=1, e2e_head_lr=-1.0, **kw)


def test_tuned_checkpoint_reads_and_loads_the_distilled_tensors(setup):
    """The writers' view of a distillation (pipeline.Fits.source): its tensors as read and its model as loaded carry
    the distilled norms; everything else, the fingerprint included, is the checkpoint's."""
    ckpt, _, _, _, res = setup
    view = pipeline.Fits("feedback", fitted=res.chunks, norms=res.norms).source(ckpt)
    name = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(res.norms[name], ckpt.get(name).float())
    torch.testing.assert_close(view.get(name), res.norms[name])
    model = view.load_hf_model(torch.float32)
    torch.testing.assert_close(model.get_parameter(name).detach(), res.norms[name])
    torch.testing.assert_close(view.get("model.embed_tokens.weight"), ckpt.get("model.embed_tokens.weight"))
    assert view.fingerprint() == ckpt.fingerprint() and view.stats_view().startswith("tuned:")


def test_e2e_stage_leaves_a_tied_head(tiny_model_factory):
    ckpt = LlamaCheckpoint.open(tiny_model_factory(n_layers=1, hidden=64, intermediate=128, vocab_size=512,
                                                   tie_embeddings=True))
    plan = Plan.from_actions(ckpt.spec.linears(), 32, 16.0, "greedy",
                             {lin.hf_name: ["q4"] * (lin.in_features // 32) for lin in ckpt.spec.linears()}, "neuqi",
                             model_name=ckpt.spec.name, model_fingerprint=ckpt.fingerprint())
    toks = torch.randint(3, 512, (12, 32), generator=torch.Generator().manual_seed(2))
    fitted = quantize_model(ckpt.load_hf_model(), plan, toks[:8], device="cpu")
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:8], toks[8:], 1, e2e_steps=3, device="cpu",
                        e2e_head_lr=3e-2)
    assert "lm_head.weight" not in res.norms and "model.embed_tokens.weight" not in res.norms
    assert "head_lr" not in res.e2e


@pytest.mark.parametrize("steps", [-1, 2.5, True, "3"])
def test_bad_steps(setup, steps):
    ckpt, _, fitted, toks, _ = setup
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        distill_model(ckpt.load_hf_model(), fitted, toks[:4], None, steps, device="cpu")


def test_pipeline_errors(setup):
    ckpt, plan, *_ = setup
    with pytest.raises(pipeline.ConvertError, match="--distill needs calibration text"):
        pipeline.prepare_fits(ckpt, plan, None, distill=4)
    with pytest.raises(pipeline.ConvertError, match="--distill: .* >= 0"):
        pipeline.prepare_fits(ckpt, plan, CALIB, distill=-2)
    with pytest.raises(pipeline.ConvertError, match="--target llamacpp"):
        pipeline.convert(ckpt, plan, "x.gguf", target="llamacpp", calib_text=CALIB, distill=4)
    p = copy.deepcopy(plan)
    pipeline.record_distill(p, 7)
    assert pipeline.distill_steps(p) == 7 and pipeline.distill_steps(p, 0) == 0 and pipeline.distill_steps(plan) == 0


def test_cli_distill(tiny_model_dir, tmp_path):
    """`wqedge convert --distill N` reports time and peak memory; a negative N is refused before any work."""
    from click.testing import CliRunner

    from wqedge.cli import main
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--bits", "2.25", "--calib",
                                  str(calib), "--distill=-3", "--no-check"])
    assert r.exit_code == 2 and "-3" in r.output and not out.exists()   # click: an option value must not start with -
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--preset", "q2", "--calib",
                                  str(calib), "--distill", "3", "--no-check", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "distillation:" in r.output and "peak memory" in r.output and out.exists()
    import json

    from wqedge.runtime.gguf_reader import WqGGUF
    assert json.loads(WqGGUF(out).plan_json)["meta"]["fit"]["distill_steps"] == 3
    # --distill-ce weights the text's cross-entropy in the end-to-end stage; without that stage it says it does nothing
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--preset", "q2", "--calib",
                                  str(calib), "--distill", "2", "--distill-e2e", "2", "--distill-ce", "0.2", "--no-check",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    fit = json.loads(WqGGUF(out).plan_json)["meta"]["fit"]
    assert fit["distill_ce"] == 0.2 and fit["distilled"]["e2e_ce"] == 0.2 and fit["distilled"]["e2e_steps"] == 2
    r = CliRunner().invoke(main, ["inspect", str(out)])   # inspect says how the chunks were fitted
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("distilled: "))
    assert line.startswith("distilled: 2 steps per decoder layer") and "end-to-end 2 steps, loss 0.8·KL + 0.2·CE" in line
    assert ("kept" in line) == fit["distilled"]["e2e_kept"]
    assert any(x.startswith("fit: ") for x in r.output.splitlines())
    r = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "-o", str(out), "--preset", "q2", "--calib",
                                  str(calib), "--distill", "2", "--distill-ce", "0.2", "--no-check", "--device", "cpu"])
    assert r.exit_code == 0 and "--distill-ce 0.2 has no effect" in r.output, r.output


def test_pruned_plan(setup, tmp_path):
    """A pruning plan's chunks (kept rows and columns only) are tuned against the unpruned fp layers, and the
    file made from them computes what the in-memory model (pruned weights as zeros) does."""
    from wqedge.pruning import LayerPruning, Pruning
    from wqedge.quantize import convert_to_gguf
    from wqedge.reference import build_model, load_reference
    from wqedge.spec import other_tensors
    ckpt, _, _, toks, _ = setup
    pr = Pruning.for_spec(ckpt.spec, 32, [LayerPruning(0, ffn_groups=[1], heads=[1, 3]), LayerPruning(1, kv_groups=[1])])
    linears = pr.pruned_spec(ckpt.spec).linears()
    acts = {lin.hf_name: ["q2" if c % 2 else "q3" for c in range(-(-lin.in_features // 32))] for lin in linears}
    plan = Plan.from_actions(linears, 32, 16.0, "greedy", acts, "neuqi", pruning=pr, model_name=ckpt.spec.name,
                             model_fingerprint=ckpt.fingerprint())
    fitted = quantize_model(ckpt.load_hf_model(), plan, toks[:16], device="cpu")
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], STEPS, device="cpu", lr=1e-2,
                        unprune=plan.unprune_weight)
    assert all(x["after"] < x["before"] for x in res.layers)
    path = convert_to_gguf(pipeline.Fits("feedback", fitted=res.chunks, norms=res.norms).source(ckpt), plan,
                           tmp_path / "pruned.gguf", fitted=res.chunks)
    state = {hf: ckpt.get(hf).float() for hf, _, _ in other_tensors(ckpt.spec)}
    state.update(res.norms)
    full = {lin.hf_name: (lin.out_features, lin.in_features) for lin in ckpt.spec.linears()}
    state.update({n: plan.unprune_weight(n, dequantize(ch), full[n]) for n, ch in res.chunks.items()})
    with torch.no_grad():
        a = build_model(ckpt.spec, state)(toks[16:]).logits
        b = load_reference(path)(toks[16:]).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- trained codes (straight-through latent codes)

@pytest.mark.parametrize("action", [b.name for b in blocks.BLOCK_TYPES if not b.is_float])
def test_trained_codes_round_to_the_module(action):
    """With train_codes, the latent codes of every quantized kind (affine, ternary, two-level) move the codes the
    file stores: after any change, round_to_file's chunk, packed and decoded, is what the module computes; codes
    stay on the kind's grid; the protected column keeps its code and weight; a two-level chunk keeps its
    sub-block scale and min codes."""
    from wqedge.quant.distill import CODE_KINDS
    from wqedge.quant.fit import fit_chunk
    torch.manual_seed(0)
    bt = blocks.block_type(action)
    c = fit_chunk(0.05 * torch.randn(8, 96), action, protected=[5])
    tl = TunableLinear([c], "cpu", train_codes=True)
    assert torch.equal(tl.weight().detach(), dequantize([c]))
    if bt.kind not in CODE_KINDS:
        assert tl.codes is None
        return
    with torch.no_grad():
        tl.codes.add_(torch.randn_like(tl.codes))   # about two thirds of the codes move by at least one step
        tl.a.add_(0.03)
    want = tl.weight().detach()
    (c1,) = tl.round_to_file()
    assert c1.codes.dtype == np.uint8 and int(c1.codes.max()) < bt.levels
    changed = c1.codes != c.codes
    assert changed.mean() > 0.3 and tl.codes_changed == int(changed.sum())
    assert not changed[:, 5].any()
    if bt.has_subscales:
        assert np.array_equal(c1.sc, c.sc) and np.array_equal(c1.mn, c.mn)
    w0, w1 = blocks.dequantize_chunk(c)[:, 5], blocks.dequantize_chunk(c1)[:, 5]
    np.testing.assert_allclose(w1, w0, atol=2e-3 * np.abs(w0).max())
    back = blocks.decode_chunk(blocks.pack_chunk(c1), action, c1.g, c1.protected, c1.base)
    torch.testing.assert_close(torch.from_numpy(blocks.dequantize_chunk(back)), want, rtol=0, atol=1e-3)
    torch.testing.assert_close(tl.weight().detach(), want, rtol=0, atol=1e-3)   # the masters now start there


def test_distillation_with_trained_codes(setup, tmp_path):
    """distill_model(code_lr > 0) changes codes and keeps them on their grids, every layer ends below its held-out
    error before training (on this model), and the GGUF written from its fits is the in-memory tuned model (1e-4)."""
    from wqedge.quantize import convert_to_gguf
    from wqedge.reference import build_model, load_reference
    from wqedge.spec import other_tensors
    ckpt, plan, fitted, toks, _ = setup
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 48, device="cpu", lr=1e-2,
                        code_lr=0.05)   # 48 steps: enough for a latent code to cross a half-way point
    assert res.codes_changed > 0 and any(layer["codes_trained"] for layer in res.layers)
    moved = 0
    for name, chunks in fitted.items():
        for c0, c1 in zip(chunks, res.chunks[name]):
            if c0.codes is not None:
                assert int(c1.codes.max()) < blocks.block_type(c1.action).levels
                moved += int((c0.codes != c1.codes).sum())
    assert moved == res.codes_changed
    for layer in res.layers:
        assert layer["after"] <= layer["before"], layer
    path = convert_to_gguf(pipeline.Fits("feedback", fitted=res.chunks, norms=res.norms).source(ckpt), plan,
                           tmp_path / "codes.gguf", fitted=res.chunks)
    state = {hf: ckpt.get(hf).float() for hf, _, _ in other_tensors(ckpt.spec)}
    state.update(res.norms)
    state.update({name: dequantize(ch) for name, ch in res.chunks.items()})
    with torch.no_grad():
        a = build_model(ckpt.spec, state)(toks[16:]).logits
        b = load_reference(path)(toks[16:]).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_code_training_that_raises_heldout_error_is_undone(setup):
    """A code learning rate far too high scrambles the codes: each layer whose held-out error rose is trained
    again with its codes frozen (the result then equals frozen-codes distillation's for the first such layer), and
    an end-to-end stage that raises the held-out KL is dropped (the block stage's fits are returned)."""
    ckpt, _, fitted, toks, _ = setup
    wild = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], STEPS, device="cpu", lr=1e-2,
                         code_lr=3.0)
    frozen = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], STEPS, device="cpu", lr=1e-2)
    assert not wild.layers[0]["codes_trained"]
    assert wild.layers[0]["after"] == frozen.layers[0]["after"]
    for layer in wild.layers:
        assert layer["after"] <= layer["before"]
    block = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, device="cpu", code_lr=0.1)
    e2e = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=6, device="cpu",
                        code_lr=0.1, e2e_code_lr=5.0, e2e_lr=0.5)
    assert e2e.e2e["after"] > e2e.e2e["before"] and not e2e.e2e["kept"]
    for name, chunks in block.chunks.items():
        for c0, c1 in zip(chunks, e2e.chunks[name]):
            for f in ("codes", "d", "m", "values"):
                a, b = getattr(c0, f), getattr(c1, f)
                assert (a is None and b is None) or np.array_equal(a, b), (name, f)
    assert set(e2e.norms) == set(block.norms)


def test_distill_options(setup, tmp_path):
    """What distillation trains by default: codes only with >= DISTILL_CODES_MIN_WINDOWS windows (the GPU's
    256, not the CPU's 32), the end-to-end stage only on CUDA; --freeze-codes / --distill-e2e recorded in the plan
    win; `wqedge plan` records them."""
    import json

    from click.testing import CliRunner

    from wqedge.cli import main
    ckpt, plan, *_ = setup
    p = copy.deepcopy(plan)
    assert pipeline.distill_options(p, "cpu", 32) == (0, 0.0)
    assert pipeline.distill_options(p, "cuda", 256) == (pipeline.DISTILL_E2E_STEPS, pipeline.DISTILL_CODE_LR)
    assert pipeline.distill_options(p, "cpu", pipeline.DISTILL_CODES_MIN_WINDOWS) == (0, pipeline.DISTILL_CODE_LR)
    pipeline.set_distill_options(p, 5, freeze_codes=True)
    assert pipeline.distill_options(p, "cuda", 256) == (5, 0.0)
    with pytest.raises(pipeline.ConvertError, match="--distill-e2e"):
        pipeline.set_distill_options(p, -1)
    pipeline.set_distill_options(p, ce=0.1)
    assert p.meta["fit"]["distill_ce"] == 0.1
    with pytest.raises(pipeline.ConvertError, match=r"--distill-ce must lie in \[0, 1\]"):
        pipeline.set_distill_options(p, ce=1.5)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["plan", str(ckpt.path), "-o", str(out), "--preset", "q2", "--calib", str(calib),
                                  "--distill", "3", "--distill-e2e", "4", "--freeze-codes", "--distill-windows", "24",
                                  "--distill-ce", "0.25", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    fit = json.loads(out.read_text())["meta"]["fit"]
    assert fit["distill_steps"] == 3 and fit["distill_e2e"] == 4 and fit["distill_freeze_codes"] is True
    assert fit["distill_windows"] == 24 and fit["distill_ce"] == 0.25
    report = (tmp_path / "p.txt").read_text()   # the plan's report says what the conversion will do
    assert ("distillation when converted: 3 steps per decoder layer on 24 windows, end-to-end 4 steps, codes frozen, "
            "loss 0.75·KL + 0.25·CE") in report
    r = CliRunner().invoke(main, ["plan", str(ckpt.path), "-o", str(tmp_path / "q.json"), "--preset", "q2",
                                  "--distill-ce", "1.5"])
    assert r.exit_code == 2 and "--distill-ce" in r.output and not (tmp_path / "q.json").exists()


def test_default_e2e_stage_skipped_where_it_would_not_fit(setup, monkeypatch):
    """The default end-to-end stage holds the whole model in float32 several times over: e2e_blocker names the
    need and what is free when it exceeds 70% of the GPU's free memory (a 7B model on any one GPU), else None;
    the estimate grows with trained codes and with the model."""
    from wqedge.quant.distill import e2e_stage_bytes
    from wqedge.spec import ModelSpec
    ckpt, *_ = setup
    need = e2e_stage_bytes(ckpt.spec, True)
    assert need > e2e_stage_bytes(ckpt.spec, False)
    b7 = ModelSpec(hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, intermediate_size=11008,
                   vocab_size=32000)
    assert e2e_stage_bytes(b7, True) > 80 * 2**30    # more than an 80 GB GPU holds
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.6), 2 * need))
    assert pipeline.e2e_blocker(ckpt.spec, "cuda", 0.02) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.8), 2 * need))
    why = pipeline.e2e_blocker(ckpt.spec, "cuda", 0.02)
    assert why and "GiB" in why and "--distill-e2e" in why
    assert pipeline.e2e_blocker(ckpt.spec, "cpu", 0.02) is None


def test_distill_windows_default_and_choice(setup, monkeypatch):
    """Distillation's calibration windows: DISTILL_WINDOWS_GPU on CUDA where the block stage's hidden states fit
    in 70% of the free memory, else the feedback windows (said why); the feedback windows on the CPU; the plan's
    --distill-windows wins everywhere; a count below 1 is refused."""
    from wqedge.quant.distill import block_stage_bytes
    ckpt, plan, *_ = setup
    p = copy.deepcopy(plan)
    p.meta.setdefault("fit", {})["n_seqs"] = 256
    need = block_stage_bytes(ckpt.spec, pipeline.DISTILL_WINDOWS_GPU)
    assert need > block_stage_bytes(ckpt.spec, 256) > 0
    assert pipeline.distill_windows_of(p, ckpt.spec, "cpu") == 256
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.6), 2 * need))
    assert pipeline.distill_windows_of(p, ckpt.spec, "cuda") == pipeline.DISTILL_WINDOWS_GPU
    p.meta["fit"]["n_seqs"] = 2 * pipeline.DISTILL_WINDOWS_GPU    # more feedback windows: distillation keeps them
    assert pipeline.distill_windows_of(p, ckpt.spec, "cuda") == 2 * pipeline.DISTILL_WINDOWS_GPU
    p.meta["fit"]["n_seqs"] = 256
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.8), 2 * need))
    said = []
    assert pipeline.distill_windows_of(p, ckpt.spec, "cuda", said.append) == 256
    assert said and "GiB" in said[0] and "--distill-windows" in said[0]
    pipeline.set_distill_options(p, windows=48)
    assert p.meta["fit"]["distill_windows"] == 48
    assert pipeline.distill_windows_of(p, ckpt.spec, "cuda") == 48 == pipeline.distill_windows_of(p, ckpt.spec, "cpu")
    with pytest.raises(pipeline.ConvertError, match="--distill-windows"):
        pipeline.set_distill_options(p, windows=0)


def test_e2e_stage_out_of_memory_keeps_the_block_stage(setup, monkeypatch):
    """Should the end-to-end stage run out of GPU memory, the block stage's fits are returned, and said so."""
    import wqedge.quant.distill as dm
    ckpt, _, fitted, toks, _ = setup
    block = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, device="cpu")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
    monkeypatch.setattr(dm, "_e2e", oom)
    said = []
    res = distill_model(ckpt.load_hf_model(), fitted, toks[:16], toks[16:], 2, e2e_steps=4, device="cpu",
                        progress=said.append)
    assert res.e2e["out_of_memory"] and not res.e2e["kept"] and any("out of GPU memory" in m for m in said)
    for name, chunks in block.chunks.items():
        for c0, c1 in zip(chunks, res.chunks[name]):
            assert (c0.d is None and c1.d is None) or np.array_equal(c0.d, c1.d)
    assert all(torch.equal(block.norms[k], res.norms[k]) for k in block.norms)
