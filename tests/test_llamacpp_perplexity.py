"""The shared perplexity function (wqedge.perplexity) agrees with llama.cpp's *own* perplexity tool.

llama-perplexity (tools/perplexity of llama.cpp) is built once per machine from the source of the
installed llama-cpp-python (tests/llamacpp_tools.py: its sdist's vendor/llama.cpp, common/ +
tools/perplexity compiled and linked against the package's libllama/libggml) and run on llama.cpp GGUF
exports of the fixture model (F16 and Q4_0) with -c 512 and a fixed number of chunks. Our side scores the
same token ids (tokenized by llama.cpp, as the tool does) through llama.cpp (LlamaCppEvaluator) and through
the PyTorch reference of the same weights (within 1%; with the tool's flash attention turned off, as
llama-cpp-python runs, to its 4 printed decimals). Skipped, with the reason, where the tool cannot be built (no C++
compiler, no llama-cpp-python, its sdist not downloadable).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.engine("llama.cpp")  # run in a child pytest (tests/conftest.py)

import gguf  # noqa: E402
import llamacpp_tools as tools  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
from wqedge.alloc.llamacpp_types import preset_types  # noqa: E402
from wqedge.converters.llamacpp import export_llamacpp, unpermute_qk  # noqa: E402
from wqedge.runtime.llamacpp_eval import LlamaCppEvaluator  # noqa: E402
from wqedge.perplexity import make_windows, perplexity  # noqa: E402

N_CTX = 512
N_CHUNKS = 4          # windows scored on both sides: 4 x 255 = 1020 tokens
TEXT_CHARS = 9000     # ~2800 tokens of eval.txt: 5 windows available, 4 used
THREADS = 2


# ---------------------------------------------------------------- no tool needed

SAMPLE = """perplexity: tokenizing the input ..
perplexity: tokenization took 3.1 ms
perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=512, n_seq=1
perplexity: 0.05 seconds per pass - ETA 0.00 minutes
[1]3.5000,[2]4.0000,[3]3.8000,
Final estimate: PPL = 3.8000 +/- 0.12345
"""


def test_parse_llama_perplexity_output():
    r = tools.parse_llama_perplexity(SAMPLE)
    assert (r.perplexity, r.error, r.n_chunks, r.n_ctx) == (3.8, 0.12345, 3, 512)
    assert r.running == [3.5, 4.0, 3.8]
    pc = r.per_chunk   # geometric mean of the chunks so far = running estimate
    assert pc[0] == pytest.approx(3.5)
    assert math.sqrt(pc[0] * pc[1]) == pytest.approx(4.0)
    assert (pc[0] * pc[1] * pc[2]) ** (1 / 3) == pytest.approx(3.8)
    with pytest.raises(ValueError, match="Final estimate"):
        tools.parse_llama_perplexity("perplexity: failed to decode")


def test_missing_compiler_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("WQEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("WQEDGE_LLAMA_PERPLEXITY", raising=False)
    with pytest.raises(tools.ToolUnavailable, match="no C.. compiler"):
        tools.llama_perplexity_path(build=True, progress=False)
    with pytest.raises(tools.ToolUnavailable, match="not built"):
        tools.llama_perplexity_path(build=False, progress=False)


# ---------------------------------------------------------------- llama-perplexity on the fixture model

@pytest.fixture(scope="module")
def tool():
    try:
        return tools.llama_perplexity_path(build=True)
    except tools.ToolUnavailable as e:
        pytest.skip(f"llama-perplexity cannot be built here: {e}")


@pytest.fixture(scope="module")
def text_file(fixture_dir, tmp_path_factory):
    text = (fixture_dir / "text" / "eval.txt").read_text(encoding="utf-8")[:TEXT_CHARS]
    p = tmp_path_factory.mktemp("lppl") / "eval-head.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def exports(llama_s_dir, tmp_path_factory):
    from wqedge.checkpoint import LlamaCheckpoint
    d = tmp_path_factory.mktemp("lppl-gguf")
    ckpt = LlamaCheckpoint.open(llama_s_dir)
    return {"f16": export_llamacpp(ckpt, d / "f16.gguf").path,
            "q4_0": export_llamacpp(ckpt, d / "q4_0.gguf", tensor_types=preset_types(ckpt.spec, "Q4_0")).path}


def _torch_reference(ckpt_dir, gguf_path):
    """The HF model (fp32) with the decoder linears of the llama.cpp file dequantized (Q/K rows un-permuted):
    PyTorch on exactly the weights llama.cpp runs."""
    import torch

    from wqedge.checkpoint import LlamaCheckpoint
    ckpt = LlamaCheckpoint.open(ckpt_dir)
    model = ckpt.load_hf_model(torch.float32)
    by_name = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for lin in ckpt.spec.linears():
            t = by_name[lin.gguf_name]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(lin.out_features, lin.in_features)
            stem = lin.gguf_name.split(".")[2]
            if stem == "attn_q":
                w = unpermute_qk(w, ckpt.spec.n_heads)
            elif stem == "attn_k":
                w = unpermute_qk(w, ckpt.spec.n_kv_heads)
            params[lin.hf_name].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    model.eval()
    return model


class _Cached:
    """A logits_fn that remembers each window's logits, so running estimates cost nothing extra."""

    def __init__(self, fn):
        self.fn, self.seen = fn, {}

    def __call__(self, windows):
        out = []
        for w in np.asarray(windows):
            key = w.tobytes()
            if key not in self.seen:
                self.seen[key] = np.asarray(self.fn(w[None]))[0]
            out.append(self.seen[key])
        return np.stack(out)


