"""Parity of the C++ runtime with the PyTorch reference (wqedge.reference) on the same file.

Every test but the q8 ones runs with float activations, set explicitly by a fixture (the library's decode
default is int8 activations since issue 12; float is the reference path); the *q8* tests switch to int8 activations for decode steps and check them
against their own, looser criteria (token-by-token decoding of the fixture model vs the reference: see
Q8_TOL_REL, Q8_MEAN_REL, Q8_TOP1; the measured numbers are in cpp/README.md).

Criteria (issue 3): max |logits_cpp - logits_ref| / std(logits_ref) < 1e-2 and top-1 agreement >= 99.9%
- on the trained fixture model over 2,048 tokens of eval.txt (4 windows of 512, as perplexity runs
  them) for uniform q8, q4, q3, q2, ternary and q1 plans and a mixed plan using every action with
  protected columns (files RTN-quantized here, chunk by chunk; reference logits computed once per plan);
- on random-init models with GQA, tied embeddings, ragged last chunks (g = 100, g = 8), llama3 RoPE
  scaling, F32 embeddings; plus KV-cache decoding == batched prefill, scalar == AVX2 kernels, and
  1 thread == several.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ALL_ACTIONS, ensure_library, mixed_action, write_llama_s, write_tiny  # noqa: E402

ensure_library()
from wqedge.runtime import native  # noqa: E402

torch = pytest.importorskip("torch")

TOL_REL = 1e-2
TOP1 = 0.999
# Int8 activations (decode steps): the bar for making them the default was max |d| / std < 1e-2 and top-1 >= 99%;
# measured on the fixture (2 x 512 tokens): max 0.12-0.21, mean ~0.02, top-1 98.0-98.7%, so float stays the default
# and these are the (looser) criteria the q8 mode is held to.
Q8_TOL_REL = 0.3
Q8_MEAN_REL = 3e-2
Q8_TOP1 = 0.97
# The mixed plan (q1/q2/ternary chunks throughout: a much degraded model with flatter logits) is more sensitive:
# measured max 0.37, mean 0.032, top-1 93.6-94.3%; no single block kind dominates (switching any one back to float
# activations changes little). Row tiles (issue 12, the AVX2 default) run ternary chunks as q2 (unless
# WQEDGE_TERNARY_TILES=1: test_ternary_tiles_q8_parity), whose activations
# are quantized per 32 columns instead of per 32 slots of a trit plane: max 0.387 -> 0.513, mean 0.0314 -> 0.0319,
# top-1 93.75% -> 94.43% (WQEDGE_REPACK=0 vs default, same library); the maximum over 1024 positions x the vocabulary
# moves with any change of rounding, so its bar has headroom; mean and top-1 keep theirs.
Q8_MIXED = (0.65, 5e-2, 0.92)


@pytest.fixture(autouse=True)
def float_activations():
    """The reference-parity criteria above are for float activations; q8 tests switch explicitly."""
    native.set_activations("f32")
    yield
    native.set_activations("f32")


def _reference_logits(path, windows, kv=None) -> np.ndarray:
    from wqedge.reference import load_reference, logits_fn
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    return logits_fn(load_reference(path, kv))(windows)


def _compare(lc: np.ndarray, lr: np.ndarray) -> tuple[float, float]:
    assert lc.shape == lr.shape and np.isfinite(lc).all()
    rel = float(np.abs(lc - lr).max() / lr.std())
    top1 = float((lc.argmax(-1) == lr.argmax(-1)).mean())
    return rel, top1


# ---------------------------------------------------------------- the trained fixture model
PLANS = {
    "q8": (lambda n, c: "q8", None),
    "q4": (lambda n, c: "q4", None),
    "q3": (lambda n, c: "q3", None),
    "q2": (lambda n, c: "q2", None),
    "ternary": (lambda n, c: "ternary", None),
    "q1": (lambda n, c: "q1", None),
    "mixed": (mixed_action, lambda n, c, g: 4 if c % 3 == 0 else 0),
}


@pytest.fixture(scope="module")
def eval_text(fixture_dir) -> str:
    return (fixture_dir / "text" / "eval.txt").read_text(encoding="utf-8")[:40000]


@pytest.fixture(scope="module")
def hf_tokenizer(llama_s_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(llama_s_dir)


@pytest.fixture(scope="module")
def eval_windows(eval_text, hf_tokenizer):
    """4 windows x 512 tokens of eval.txt (first token of each window = BOS), tokenized by Hugging Face."""
    from wqedge.perplexity import make_windows
    ids = hf_tokenizer(eval_text)["input_ids"]
    return make_windows(ids, hf_tokenizer.bos_token_id, n_ctx=512, n_windows=4)


def test_tokenizer_wiring(llama_s_dir, eval_text, hf_tokenizer, tmp_path):
    """The C API's tokenize/detokenize/token_to_piece reach the C++ tokenizer built from the file's keys."""
    m = native.Model(write_llama_s(tmp_path / "q8.gguf", llama_s_dir, lambda n, c: "q8"))
    if not m.info["has_tokenizer"]:
        pytest.skip("libwqedge built without the tokenizer")
    text = eval_text[:3000]
    ids = m.tokenize(text)
    assert ids.tolist() == hf_tokenizer(text)["input_ids"]
    assert m.tokenize(text, add_bos=False).tolist() == ids.tolist()[1:]
    assert m.detokenize(ids) == hf_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert b"".join(m.token_to_piece(t) for t in ids[1:]).decode("utf-8").lstrip(" ") == text.lstrip(" ")
    out = native.run(m.path, "The quick brown fox", max_new_tokens=5)
    assert isinstance(out, str) and len(out) > 0


@pytest.mark.parametrize("plan", list(PLANS))
def test_fixture_model_parity(plan, llama_s_dir, eval_windows, tmp_path):
    action_fn, protect_fn = PLANS[plan]
    path = write_llama_s(tmp_path / f"{plan}.gguf", llama_s_dir, action_fn, protect_fn)
    assert eval_windows.size == 2048
    ev = native.logits_fn(path)
    lc = ev(eval_windows)
    lr = _reference_logits(path, eval_windows)
    rel, top1 = _compare(lc, lr)
    print(f"{plan}: max|d|/std = {rel:.2e}, top-1 agreement = {top1:.5f}")
    assert rel < TOL_REL and top1 >= TOP1, (plan, rel, top1)
    if plan == "mixed":  # every action really occurs
        import json

        from wqedge.runtime.gguf_reader import WqGGUF
        f = WqGGUF(path)
        seen = {a for name in f.linear_names() for a in f.layout(name).actions}
        assert seen == set(ALL_ACTIONS)
        assert json.loads(ev.model.plan_json) == {"test": True}


# ---------------------------------------------------------------- int8 activations (decode steps)
def _decode_logits(path, windows, n_threads=2, **kv) -> np.ndarray:
    """Every position's logits by single-token steps (the matrix-vector path), each window from an empty cache."""
    m = native.Model(path)
    out = np.empty(windows.shape + (m.n_vocab,), np.float32)
    with native.Context(m, n_ctx=windows.shape[1], n_threads=n_threads, **kv) as ctx:
        for b, seq in enumerate(windows):
            ctx.reset()
            for t in range(len(seq)):
                out[b, t] = ctx.eval(seq[t:t + 1])
    return out


