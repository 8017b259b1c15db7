"""Mistral checkpoints (config.json model_type "mistral", MistralForCausalLM): the LLaMA decoder under another name,
with an optional sliding attention window (wqedge.checkpoint.parse_config).

- the config reads as the same spec as the LLaMA one; a sliding window shorter than max_position_embeddings becomes
  the context length (up to it, full causal attention is the window's), a longer or null one changes nothing;
- what it refuses: a model_type it does not know (naming the supported ones), an architecture that does not match
  the model_type, a sliding window that is not a positive integer;
- end to end: transformers' own MistralForCausalLM on the checkpoint computes what our loader's LLaMA model computes
  (within the window), the converted file records the window as its context length, and the C++ runtime matches the
  PyTorch reference of the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wqedge.checkpoint import CheckpointError, LlamaCheckpoint

WINDOW = 48
CPP_TOL = 1e-3   # max |Δlogit| / std(logits), float activations (as tests/test_ruquant_runtime.py)


def _as_mistral(src: Path, dst: Path, **changes) -> Path:
    import shutil
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory()


@pytest.fixture(scope="module")
def mistral_dir(llama_dir, tmp_path_factory) -> Path:
    return _as_mistral(llama_dir, tmp_path_factory.mktemp("mistral") / "m", sliding_window=WINDOW)


def test_spec_is_the_llama_one(llama_dir, tmp_path):
    llama = LlamaCheckpoint.open(llama_dir).spec
    for window, ctx in ((None, llama.max_position_embeddings), (10 ** 6, llama.max_position_embeddings),
                        (WINDOW, WINDOW)):
        m = LlamaCheckpoint.open(_as_mistral(llama_dir, tmp_path / f"w{window}", sliding_window=window)).spec
        assert m.max_position_embeddings == ctx
        assert m.extra.get("sliding_window") == (window if window == WINDOW else None)
        for f in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                  "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            assert getattr(m, f) == getattr(llama, f), f


@pytest.mark.parametrize("changes,msg", [
    ({"model_type": "qwen2"}, r"model_type is 'qwen2'; supported: 'llama', 'mistral'"),
    ({"architectures": ["LlamaForCausalLM"]}, r"do not include 'MistralForCausalLM'"),
    ({"sliding_window": 0}, r"sliding_window must be a positive integer or null, got 0"),
    ({"sliding_window": "4096"}, r"sliding_window must be a positive integer or null"),
    ({"sliding_window": True}, r"sliding_window must be a positive integer or null"),
])
def test_refusals(llama_dir, tmp_path, changes, msg):
    with pytest.raises(CheckpointError, match=msg):
        LlamaCheckpoint.open(_as_mistral(llama_dir, tmp_path / "m", **changes))


def test_transformers_mistral_computes_what_we_load(mistral_dir):
    """Within the window, transformers' MistralForCausalLM (sliding-window attention) and the LLaMA model our
    loader builds from the same folder give the same logits; the loader says nothing about the model type."""
    from transformers import MistralForCausalLM
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 512, (2, WINDOW)))
    ours = LlamaCheckpoint.open(mistral_dir).load_hf_model(torch.float32)
    theirs = MistralForCausalLM.from_pretrained(mistral_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert float((a - b).abs().max() / b.std()) < 1e-5


def test_convert_and_run(mistral_dir, tmp_path):
    from click.testing import CliRunner

    from cpp_support import ensure_library
    from wqedge.cli import main
    from wqedge.reference import load_reference, logits_fn
    from wqedge.runtime.gguf_reader import WqGGUF
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(mistral_dir), "--preset", "q8", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "sliding window" in r.output
    assert WqGGUF(out).spec.max_position_embeddings == WINDOW
    w = np.random.default_rng(1).integers(0, 512, (2, 20))
    ref = logits_fn(load_reference(out))(w)
    ensure_library()
    from wqedge.runtime import native
    before = native.get_activations()
    native.set_activations("f32")
    try:
        m = native.Model(str(out))
        for row, lr in zip(w, ref):
            got = native.Context(m, n_ctx=WINDOW, n_threads=2).eval(row.tolist(), all_logits=True)
            assert float(np.abs(got - lr).max() / lr.std()) < CPP_TOL
    finally:
        native.set_activations(before)


def test_eval_refuses_windows_past_the_context(mistral_dir, tmp_path):
    """`wqedge eval` scores windows of --ctx tokens: past the model's context length (here the sliding window) it
    says so instead of scoring positions the model never attends over, for the folder and for its file."""
    from click.testing import CliRunner

    from wqedge.cli import main
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    r = CliRunner().invoke(main, ["eval", str(mistral_dir), "--text", str(text)])
    assert r.exit_code != 0 and f"--ctx 512 is longer than the model's context length {WINDOW}" in r.output
    r = CliRunner().invoke(main, ["eval", str(mistral_dir), "--text", str(text), "--ctx", str(WINDOW), "--chunks", "2"])
    assert r.exit_code == 0 and f"over 2 windows of {WINDOW}" in r.output, r.output