def _running(fn, ids, bos, n):
    return [perplexity(fn, ids, bos, N_CTX, k).perplexity for k in range(1, n + 1)]


@pytest.mark.parametrize("kind", ["f16", "q4_0"])
def test_shared_perplexity_matches_llama_perplexity(tool, exports, text_file, llama_s_dir, kind, tmp_path):
    import torch

    from wqedge.reference import logits_fn
    path = exports[kind]
    lp = tools.run_llama_perplexity(path, text_file, n_ctx=N_CTX, chunks=N_CHUNKS, threads=THREADS, exe=tool)
    assert lp.n_chunks == N_CHUNKS and lp.n_ctx == N_CTX and len(lp.running) == N_CHUNKS

    # our side: the same text as the tool reads it, tokenized by llama.cpp (as the tool does)
    ev = LlamaCppEvaluator(str(path), n_ctx=N_CTX, n_threads=THREADS)
    text = tools.read_llama_perplexity_text(text_file)
    ids = ev.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = ev.llm.token_bos()
    assert len(ids) >= (N_CHUNKS + 1) * N_CTX   # the tool had more windows than it was asked to score
    cached = _Cached(ev)
    ours = perplexity(cached, ids, bos, N_CTX, N_CHUNKS)
    ours_running = _running(cached, ids, bos, N_CHUNKS)

    torch.set_num_threads(THREADS)
    ref = _Cached(logits_fn(_torch_reference(llama_s_dir, path)))
    pt = perplexity(ref, ids, bos, N_CTX, N_CHUNKS)

    # Hugging Face's tokenization of the same text (the text does not start with whitespace: identical ids)
    from transformers import AutoTokenizer
    hf_ids = AutoTokenizer.from_pretrained(llama_s_dir)(text)["input_ids"]
    n_use = N_CHUNKS * N_CTX
    hf_same = hf_ids[:n_use] == ids[:n_use]
    pt_hf = perplexity(ref, hf_ids, bos, N_CTX, N_CHUNKS) if not hf_same else pt

    rel_lcp = ours.perplexity / lp.perplexity - 1
    rel_pt = pt.perplexity / lp.perplexity - 1
    print(f"\n{kind}: llama-perplexity {lp.perplexity:.4f} +/- {lp.error:.4f} ({lp.n_chunks} chunks) | "
          f"shared definition via llama.cpp {ours.perplexity:.4f} ({rel_lcp:+.2e}) | "
          f"via PyTorch {pt.perplexity:.4f} ({rel_pt:+.2e}) | HF tokenization "
          f"{'identical' if hf_same else f'differs: PyTorch on HF ids {pt_hf.perplexity:.4f}'}")
    print(f"  running: tool {lp.running}\n           ours {[round(x, 4) for x in ours_running]}")
    assert ours.n_windows == N_CHUNKS and ours.n_scored == N_CHUNKS * (N_CTX // 2 - 1)
    assert abs(rel_lcp) < 0.01
    assert abs(rel_pt) < 0.01
    for a, b in zip(ours_running, lp.running):      # every chunk's running estimate, not only the last
        assert abs(a / b - 1) < 0.01
    assert hf_same, "Hugging Face and llama.cpp tokenize the eval text differently"
    if kind == "q4_0":
        # The remaining difference is the run configuration, not the scoring: llama-perplexity defaults to flash
        # attention (-fa auto: on for CPU), llama-cpp-python's Llama to off. With -fa off the tool prints our
        # values (4 decimals) for every chunk.
        lp_nofa = tools.run_llama_perplexity(path, text_file, n_ctx=N_CTX, chunks=N_CHUNKS, threads=THREADS,
                                             exe=tool, extra=("-fa", "off"))
        print(f"  llama-perplexity -fa off: {lp_nofa.running}")
        for a, b in zip(ours_running, lp_nofa.running):
            assert abs(a / b - 1) < 1e-4


def test_tool_scores_the_same_token_ids(tool, exports, text_file, tmp_path):
    """--kl-divergence-base saves the token ids llama-perplexity scored: they are our windows' ids."""
    base = tmp_path / "base.bin"
    lp = tools.run_llama_perplexity(exports["f16"], text_file, n_ctx=N_CTX, chunks=2, threads=THREADS, exe=tool,
                                    extra=("--kl-divergence-base", str(base)))
    saved = tools.read_saved_tokens(base)
    m = llama_cpp.Llama(str(exports["f16"]), n_ctx=64, n_threads=THREADS, vocab_only=True, verbose=False)
    ids = m.tokenize(tools.read_llama_perplexity_text(text_file).encode("utf-8"), add_bos=True, special=False)
    assert saved == ids[: 2 * N_CTX]
    # the windows the shared definition scores: the same ids, first of each replaced by BOS (the tool does too)
    w = make_windows(ids, m.token_bos(), N_CTX, 2)
    assert (w[:, 1:] == np.asarray(saved).reshape(2, N_CTX)[:, 1:]).all()
    assert lp.n_chunks == 2