def q8_decode_vs_reference(path, win, lr, label: str, **kv) -> tuple[float, float, float, float, float]:
    """Int8-activation decode steps of `path` over windows `win` against the reference logits `lr`: max and mean
    |d| / std, top-1 agreement, and both second-half perplexities (printed with `label`)."""
    native.set_activations("q8")
    try:
        lq = _decode_logits(path, win, **kv)
    finally:
        native.set_activations("f32")
    rel, top1 = _compare(lq, lr)
    mean = float(np.abs(lq - lr).mean() / lr.std())
    pq, pr = _second_half_ppl(lq, win), _second_half_ppl(lr, win)
    print(f"{label}: q8 decode max|d|/std = {rel:.2e}, mean {mean:.2e}, top-1 = {top1:.5f}; perplexity {pq:.5f} vs "
          f"reference {pr:.5f} ({pq / pr - 1:+.2e})")
    return rel, mean, top1, pq, pr


Q8_PLANS = ["q8", "q4", "q3", "ternary", "mixed"]
Q8_PPL_REL = 1e-2   # measured on 2 windows: +9e-4 (q8), +5.0e-3 (q4), +2e-4 (q3), -1e-3 (ternary), +3.3e-3 (mixed)


@pytest.mark.parametrize("plan", Q8_PLANS)
def test_q8_decode_parity(plan, llama_s_dir, eval_windows, tmp_path):
    """Int8 activations: 2 windows x 512 tokens decoded token by token vs the PyTorch reference (float activations).
    q8 exercises the 255-code overflow handling, mixed every action with protected columns."""
    action_fn, protect_fn = PLANS[plan]
    path = write_llama_s(tmp_path / f"{plan}.gguf", llama_s_dir, action_fn, protect_fn)
    win = eval_windows[:2]
    lr = _reference_logits(path, win)
    native.set_activations("q8")
    lq = _decode_logits(path, win)
    native.set_activations("f32")
    rel, top1 = _compare(lq, lr)
    mean = float(np.abs(lq - lr).mean() / lr.std())
    # the same steps with float activations, for scale
    rel_f, top1_f = _compare(_decode_logits(path, win[:1]), lr[:1])
    print(f"{plan}: q8 decode max|d|/std = {rel:.2e}, mean {mean:.2e}, top-1 = {top1:.5f} "
          f"(f32 decode: {rel_f:.2e}, {top1_f:.5f})")
    tol_rel, tol_mean, min_top1 = Q8_MIXED if plan == "mixed" else (Q8_TOL_REL, Q8_MEAN_REL, Q8_TOP1)
    assert rel < tol_rel and mean < tol_mean and top1 >= min_top1, (plan, rel, mean, top1)
    # what a user sees: perplexity (second halves, as wqedge.perplexity scores) moves by well under 1%
    pq, pr = _second_half_ppl(lq, win), _second_half_ppl(lr, win)
    print(f"{plan}: perplexity q8 decode {pq:.5f} vs reference {pr:.5f} ({pq / pr - 1:+.2e})")
    assert abs(pq / pr - 1) < Q8_PPL_REL, (plan, pq, pr)
    assert rel_f < 1e-4 and top1_f >= TOP1


