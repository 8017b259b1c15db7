"""Export to llama.cpp's own `llama` GGUF layout, run in llama.cpp (llama-cpp-python), checked against the
PyTorch reference and our C++ runtime on the trained fixture model (converters/llamacpp.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.engine("llama.cpp")  # run in a child pytest (tests/conftest.py)

import gguf  # noqa: E402
from wqedge.alloc.llamacpp_types import (  # noqa: E402
    budget_types,
    preset_embedding_types,
    project_types,
    type_bits,
)
from wqedge.converters.llamacpp import (  # noqa: E402
    available_types,
    export_llamacpp,
    permute_qk,
    quantize_tensor,
    unpermute_qk,
)
from wqedge.runtime.llamacpp_eval import LlamaCppEvaluator, measured_linear_bits  # noqa: E402

from wqedge.perplexity import make_windows, perplexity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_support import ensure_library, write_llama_s  # noqa: E402

N_THREADS = 2


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / b.std())


def _llama(path, n_ctx=512):
    return LlamaCppEvaluator(str(path), n_ctx=n_ctx, n_threads=N_THREADS)


# ---------------------------------------------------------------- no model needed

def _rope_hf(x, pos, theta=10000.0):      # rotate-half: pairs (i, i + d/2)
    d = x.shape[-1]
    f = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(f), np.sin(f)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def _rope_ggml(x, pos, theta=10000.0):    # llama.cpp's normal mode: pairs (2i, 2i + 1)
    d = x.shape[-1]
    f = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(f), np.sin(f)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
    return out


def test_qk_permutation_turns_hf_rope_into_llamacpp_rope():
    rng = np.random.default_rng(0)
    n_head, d, k = 3, 16, 8
    w = rng.normal(size=(n_head * d, k))
    x = rng.normal(size=k)
    hf = (w @ x).reshape(n_head, d)
    ll = (permute_qk(w, n_head) @ x).reshape(n_head, d)
    for pos in (0, 1, 7, 300):
        np.testing.assert_allclose(permute_qk(_rope_hf(hf, pos).reshape(-1, 1), n_head).reshape(n_head, d),
                                   _rope_ggml(ll, pos), atol=1e-12)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)


def test_projection_meets_budget_and_respects_block_sizes():
    shapes = {"a": (512, 512), "b": (512, 1408), "c": (1408, 512)}
    types = available_types(("Q8_0", "Q6_K", "Q4_K", "IQ4_NL", "Q4_0", "Q3_K", "Q2_K"))
    for budget in (3.45, 3.5, 4.5, 5.0, 8.5):
        t = project_types(shapes, budget, None, types)
        bits = sum(type_bits(t[n]) * a * b for n, (a, b) in shapes.items()) / sum(a * b for a, b in shapes.values())
        assert bits <= budget + 1e-12
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t["b"]]][0] == 32  # K = 1408: no K-quant
    # per-tensor targets (a plan) are followed where the budget allows
    t = project_types(shapes, 4.1, {"a": 8.25, "b": 4.25, "c": 2.25}, types)
    assert t == {"a": "Q6_K", "b": "IQ4_NL", "c": "Q2_K"}   # largest type not above each target
    t = project_types(shapes, 4.0, {"a": 8.25, "b": 4.25, "c": 2.25}, types)
    assert t == {"a": "Q4_K", "b": "IQ4_NL", "c": "Q2_K"}   # over budget: the one that can give steps down
    with pytest.raises(ValueError, match="budget"):   # K = 1408 cannot go below Q4_0's 4.5 bits here
        project_types(shapes, 3.0, None, types)


def test_quantize_tensor_is_llamacpps_and_reads_back():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (64, 512)).astype(np.float32)
    for t in ("Q8_0", "Q4_0", "Q4_K", "Q3_K", "Q2_K"):
        raw = quantize_tensor(w, t)
        back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[t])
        err = np.abs(back - w).mean() / np.abs(w).mean()
        assert err < {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.5}[t], (t, err)
    # Q8_0 and Q4_0 agree with gguf-py's reference quantizer
    for t in ("Q8_0", "Q4_0"):
        qt = gguf.GGMLQuantizationType[t]
        ref = gguf.quants.quantize(w, qt)
        assert np.mean(quantize_tensor(w, t) == ref) > 0.99


@pytest.mark.parametrize("preset,tied,hidden,want", [
    ("Q4_0", False, 512, ("Q4_0", "Q6_K")),
    ("Q3_K_M", False, 512, ("Q3_K", "Q6_K")),
    ("Q2_K", False, 512, ("Q2_K", "Q6_K")),
    ("Q8_0", False, 512, ("Q8_0", "Q8_0")),
    ("IQ2_XXS", False, 512, ("Q2_K", "Q5_K")),
    ("IQ2_S", False, 512, ("IQ3_S", "Q5_K")),
    ("Q4_0", True, 512, ("Q6_K", "Q6_K")),       # tied: the one table is the head
    ("Q4_K_M", False, 576, ("Q5_0", "Q8_0")),    # 576 columns: no 256-blocks, llama-quantize's fallbacks
    ("Q4_0", True, 576, ("Q8_0", "Q8_0")),       # Q4_0's 32-blocks fit, so Q6_K is asked for, then falls back
])
def test_preset_embedding_types_follow_llama_quantize(preset, tied, hidden, want):
    """llama-quantize's embedding and head types (llama_tensor_get_type of the vendored llama.cpp)."""
    from wqedge.spec import ModelSpec
    spec = ModelSpec(hidden_size=hidden, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=hidden // 8,
                     intermediate_size=1408, vocab_size=8192, tie_word_embeddings=tied)
    assert preset_embedding_types(spec, preset) == want
    with pytest.raises(ValueError, match="unknown ggml type"):
        preset_embedding_types(spec, "Q4_Z")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantized_embeddings_and_head_match_pytorch_on_their_dequantized_weights(tiny_model_factory, tmp_path, tied):
    """Q4_0 embeddings and head (`convert --target llamacpp --head q4`): llama.cpp's logits = the transformers
    model whose embedding table and head are the file's tensors dequantized (gguf-py), the linears F32, and the
    head's input rounded to Q8_0 blocks as llama.cpp's Q4_0 dot product takes it. Q4_0, not the default Q8_0
    head: its weight error is large enough that the check tells the file's head from the checkpoint's."""
    import torch

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.reference import logits_fn
    d = tiny_model_factory(hidden=256, intermediate=512, tie_embeddings=tied)
    res = export_llamacpp(d, tmp_path / "q.gguf", dtype="f32", embed_type="Q4_0", output_type="Q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(res.path).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"
    assert ("output.weight" in tensors) == (not tied)
    if not tied:
        assert tensors["output.weight"].tensor_type.name == "Q4_0"

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    ids = np.random.default_rng(0).integers(3, 500, (1, 96)).astype(np.int32)
    ids[0, 0] = 1
    torch.set_num_threads(N_THREADS)
    model = LlamaCheckpoint.open(d).load_hf_model(torch.float32)
    unquantized = logits_fn(model)(ids)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(deq("token_embd.weight"))
        if not tied:
            model.lm_head.weight.copy_(deq("output.weight"))

    def q8_input(mod, args):   # llama.cpp quantizes a Q8_0 product's activations to Q8_0
        x = args[0].detach().numpy().astype(np.float32)
        q = gguf.quants.quantize(x.reshape(-1, x.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
        return (torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)),)
    model.lm_head.register_forward_pre_hook(q8_input)
    ref = logits_fn(model)(ids)
    got = _llama(res.path, n_ctx=128)(ids)
    rel, off = _rel(got, ref), _rel(got, unquantized)
    print(f"tied={tied}: max|d|/std = {rel:.2e} against the dequantized weights, {off:.2e} against the checkpoint's")
    # 2.5e-2, not the F32 files' 1e-2: llama.cpp's F16 KV cache moves the head's inputs by ~1e-3 (the F32-head
    # variant of this model: 1.2e-3), enough to flip some of their Q8_0 roundings (measured 1.1e-2 here)
    assert rel < 2.5e-2 and off > 10 * rel


# ---------------------------------------------------------------- the trained fixture model

@pytest.fixture(scope="module")
def eval_ids(fixture_dir, llama_s_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llama_s_dir)
    text = (fixture_dir / "text" / "eval.txt").read_text(encoding="utf-8")[:12000]
    return tok(text)["input_ids"], tok.bos_token_id, text, tok


@pytest.fixture(scope="module")
def q4_wq(llama_s_dir, tmp_path_factory):
    """Our q4 (RTN, G = 128) file of the fixture model."""
    return write_llama_s(tmp_path_factory.mktemp("lcp") / "q4.gguf", llama_s_dir, lambda n, c: "q4")


def test_f16_export_of_checkpoint_matches_pytorch(llama_s_dir, eval_ids, tmp_path):
    import torch

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.reference import logits_fn
    ids, bos, text, tok = eval_ids
    res = export_llamacpp(llama_s_dir, tmp_path / "f16.gguf")
    r = gguf.GGUFReader(res.path)
    names = {t.name: t for t in r.tensors}
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert res.linear_bits == 16.0
    ev = _llama(res.path)
    # llama.cpp's tokenizer on this file = Hugging Face's (for text not starting with whitespace: there
    # Hugging Face drops the leading space and llama.cpp keeps it, e.g. " Hello" -> [▁Hello] vs [▁, ▁Hello])
    for piece in (text[:3000], text[5000:9000], "Hello,\n\tworld ü 12345 {}  a\n b"):
        assert ev.llm.tokenize(piece.encode(), add_bos=True) == tok(piece)["input_ids"]
    win = make_windows(ids, bos, 512, 1)
    torch.set_num_threads(N_THREADS)
    ref = logits_fn(LlamaCheckpoint.open(llama_s_dir).load_hf_model(torch.float32))(win)
    got = ev(win)
    rel = _rel(got, ref)
    print(f"f16 export vs PyTorch fp32: max|d|/std = {rel:.2e}")
    assert rel < 1e-2
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) > 0.99


