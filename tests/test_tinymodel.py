"""build_tiny_model / build_tiny_bpe_model: real, loadable, reproducible HF folders."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from wqedge.tinymodel import build_tiny_bpe_model, build_tiny_model


def digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    assert digests(again) == digests(tiny_model_dir)
    other = digests(build_tiny_model(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != digests(tiny_model_dir)["model.safetensors"]
    assert other["tokenizer.model"] == digests(tiny_model_dir)["tokenizer.model"]


def test_loads_in_transformers_with_requested_shape(tiny_model_factory):
    from transformers import AutoModelForCausalLM
    d = tiny_model_factory(hidden=64, n_layers=3, n_heads=4, n_kv_heads=1, intermediate=160, vocab_size=384)
    m = AutoModelForCausalLM.from_pretrained(d)
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (64, 3, 4, 1, 160, 384)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert m.dtype == torch.float16
    with torch.no_grad():
        out = m(torch.tensor([[1, 5, 9, 300]])).logits
    assert out.shape == (1, 4, 384) and torch.isfinite(out).all()


def test_sentencepiece_tokenizer_is_llama2_style(tiny_model_dir):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString((tiny_model_dir / "tokenizer.model").read_bytes())
    ts = proto.trainer_spec
    assert (ts.model_type, ts.vocab_size, ts.byte_fallback) == (pb.TrainerSpec.BPE, 512, True)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.vocab_size()) == (0, 1, 2, -1, 512)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == 512 and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    text = "The model file is small.\n\tx = 42 # café ψ 🙂"
    ids = tok(text).input_ids
    assert ids[0] == 1 and 1 < len(ids) < len(text)               # BOS added, real merges used
    assert tok.decode(ids, skip_special_tokens=True) == text         # byte fallback: lossless
    assert "<0x0A>" in tok.convert_ids_to_tokens(ids)                # newline via a byte piece


def test_sharded_build_has_exact_shard_count(tiny_model_factory):
    d = tiny_model_factory(shards=4)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _all_tensors(d).values())


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_tied_build_has_no_lm_head_and_config_forms(tiny_model_factory):
    tied = tiny_model_factory(tie_embeddings=True, rope_form="tf4", rope_scaling="llama3", dtype="bfloat16")
    assert "lm_head.weight" not in _all_tensors(tied)
    cfg = json.loads((tied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 10000.0
    assert "rope_parameters" not in cfg and "dtype" not in cfg
    cfg5 = json.loads((tiny_model_factory() / "config.json").read_text())
    assert cfg5["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0} and cfg5["dtype"] == "float16"
    assert "rope_theta" not in cfg5 and "rope_scaling" not in cfg5


def test_rebuild_replaces_only_our_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    build_tiny_model(d, shards=3, hidden=64, intermediate=160, vocab_size=384)
    build_tiny_model(d, hidden=64, intermediate=160, vocab_size=384)
    assert (d / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("pretok", ["gpt2", "llama3"])
def test_bpe_variant(tiny_model_factory, pretok):
    from transformers import AutoTokenizer
    d = tiny_model_factory(bpe=True, pretokenizer=pretok)
    tj = json.loads((d / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and not tj["model"].get("byte_fallback")
    assert tj["decoder"]["type"] == "ByteLevel"
    assert tj["pre_tokenizer"]["type"] == {"gpt2": "ByteLevel", "llama3": "Sequence"}[pretok]
    assert not (d / "tokenizer.model").exists()
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 512
    cfg = json.loads((d / "config.json").read_text())
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"]) == (509, 510)
    text = "Hello world!\n  café 🙂 x_1 <tool_call> 12345"
    ids = tok(text).input_ids
    assert ids[0] == 509 and 511 in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        build_tiny_model(tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match="rope_form"):
        build_tiny_model(tmp_path / "b", rope_form="tf3")
    with pytest.raises(ValueError, match="rope_scaling"):
        build_tiny_model(tmp_path / "c", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="vocab_size 300"):
        build_tiny_model(tmp_path / "e", vocab_size=300)
    with pytest.raises(TypeError, match="unexpected"):
        build_tiny_bpe_model(tmp_path / "d", bogus=1)