@pytest.mark.parametrize("bits", [4, 8])
def test_q8_decode_with_quantized_kv_cache(bits, llama_s_dir, eval_windows, tmp_path):
    """Int8 activations with a quantized KV cache (the linears' int8 path; attention over the dequantized K/V rows).
    2 windows x 512 tokens decoded token by token vs the reference with the same fake-quantized cache (float
    activations), held to the q8 bars; at 4 bits to Q8_MIXED's: a cache value on a 4-bit rounding boundary takes the
    neighbouring code in one of the two (measured max 0.48, mean 0.038, top-1 96.3%; kv8 0.22, 0.019, 98.1%).
    Perplexity within Q8_PPL_REL either way."""
    from wqedge.kv_format import KVCacheSpec
    path = write_llama_s(tmp_path / "q4.gguf", llama_s_dir, PLANS["q4"][0], PLANS["q4"][1])
    win = eval_windows[:2]
    lr = _reference_logits(path, win, KVCacheSpec(bits))
    rel, mean, top1, pq, pr = q8_decode_vs_reference(path, win, lr, f"kv{bits}", kv_bits=bits)
    tol_rel, tol_mean, min_top1 = Q8_MIXED if bits == 4 else (Q8_TOL_REL, Q8_MEAN_REL, Q8_TOP1)
    assert rel < tol_rel and mean < tol_mean and top1 >= min_top1, (rel, mean, top1)
    assert abs(pq / pr - 1) < Q8_PPL_REL, (pq, pr)