def test_export_of_our_quantized_file_runs_its_weights(q4_wq, eval_ids, tmp_path):
    """llama.cpp on the export of our q4 file = the PyTorch reference of that file; greedy decoding in llama.cpp
    = greedy decoding in our C++ runtime; perplexity (shared definition) within 1% of the reference's."""
    import torch

    from wqedge.reference import load_reference, logits_fn
    ids, bos, _, _ = eval_ids
    res = export_llamacpp(q4_wq, tmp_path / "q4-f32.gguf", dtype="f32")
    ev = _llama(res.path)
    win = make_windows(ids, bos, 512, 2)
    torch.set_num_threads(N_THREADS)
    ref_fn = logits_fn(load_reference(q4_wq))
    ref = ref_fn(win[:1])
    got = ev(win[:1])
    rel = _rel(got, ref)
    print(f"q4 file exported at F32 vs its PyTorch reference: max|d|/std = {rel:.2e}")
    assert rel < 1e-2

    p_ref = perplexity(ref_fn, ids, bos, 512, 2)
    p_lcp = perplexity(ev, ids, bos, 512, 2)
    print(f"perplexity (2 windows): reference {p_ref.perplexity:.4f}, llama.cpp {p_lcp.perplexity:.4f}")
    assert abs(p_lcp.perplexity / p_ref.perplexity - 1) < 0.01

    ensure_library()
    from wqedge.runtime import native
    prompt = ids[:40]
    before = native.get_activations()
    native.set_activations("f32")  # greedy-token equality is stated for the float reference path
    try:
        with native.Model(q4_wq) as m:
            ours = native.generate_tokens(m, prompt, 24, stop_at_eos=False, n_ctx=128)
    finally:
        native.set_activations(before)
    theirs = ev.greedy(prompt, 24)
    assert theirs == ours


