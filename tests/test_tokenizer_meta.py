"""Tokenizer -> GGUF metadata: the vocabulary llama.cpp would write, checked against transformers'
own view of the tokenizer and round-tripped through a real GGUF file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from wqedge.converters.tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, TokenizerError,
                                         TokenizerMeta, add_tokenizer_to_gguf, meta_from_gguf, read_tokenizer)


def hf_tokens(d: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d).convert_ids_to_tokens(list(range(n)))


def check_sentencepiece(d: Path, vocab: int) -> TokenizerMeta:
    import sentencepiece as spm
    m = read_tokenizer(d)
    assert m.model == "llama" and m.pre == "default" and m.merges == []
    assert len(m.tokens) == len(m.scores) == len(m.token_types) == vocab
    assert m.tokens == hf_tokens(d, vocab)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert m.scores == [sp.GetScore(i) for i in range(vocab)]
    byte_ids = [i for i, t in enumerate(m.token_types) if t == BYTE]
    assert byte_ids == list(range(3, 259))                       # LLaMA-2 layout: <0x00>..<0xFF> after specials
    assert [m.tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert m.tokens[byte_ids[10]] == "<0x0A>"
    assert m.token_types[:3] == [UNKNOWN, CONTROL, CONTROL] and set(m.token_types[259:]) == {NORMAL}
    assert (m.unk_id, m.bos_id, m.eos_id, m.pad_id) == (0, 1, 2, None)
    assert (m.add_bos, m.add_eos) == (True, False)
    assert any(t.startswith("\u2581") for t in m.tokens)          # pieces keep SentencePiece's '▁'
    return m


def test_fixture_sentencepiece(llama_s_dir):
    check_sentencepiece(llama_s_dir, 8192)


def test_tiny_sentencepiece(tiny_model_dir):
    check_sentencepiece(tiny_model_dir, 512)


@pytest.mark.parametrize("pretok,pre", [("llama3", "llama-bpe"), ("tekken", "tekken"), ("gpt2", "gpt-2")])
def test_byte_level_bpe(tiny_model_factory, pretok, pre):
    d = tiny_model_factory(bpe=True, pretokenizer=pretok)
    m = read_tokenizer(d)
    tj = json.loads((d / "tokenizer.json").read_text())
    assert m.model == "gpt2" and m.pre == pre and m.scores == []
    assert m.tokens == hf_tokens(d, 512)
    assert m.tokens == [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])] + \
        ["<|begin_of_text|>", "<|end_of_text|>", "<tool_call>"]
    assert m.merges == [" ".join(p) if isinstance(p, list) else p for p in tj["model"]["merges"]]
    assert len(m.merges) > 200 and all(len(x.split(" ")) == 2 for x in m.merges)
    assert m.token_types[-3:] == [CONTROL, CONTROL, USER_DEFINED] and set(m.token_types[:-3]) == {NORMAL}
    cfg = json.loads((d / "config.json").read_text())
    assert (m.bos_id, m.eos_id) == (509, 510) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert m.unk_id is None and m.add_bos is True and m.add_eos is False   # BOS from the post-processor


def test_sentencepiece_exported_as_tokenizer_json_matches(tiny_model_dir, tmp_path):
    """A LLaMA-2 checkpoint that ships only tokenizer.json must give the same vocabulary and scores."""
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists() and (tmp_path / "tokenizer.json").exists()
    a, b = read_tokenizer(tiny_model_dir), read_tokenizer(tmp_path, n_vocab=512)
    assert b.model == "llama"
    assert (b.tokens, b.token_types, b.scores) == (a.tokens, a.token_types, a.scores)
    assert (b.bos_id, b.eos_id, b.unk_id, b.add_bos) == (1, 2, 0, True)


def test_padding_to_model_vocab_and_added_tokens(tiny_model_dir, copy_model):
    d = copy_model(tiny_model_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 520
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {"512": {"content": "<|im_start|>", "special": False},
                                  "513": {"content": "my\u2581word", "special": False}}
    tc["add_eos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    m = read_tokenizer(d)
    assert len(m.tokens) == len(m.scores) == len(m.token_types) == 520
    assert m.tokens[512:515] == ["<|im_start|>", "my word", "[PAD514]"]
    assert m.token_types[512:] == [CONTROL, USER_DEFINED] + [UNUSED] * 6
    assert m.add_eos is True


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path) + r".*no tokenizer found"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: tokenizer model type 'WordPiece'"):
        read_tokenizer(tmp_path)


def write_and_read(meta: TokenizerMeta, path: Path) -> gguf.GGUFReader:
    w = gguf.GGUFWriter(path, "llama")
    add_tokenizer_to_gguf(w, meta)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path)


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_gguf_round_trip(tiny_model_dir, tiny_bpe_model_dir, tmp_path, which):
    meta = read_tokenizer(tiny_model_dir if which == "spm" else tiny_bpe_model_dir)
    r = write_and_read(meta, tmp_path / "t.gguf")
    f = r.fields
    assert f["tokenizer.ggml.model"].contents() == meta.model
    assert f["tokenizer.ggml.pre"].contents() == meta.pre
    assert f["tokenizer.ggml.tokens"].contents() == meta.tokens
    assert f["tokenizer.ggml.token_type"].contents() == meta.token_types
    assert f["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    if which == "spm":
        assert f["tokenizer.ggml.scores"].contents() == meta.scores
        assert "tokenizer.ggml.merges" not in f
        assert f["tokenizer.ggml.unknown_token_id"].contents() == 0
    else:
        assert "tokenizer.ggml.scores" not in f
        assert f["tokenizer.ggml.merges"].contents() == meta.merges
    assert f["tokenizer.ggml.bos_token_id"].contents() == meta.bos_id
    assert f["tokenizer.ggml.eos_token_id"].contents() == meta.eos_id
    assert "tokenizer.ggml.padding_token_id" not in f
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert f["tokenizer.ggml.add_eos_token"].contents() is False
    assert meta_from_gguf(r) == meta


def test_inconsistent_meta_is_refused(tiny_model_dir, tmp_path):
    meta = read_tokenizer(tiny_model_dir)
    meta.token_types = meta.token_types[:-1]
    with pytest.raises(ValueError, match="511 token types for 512 tokens"):
        add_tokenizer_to_gguf(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), meta)


def test_module_does_not_import_torch():
    code = "import sys, wqedge.converters.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")  # not the checkout: test the installed package


def test_smollm_pre_tokenizer_detected(tiny_model_factory):
    """SmolLM's pre-tokenizer (individual digits, then ByteLevel with GPT-2's regex) is llama.cpp's 'smollm'."""
    d = tiny_model_factory(bpe=True, pretokenizer="smollm")
    pt = json.loads((d / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pt["pretokenizers"]] == ["Digits", "ByteLevel"]
    m = read_tokenizer(d)
    assert (m.model, m.pre) == ("gpt2", "smollm")
    assert m.tokens == hf_tokens(d, 512)


@pytest.mark.parametrize("files,where", [("default", "tokenizer_config.json"), ("json", "chat_template.json"),
                                         ("json_only", "chat_template.jinja")])
@pytest.mark.parametrize("bpe", [False, True])
def test_chat_template_sources(tiny_model_factory, tmp_path, files, where, bpe):
    """tokenizer.chat_template comes from tokenizer_config.json, chat_template.json or chat_template.jinja
    (the last also with no tokenizer_config.json at all) and survives the GGUF round trip."""
    from wqedge.tinymodel import BPE_CHAT_TEMPLATE, SPM_CHAT_TEMPLATE
    d = tiny_model_factory(bpe=bpe, tokenizer_files=files) if bpe else tiny_model_factory(tokenizer_files=files)
    assert (d / where).is_file()
    assert (d / "tokenizer_config.json").is_file() == (files != "json_only")
    want = BPE_CHAT_TEMPLATE if bpe else SPM_CHAT_TEMPLATE
    m = read_tokenizer(d)
    assert m.chat_template == want
    r = write_and_read(m, tmp_path / "t.gguf")
    assert r.fields["tokenizer.chat_template"].contents() == want
    assert meta_from_gguf(r) == m


def test_named_chat_templates_give_the_default(tiny_bpe_model_dir, copy_model):
    d = copy_model(tiny_bpe_model_dir)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert read_tokenizer(d).chat_template == "D"


def test_spm_prepend_scheme_follows_transformers(tiny_model_factory, copy_model):
    """Where SentencePiece's '▁' goes: transformers 5's LlamaTokenizer uses tokenizer_config.json's legacy
    (default false) over tokenizer.json; a tokenizer.json alone decides by its own pre-tokenizer/normalizer
    (ids through the C++ tokenizer: test_tokenizer_kinds.test_spm_old_tokenizer_json_alone)."""
    assert read_tokenizer(tiny_model_factory()).spm_prepend == "first"
    assert read_tokenizer(tiny_model_factory(legacy=True)).spm_prepend == "always"
    d = copy_model(tiny_model_factory(tokenizer_files="json_only"))
    tj = json.loads((d / "tokenizer.json").read_text())
    assert read_tokenizer(d).spm_prepend == "first"
    # An older export: normalizer Prepend("▁") + Replace, no pre-tokenizer ("▁" before every segment).
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert read_tokenizer(d).spm_prepend == "prepend"