@pytest.mark.parametrize("plan", ["ternary", "mixed"])
def test_ternary_tiles_q8_parity(plan, llama_s_dir, eval_windows, tmp_path):
    """WQEDGE_TERNARY_TILES=1 (ternary chunks in their own 1.6-bit row tiles, not as q2; read once per process, so in a
    child): int8 decode steps held to test_q8_decode_parity's bars against the reference, prefill (the tile GEMM)
    likewise. (Against the row layout no tight bar holds: any change of float summation order flips some int8
    activation codes, and even q4 tiles vs rows differ by max|d|/std 0.24 on this model.)"""
    import subprocess
    action_fn, protect_fn = PLANS[plan]
    path = write_llama_s(tmp_path / f"{plan}.gguf", llama_s_dir, action_fn, protect_fn)
    win = eval_windows[:2]
    np.save(tmp_path / "win.npy", win)
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[3]); from wqedge.runtime import native; "
            "from test_cpp_parity import _decode_logits; native.set_activations('q8'); w = np.load(sys.argv[2]); "
            "np.save(sys.argv[2] + '.dec.npy', _decode_logits(sys.argv[1], w)); "
            "np.save(sys.argv[2] + '.pre.npy', native.logits_fn(sys.argv[1], n_threads=2)(w))")
    # cwd: not the checkout, whose wqedge/ (without runtime/) would shadow the installed package
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "win.npy"), str(Path(__file__).parent)],
                   env=dict(os.environ, WQEDGE_TERNARY_TILES="1", WQEDGE_REPACK="1"), check=True, cwd=tmp_path)
    lr = _reference_logits(path, win)
    tol_rel, tol_mean, min_top1 = Q8_MIXED if plan == "mixed" else (Q8_TOL_REL, Q8_MEAN_REL, Q8_TOP1)
    for mode in ("dec", "pre"):
        lq = np.load(tmp_path / f"win.npy.{mode}.npy")
        rel, top1 = _compare(lq, lr)
        mean = float(np.abs(lq - lr).mean() / lr.std())
        pq, pr = _second_half_ppl(lq, win), _second_half_ppl(lr, win)
        print(f"{plan} ({mode}, ternary tiles): q8 max|d|/std = {rel:.2e}, mean {mean:.2e}, top-1 = {top1:.5f}, "
              f"perplexity {pq:.5f} vs reference {pr:.5f} ({pq / pr - 1:+.2e})")
        assert rel < tol_rel and mean < tol_mean and top1 >= min_top1, (plan, mode, rel, mean, top1)
        assert abs(pq / pr - 1) < Q8_PPL_REL, (plan, mode, pq, pr)


def _second_half_ppl(logits: np.ndarray, windows: np.ndarray) -> float:
    T = windows.shape[1]
    lg = logits[:, T // 2:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse - np.take_along_axis(lg, windows[:, T // 2 + 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.exp(nll.mean()))


def test_default_activations_are_int8():
    """Decode defaults to int8 activations (issue 12); WQEDGE_ACT=f32 selects the float reference path."""
    import os
    import subprocess
    code = "from wqedge.runtime import native; print(native.get_activations())"
    for env_val, want in ((None, "q8"), ("f32", "f32"), ("q8", "q8")):
        env = {k: v for k, v in os.environ.items() if k != "WQEDGE_ACT"}
        if env_val:
            env["WQEDGE_ACT"] = env_val
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                             cwd="/")  # not the checkout: its wqedge/ would shadow the installed package
        assert out.stdout.strip() == want, (env_val, out.stdout, out.stderr)


def test_q8_prefill_switch(llama_s_dir, tmp_path):
    """Batched prompts follow the switch too (q8: the integer prefill, tests/test_cpp_prefill.py; f32: the float
    path); the switch is process wide and round-trips."""
    path = write_llama_s(tmp_path / "q4.gguf", llama_s_dir, lambda n, c: "q4")
    toks = np.arange(1, 65, dtype=np.int32)[None]
    native.set_activations("q8")
    assert native.get_activations() == "q8" and "act=q8" in native.system_info()
    a = native.logits_fn(path, n_threads=1)(toks)
    native.set_activations("f32")
    assert native.get_activations() == "f32"
    b = native.logits_fn(path, n_threads=1)(toks)
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    native.set_activations("q8")
    np.testing.assert_array_equal(native.logits_fn(path, n_threads=1)(toks), a)
    native.set_activations("f32")
    with pytest.raises(ValueError):
        native.set_activations("int4")