def test_quantized_export_meets_budget_and_runs(llama_s_dir, eval_ids, tmp_path):
    """A per-tensor mix of llama.cpp's own stock types under a 3.5-bit budget, with an importance matrix."""
    from wqedge.checkpoint import LlamaCheckpoint
    ids, bos, _, _ = eval_ids
    ckpt = LlamaCheckpoint.open(llama_s_dir)
    rng = np.random.default_rng(0)
    imatrix = {lin.hf_name: rng.uniform(0.5, 2.0, lin.in_features).astype(np.float32) for lin in ckpt.spec.linears()}
    budget = 3.5
    types = budget_types(ckpt.spec, budget, None, available_types(imatrix=True))
    res = export_llamacpp(ckpt, tmp_path / "q35.gguf", imatrix, tensor_types=types)
    measured = measured_linear_bits(res.path)
    print(f"types {res.type_histogram()}, {measured:.4f} bits per weight")
    assert measured <= budget and measured == pytest.approx(res.linear_bits)
    assert len(set(res.tensor_types.values())) >= 2
    assert all(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 32
               for n, t in res.tensor_types.items() if "ffn_down" in n)   # K = 1408 is not a multiple of 256
    ev = _llama(res.path)
    out = ev.greedy(ids[:16], 8)
    assert len(out) == 8 and all(0 <= t < 8192 for t in out)
    p = perplexity(ev, ids, bos, 512, 1).perplexity
    print(f"perplexity (1 window) {p:.3f}")
    assert p < 20


