"""`wqedge eval --kl-base / --kl`: KL divergence of a model to a base model on the positions perplexity scores
(wqedge.kl), checked against a direct float64 computation, for the torch and cpp backends, with its refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wqedge.cli import main
from wqedge.perplexity import make_windows

TEXT = " ".join(f"the {i}th line counts {i * 3 % 17} apples and {i % 5} pears." for i in range(300))
CTX = 32
CHUNKS = 4


def run(*args, ok: bool = True) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    return r.output


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """(text, base file of the fp model, a q2 GGUF of it)."""
    d = tmp_path_factory.mktemp("kl")
    text = d / "text.txt"
    text.write_text(TEXT)
    base = d / "base.npz"
    out = run("eval", tiny_model_dir, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--kl-base", base)
    assert "KL base written" in out and base.is_file()
    gguf = d / "q2.gguf"
    run("convert", tiny_model_dir, "-o", gguf, "--preset", "q2", "--no-check", "--device", "cpu")
    return text, base, gguf


def kl_mean(out: str) -> float:
    return float(out.split("KL divergence to the base: mean ")[1].split()[0])


def test_same_model_has_zero_kl(tiny_model_dir, files):
    """The base against itself: KL within the float16 storage's rounding, every top token the same."""
    text, base, _ = files
    out = run("eval", tiny_model_dir, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--kl", base)
    assert abs(kl_mean(out)) < 1e-4 and "same top token 100.00%" in out
    assert f"({CHUNKS * (CTX // 2 - 1)} tokens)" in out


def test_quantized_kl_matches_direct_computation(tiny_model_dir, files):
    """A q2 file's reported KL equals KL(fp || reference of the file) computed here in float64 on the same windows
    (relative 1e-3: the base is stored in float16)."""
    from transformers import AutoTokenizer

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.kl import log_softmax, scored
    from wqedge.reference import load_reference
    text, base, gguf = files
    out = run("eval", gguf, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--tokenizer", tiny_model_dir,
              "--kl", base)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    w = torch.as_tensor(make_windows(ids, tok.bos_token_id, CTX, CHUNKS), dtype=torch.long)
    with torch.no_grad():
        fp = LlamaCheckpoint.open(tiny_model_dir).load_hf_model(torch.float32)(w).logits.numpy()
        q = load_reference(gguf)(w).logits.float().numpy()
    p, lq = log_softmax(scored(fp)), log_softmax(scored(q))
    expected = float((np.exp(p) * (p - lq)).sum(-1).mean())
    assert expected > 1e-3                         # a 2-bit model is measurably unfaithful
    assert abs(kl_mean(out) - expected) < 1e-3 * expected + 1e-6
    top = float((p.argmax(-1) == lq.argmax(-1)).mean())
    assert f"same top token {100 * top:.2f}%" in out


def test_cpp_backend_against_the_torch_reference_base(tiny_model_dir, files, tmp_path):
    """The runtime's distributions against a base written by the PyTorch reference of the same file: near zero
    (int8 activations on a 2-bit file), far below the file's KL to the fp model."""
    text, base, gguf = files
    ref_base = tmp_path / "ref.npz"
    run("eval", gguf, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--tokenizer", tiny_model_dir,
        "--kl-base", ref_base)
    cpp = run("eval", gguf, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--backend", "cpp", "--kl", ref_base)
    to_fp = run("eval", gguf, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--tokenizer", tiny_model_dir,
                "--kl", base)
    assert 0 <= kl_mean(cpp) < 0.05 * kl_mean(to_fp)


def test_refusals(tiny_model_dir, files, tmp_path):
    """Other windows than the base's, both options at once, a file that is no base: refused with the reason, and a
    failed --kl-base run leaves no file."""
    text, base, _ = files
    out = run("eval", tiny_model_dir, "--text", text, "--ctx", 2 * CTX, "--chunks", CHUNKS, "--kl", base, ok=False)
    assert "same text, tokenizer, --ctx and --chunks" in out
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("apples", "plums"))
    out = run("eval", tiny_model_dir, "--text", other, "--ctx", CTX, "--chunks", CHUNKS, "--kl", base, ok=False)
    assert "with other tokens" in out
    out = run("eval", tiny_model_dir, "--text", text, "--kl", base, "--kl-base", tmp_path / "x.npz", ok=False)
    assert "give one of them" in out
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    out = run("eval", tiny_model_dir, "--text", text, "--ctx", CTX, "--chunks", CHUNKS, "--kl", junk, ok=False)
    assert "not a KL base file" in out
    short = tmp_path / "short.txt"
    short.write_text("too short")
    target = tmp_path / "never.npz"
    run("eval", tiny_model_dir, "--text", short, "--ctx", CTX, "--kl-base", target, ok=False)
    assert not target.exists() and not list(tmp_path.glob(".never.npz*"))


def test_in_memory_base_matches_definition():
    """A base recorded in this process (what bench/distill.py does) gives KL(base || model) per scored token as
    defined, on logits of a wide range (float16 storage: relative 1e-3), and 0 for the base itself."""
    from wqedge.kl import KLBaseRecorder, KLComparer, log_softmax, scored
    from wqedge.perplexity import perplexity
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=1 + 6 * 16)
    table = rng.normal(0, 4, size=(50, 50))     # logits of the next token given the current one

    def logits(shift):
        return lambda win: table[win] + shift * np.sin(np.arange(50))
    rec = KLBaseRecorder(logits(0.0))
    perplexity(rec, tokens, 0, 16, None, batch_size=4)
    same = KLComparer(logits(0.0), base=rec)
    perplexity(same, tokens, 0, 16, None, batch_size=4)
    assert abs(same.result().mean) < 1e-5 and same.result().same_top == 1.0
    other = KLComparer(logits(0.7), base=rec)
    perplexity(other, tokens, 0, 16, None, batch_size=4)
    w = np.concatenate(rec.windows)
    p, q = log_softmax(scored(logits(0.0)(w))), log_softmax(scored(logits(0.7)(w)))
    expected = float((np.exp(p) * (p - q)).sum(-1).mean())
    assert expected > 0.01 and abs(other.result().mean - expected) < 1e-3 * expected
    assert other.result().n_scored == w.shape[0] * 7


def test_token_kl_is_the_definition():
    """token_kl (shared by eval --kl, the benchmarks and convert's quality check): sum p (log p - log q) per position,
    zero for equal distributions, and the closed form for two Bernoulli distributions."""
    from wqedge.kl import log_softmax, token_kl
    rng = np.random.default_rng(0)
    a = log_softmax(rng.normal(size=(3, 5, 7)))
    assert np.allclose(token_kl(a, a), 0.0, atol=1e-15)
    b = log_softmax(rng.normal(size=(3, 5, 7)))
    assert token_kl(a, b).shape == (3, 5) and (token_kl(a, b) > 0).all()
    p, q = 0.3, 0.6
    want = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert token_kl(np.log([[p, 1 - p]]), np.log([[q, 1 - q]]))[0] == pytest.approx(want, rel=1e-12)