# ---------------------------------------------------------------- random-init models
TINY = {
    # GQA (6 heads over 2), tied embeddings, K = 228 -> chunks 128 + 100, F = 356 -> 128, 128, 100.
    "gqa_tied_ragged": dict(D=228, H=6, KV=2, hd=16, F=356, V=300, G=128, tied=True, layers=3),
    # group 64, ragged g = 8 (F = 200), MHA, llama3 RoPE scaling (rope_freqs), F32 untied embeddings.
    "llama3_rope_f32": dict(D=96, H=4, KV=4, hd=24, F=200, V=200, G=64, emb_dtype=np.float32,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # every chunk protected at 5 columns, group 32, single KV head.
    "mqa_protected": dict(D=64, H=4, KV=1, hd=16, F=96, V=128, G=32, protect=lambda n, c, g: 5),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    kw = dict(TINY[request.param])
    path = write_tiny(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", seed=3, **kw)
    rng = np.random.default_rng(5)
    V = kw["V"]
    tokens = rng.integers(0, V, size=(2, 160)).astype(np.int32)
    return request.param, path, tokens, _reference_logits(path, tokens)


def test_tiny_parity(tiny):
    name, path, tokens, lr = tiny
    lc = native.logits_fn(path, n_threads=2)(tokens)
    rel, top1 = _compare(lc, lr)
    print(f"{name}: max|d|/std = {rel:.2e}, top-1 agreement = {top1:.5f}")
    assert rel < TOL_REL and top1 >= TOP1


def test_tiny_decode_matches_prefill(tiny):
    """Token-by-token decoding through the KV cache gives the batched prefill's logits."""
    name, path, tokens, lr = tiny
    m = native.Model(path)
    with native.Context(m, n_ctx=256, n_threads=2) as ctx:
        seq = tokens[0]
        full = ctx.eval(seq, all_logits=True)
        ctx.reset()
        ctx.eval(seq[:100], want_logits=False)
        steps = np.stack([ctx.eval(seq[i:i + 1]) for i in range(100, len(seq))])
        assert ctx.position == len(seq)
        np.testing.assert_allclose(steps, full[100:], atol=1e-4 * float(full.std()), rtol=0)
        # rewinding the cache and re-evaluating gives the same logits again
        ctx.set_position(120)
        again = ctx.eval(seq[120:130], all_logits=True)
        np.testing.assert_allclose(again, full[120:130], atol=1e-4 * float(full.std()), rtol=0)


def test_tiny_q8_decode(tiny):
    """Int8 activations on random-init models (every action, ragged chunks, protected columns, GQA): decode steps
    close to the float ones, scalar int8 kernels == SIMD int8 kernels, and threads agree."""
    name, path, tokens, lr = tiny
    seq = tokens[0, :48]
    f32 = _decode_logits(path, seq[None], n_threads=1)[0]
    native.set_activations("q8")
    try:
        q8 = _decode_logits(path, seq[None], n_threads=1)[0]
        q8_t3 = _decode_logits(path, seq[None], n_threads=3)[0]
        native.set_kernels("scalar")
        q8_scalar = _decode_logits(path, seq[None], n_threads=2)[0]
    finally:
        native.set_kernels("auto")
        native.set_activations("f32")
    s = float(f32.std())
    rel = np.abs(q8 - f32).max() / s
    print(f"{name}: q8 vs f32 decode max|d|/std = {rel:.2e}")
    assert rel < 0.15  # random-init weights: measured 1.6e-2 .. 7.0e-2
    assert np.abs(q8_t3 - q8).max() / s < 1e-5
    # Not tight: the int8 kernels agree exactly per block (test_kernels), but a 1e-7 difference in an activation
    # can flip its int8 rounding, and random-init models amplify such flips over the layers (measured 4e-2).
    assert np.abs(q8_scalar - q8).max() / s < 0.15


def test_tiny_scalar_kernels_and_threads_agree(tiny):
    name, path, tokens, lr = tiny
    base = native.logits_fn(path, n_threads=1)(tokens[:1])
    try:
        native.set_kernels("scalar")
        scal = native.logits_fn(path, n_threads=3)(tokens[:1])
    finally:
        native.set_kernels("auto")
    assert np.abs(scal - base).max() / base.std() < 1e-4
    threaded = native.logits_fn(path, n_threads=3)(tokens[:1])
    assert np.abs(threaded - base).max() / base.std() < 1e-5


def test_generation_is_deterministic(tiny):
    name, path, tokens, _ = tiny
    m = native.Model(path)
    with native.Context(m, n_ctx=128) as ctx:
        greedy = ctx.generate(tokens[0, :10], 12, stop_at_eos=False)
        ctx.reset()
        logits = ctx.eval(tokens[0, :10])
        assert greedy[0] == int(np.argmax(logits))
        ctx.reset()
        a = ctx.generate(tokens[0, :10], 12, temperature=0.8, top_p=0.9, seed=42, stop_at_eos=False)
        ctx.reset()
        b = ctx.generate(tokens[0, :10], 12, temperature=0.8, top_p=0.9, seed=42, stop_at_eos=False)
        ctx.reset()  # a very high temperature is near-uniform: different seeds must differ
        c = ctx.generate(tokens[0, :10], 12, temperature=100.0, seed=1, stop_at_eos=False)
        ctx.reset()
        d = ctx.generate(tokens[0, :10], 12, temperature=100.0, seed=2, stop_at_eos=False)
    assert len(greedy) == 12 and a == b and c != d