@pytest.mark.parametrize("kw", [{"rope_scaling": "llama3", "tie_embeddings": True, "max_position_embeddings": 1024},
                                {"bpe": True}], ids=["llama3-rope-tied", "bpe"])
def test_tiny_variants_match_transformers(tiny_model_factory, tmp_path, kw):
    """llama3 RoPE scaling (rope_freqs.weight), tied embeddings (no output.weight) and a byte-level BPE
    tokenizer load in llama.cpp and give the transformers model's logits."""
    import torch

    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.reference import logits_fn
    d = tiny_model_factory(**kw)
    res = export_llamacpp(d, tmp_path / "tiny.gguf", dtype="f32")
    names = {t.name for t in gguf.GGUFReader(res.path).tensors}
    assert ("rope_freqs.weight" in names) == ("rope_scaling" in kw)
    assert ("output.weight" in names) == (not kw.get("tie_embeddings"))
    ids = np.random.default_rng(0).integers(3, 500, (1, 384)).astype(np.int32)
    ids[0, 0] = 1
    torch.set_num_threads(N_THREADS)
    ref = logits_fn(LlamaCheckpoint.open(d).load_hf_model(torch.float32))(ids)
    got = _llama(res.path, n_ctx=384)(ids)
    rel = _rel(got, ref)
    print(f"{kw}: max|d|/std = {rel:.2e}")
    assert rel < 1e-2


@pytest.mark.parametrize("pretokenizer", ["llama3", "tekken", "smollm"])
def test_bpe_pre_tokenizers_tokenize_as_hf_in_llamacpp(tiny_model_factory, tmp_path, pretokenizer):
    """The pre-tokenizer name the export writes (llama-bpe, tekken, smollm) is one stock llama.cpp knows and
    tokenizes as Hugging Face does: case-split letter runs, marks, digits, code and whitespace."""
    from transformers import AutoTokenizer
    d = tiny_model_factory(bpe=True, pretokenizer=pretokenizer)
    res = export_llamacpp(d, tmp_path / "tiny.gguf", dtype="f32")
    hf = AutoTokenizer.from_pretrained(d)
    ev = _llama(res.path, n_ctx=64)
    for text in ("HELLOworld helloWorld iPhone NASA's XMLHttpRequest 12345 3.14",
                 "e\u0301te\u0301 \u01c5emal \u00dcBER\u00e4 \u4e2d\u6587ABCdef x\u0308Y",
                 "def f(x):\r\n\treturn x[0] // 2  # http://a.b/c\n\n  end  "):
        assert ev.llm.tokenize(text.encode(), add_bos=True) == hf(text)["input_ids"], (pretokenizer, text)


def test_projection_follows_a_chunk_level_plan(llama_s_dir, tmp_path):
    """Tensors the plan gives more bits get larger stock types; the file meets the plan's budget."""
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.plan import Plan
    ckpt = LlamaCheckpoint.open(llama_s_dir)
    hi = ("q_proj", "k_proj", "v_proj")
    actions = {lin.hf_name: [("q8" if any(h in lin.hf_name for h in hi) else "q3") if c % 4 else "q4"
                             for c in range(-(-lin.in_features // 128))] for lin in ckpt.spec.linears()}
    plan = Plan.from_actions(ckpt.spec.linears(), 128, 16.0, "test", actions, "minmax")
    budget = plan.effective_bits()
    types = budget_types(ckpt.spec, budget, plan.to_json(), available_types())
    res = export_llamacpp(ckpt, tmp_path / "plan.gguf", tensor_types=types)
    assert measured_linear_bits(res.path) <= budget
    t = res.tensor_types
    for i in range(ckpt.spec.n_layers):
        assert type_bits(t[f"blk.{i}.attn_q.weight"]) > type_bits(t[f"blk.{i}.ffn_gate.weight"])
    assert _llama(res.path, n_ctx=64).greedy([1, 450, 300], 4)


def test_cli_convert_target_llamacpp_meets_budget_and_generates(llama_s_dir, tmp_path):
    from click.testing import CliRunner

    from wqedge.cli import main

    out = tmp_path / "l.gguf"
    res = CliRunner().invoke(main, ["convert", str(llama_s_dir), "-o", str(out), "--target", "llamacpp",
                                    "--bits", "3.5", "--no-self-calib"])
    assert res.exit_code == 0, res.output
    assert measured_linear_bits(out) <= 3.5 + 1e-9
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"   # the head as our q8 head
    m = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, verbose=False)
    assert len(m.tokenize(b"hello") ) > 0 and m("The function", max_tokens=4)["choices"][0]["text"]
