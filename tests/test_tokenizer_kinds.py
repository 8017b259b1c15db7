"""Every LLaMA-family tokenizer kind, end to end: a tiny model built with that tokenizer, converted to a
GGUF (wqedge.quantize.convert_to_gguf: converters/tokenizer.py writes the tokenizer.ggml.* keys), opened
with the C++ runtime (runtime/native.py), must give the ids of Hugging Face's AutoTokenizer on a
multilingual, code and emoji text, decode back to the text, and carry the checkpoint's chat template.

Kinds (wqedge.tinymodel builders):
  spm            SentencePiece tokenizer.model (Llama 2 / TinyLlama / Mistral layout, byte fallback)
  spm-json       the same tokenizer exported as tokenizer.json (no tokenizer.model), chat_template.json
  spm-json-only  the same tokenizer.json alone with chat_template.jinja (no tokenizer_config.json)
  spm-legacy     SentencePiece with "legacy": true (Mistral's tokenizer_config.json: "▁" after specials too)
  gpt2           byte-level BPE with GPT-2's regex (pre 'gpt-2')
  smollm         byte-level BPE, individual digits + GPT-2's regex (SmolLM; pre 'smollm')
  llama3         byte-level BPE with LLaMA 3's split regex and ignore_merges (pre 'llama-bpe')
  llama3-json    the same, tokenizer.json + chat_template.jinja only (no tokenizer_config.json)
  tekken         byte-level BPE with Tekken's case-aware split regex and ignore_merges (Mistral NeMo; pre 'tekken')
  gpt2-json      GPT-2 regex BPE with chat_template.json beside tokenizer_config.json
"""
from __future__ import annotations

import random

import gguf
import pytest

from wqedge.tinymodel import BPE_CHAT_TEMPLATE, SPM_CHAT_TEMPLATE

# One text covering what real prompts hold: English with contractions and digit runs, accented Latin,
# Cyrillic, CJK, Arabic, code with tabs / CRLF / indentation, emoji (skin tone, ZWJ sequences, flags,
# variation selectors), runs of spaces and newlines, and trailing whitespace.
TEXT = (
    "Hello, world! It's 12345 o'clock; we'll see: they're here, I'd say you've GOT IT'S DON'T it'\u017f.\n"
    "Gr\u00f6\u00dfenordnung: \u00dcberm\u00e4\u00dfig sch\u00f6ne B\u00fccher. Fa\u00e7ade, na\u00efve caf\u00e9, "
    "r\u00e9sum\u00e9, \u00e0 l'\u00e9cole o\u00f9 \u00e7a.\n"
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430? "
    "\u041c\u043e\u0441\u043a\u0432\u0430 2024 \u0433.\n"
    "\u4e2d\u6587\u5206\u8bcd\u6d4b\u8bd5\uff1a\u6211\u4eec\u5728\u5317\u4eac\u3002"
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001"
    "\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3002\n"
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645\u060c \u0647\u0630\u0627 "
    "\u0646\u0635 \u0639\u0631\u0628\u064a \u0661\u0662\u0663\u0664\u0665.\n"
    "def forward(self, x):\r\n\tif x is None:\r\n\t\treturn 0  # tab\n"
    "    for i in range(10):\n        y = x[i] ** 2 != 3.14159 && a->b::c();\n\n"
    "Emoji: \U0001f642\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
    "\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f1e9\U0001f1ea\U0001f1ef\U0001f1f5 \u2764\ufe0f\n"
    "spaces:   three   and\t\ttabs  \n\n\nend   "
)

KINDS = {
    "spm": (dict(), "llama", "default", SPM_CHAT_TEMPLATE),
    "spm-json": (dict(tokenizer_files="json"), "llama", "default", SPM_CHAT_TEMPLATE),
    "spm-json-only": (dict(tokenizer_files="json_only"), "llama", "default", SPM_CHAT_TEMPLATE),
    "spm-legacy": (dict(legacy=True), "llama", "default", SPM_CHAT_TEMPLATE),
    "gpt2": (dict(bpe=True, pretokenizer="gpt2"), "gpt2", "gpt-2", BPE_CHAT_TEMPLATE),
    "smollm": (dict(bpe=True, pretokenizer="smollm"), "gpt2", "smollm", BPE_CHAT_TEMPLATE),
    "llama3": (dict(bpe=True, pretokenizer="llama3"), "gpt2", "llama-bpe", BPE_CHAT_TEMPLATE),
    "llama3-json": (dict(bpe=True, pretokenizer="llama3", tokenizer_files="json_only"), "gpt2", "llama-bpe",
                    BPE_CHAT_TEMPLATE),
    "gpt2-json": (dict(bpe=True, pretokenizer="gpt2", tokenizer_files="json"), "gpt2", "gpt-2", BPE_CHAT_TEMPLATE),
    "tekken": (dict(bpe=True, pretokenizer="tekken"), "gpt2", "tekken", BPE_CHAT_TEMPLATE),
}


def _convert(d, out):
    from wqedge.alloc.uniform import uniform_plan
    from wqedge.checkpoint import LlamaCheckpoint
    from wqedge.quantize import convert_to_gguf

    ckpt = LlamaCheckpoint.open(d)
    plan = uniform_plan(ckpt.spec.linears(), 128, 16.0, model_fingerprint=ckpt.fingerprint(), action="fp16")
    return convert_to_gguf(ckpt, plan, out)


@pytest.fixture(scope="module")
def kind_files(tiny_model_factory, tmp_path_factory):
    """kind -> (model folder, GGUF path), built and converted on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            d = tiny_model_factory(**KINDS[kind][0])
            cache[kind] = (d, _convert(d, tmp_path_factory.mktemp("kinds") / f"{kind}.gguf"))
        return cache[kind]

    return get


CHAT = [{"role": "user", "content": "Hi! Wie geht's? \u4f60\u597d \U0001f642"},
        {"role": "assistant", "content": "Fine, thanks.\n\tdef f(): return 42"},
        {"role": "user", "content": " and   now?"}]


def _texts(specials: tuple[str, ...] = ()) -> list[str]:
    """TEXT, each of its lines, and random mixes of its pieces with edge characters and special tokens."""
    lines = TEXT.splitlines(keepends=True)
    rng = random.Random(99)
    bits = [w for line in lines for w in line.split(" ")] + [" ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "123456",
                                                            "\u00a0", "\u3000", "\u2028", "\U0001f642", "<", "|",
                                                            *specials]
    mixes = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    return [TEXT] + lines + mixes + ["", " ", "12345678", "x\r\n\r\n  y", "\n\n", "  \n", "hi  "]


def _diff(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at {i}: ours {a[max(0, i - 4):i + 4]} vs hf {b[max(0, i - 4):i + 4]}"
    return f"lengths differ: ours {len(a)} vs hf {len(b)}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_decode_and_chat_template_match_hf(kind_files, kind):
    from transformers import AutoTokenizer

    from wqedge.converters.tokenizer import meta_from_gguf
    from wqedge.runtime.native import Model

    d, path = kind_files(kind)
    _, model_name, pre, template = KINDS[kind]
    meta = meta_from_gguf(gguf.GGUFReader(path))
    assert (meta.model, meta.pre, meta.chat_template) == (model_name, pre, template)
    assert meta.spm_prepend == ("always" if kind == "spm-legacy" else "first" if model_name == "llama" else None)
    hf = AutoTokenizer.from_pretrained(d)
    specials = tuple(t for t in hf.all_special_tokens + ["<tool_call>"] if t in hf.get_vocab())
    # The prompt `wqedge run --chat` would tokenize (transformers reads chat_template.json/.jinja only for
    # processors or without tokenizer_config.json, so the template is passed explicitly).
    chat = hf.apply_chat_template(CHAT, chat_template=template, tokenize=False, add_generation_prompt=True,
                                  bos_token=meta.tokens[meta.bos_id], eos_token=meta.tokens[meta.eos_id])
    assert CHAT[1]["content"] in chat
    with Model(path) as m:
        assert m.chat_template() == template
        assert m.info["has_tokenizer"] == 1
        texts = _texts(specials) + [chat] + [f"a{s}b {s} c{s}" for s in specials]
        for text in texts:
            want = hf(text)["input_ids"]
            got = m.tokenize(text).tolist()
            assert got == want, f"{kind} {text[:60]!r}: {_diff(got, want)}"
            assert m.tokenize(text, add_bos=False).tolist() == hf(text, add_special_tokens=False)["input_ids"]
            dec = m.detokenize(got)
            assert dec == hf.decode(want, skip_special_tokens=True), f"{kind} {text[:60]!r}"
        # A rendered chat: the template's BOS is in the text, so tokenize without adding another.
        assert m.tokenize(chat, add_bos=False).tolist() == hf(chat, add_special_tokens=False)["input_ids"]
        ids = m.tokenize(TEXT).tolist()
        assert ids[0] == m.bos_id and len(ids) > 100
        assert m.detokenize(ids) == TEXT                      # round trip of the whole text
        pieces = b"".join(m.token_to_piece(t) for t in ids).decode("utf-8")
        assert pieces.lstrip(" ") == TEXT                     # streaming pieces join to the text (SPM: one ' ' prefix)


def _random_unicode_texts(seed: int, n: int) -> list[str]:
    """Random strings over every plane, every kind of whitespace, contractions (also 'ſ / Kelvin sign),
    digit runs (also newer Unicode digits), specials and punctuation next to letters and newlines."""
    from text_samples import random_texts
    words = ["'s", "'S", "'t", "'RE", "'Ve", "'m", "'LL", "'d", "'\u017f", "'\u212a", "123456", "  ", "\r\n", "\n\n",
             "<|begin_of_text|>", "<tool_call>", "<s>", "</s>", "(x)", "!!\n", "a1b2", "\u0661\u0662\u0663\u0664",
             "\U00011de0\U00011de1", "\U00016ff4"]
    return random_texts(seed, n, words, p_ascii=0.45, p_word=0.2, max_len=40)


@pytest.mark.parametrize("kind", ["gpt2", "smollm", "llama3", "tekken", "spm-legacy"])
def test_random_unicode_strings_match_hf(kind_files, kind):
    from transformers import AutoTokenizer

    from wqedge.runtime.native import Model

    d, path = kind_files(kind)
    hf = AutoTokenizer.from_pretrained(d)
    with Model(path) as m:
        for text in _random_unicode_texts(sum(map(ord, kind)), 500):
            want = hf(text)["input_ids"]
            got = m.tokenize(text).tolist()
            assert got == want, f"{text!r}: {_diff(got, want)}"
            assert m.detokenize(got) == hf.decode(want, skip_special_tokens=True), repr(text)


def test_llama3_split_and_ignore_merges_are_exercised(kind_files):
    """The test text reaches the LLaMA 3 regex branches that GPT-2's lacks, and ignore_merges changes ids on it."""
    import json

    from tokenizers import Tokenizer

    d, _ = kind_files("llama3")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_str(json.dumps(tj))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(TEXT)]
    assert {"123", "45", "(self", "\u0120\u0120\u0120"} <= set(pieces)      # \p{N}{1,3}, [^\r\n\p{L}\p{N}]?\p{L}+
    assert "'\u00c5\u00bf" in pieces and "):\u010d\u010a" in pieces         # 'ſ (case-folded 's), punct + \r\n


# Where Tekken's pattern differs from LLaMA 3's: letter runs split by case (an upper-case run keeps the lower-case run
# after it, a lower-case run ends before an upper-case letter), titlecase and modifier letters and Lo scripts in both
# classes, combining marks (in both classes, but not letters: a mark may also be the optional prefix), digits one by
# one, no contractions, and '/' after punctuation.
TEKKEN_CASES = [
    "HELLOworld helloWorld iPhone McDonald's NASA's XMLHttpRequest getHTTPResponseCode ABC DEF",
    "\u01c5emal \u01c4UNGLA \u01c6ungla \u1f88\u1f00 \u02b0\u02b1X \u00c0\u00c9\u00ce\u00f5\u00fc \u00dcBER\u00e4",
    "e\u0301te\u0301 E\u0301TE\u0301 \u0301a \u0301A \u0301\u0302 x\u0308Y !\u0301 \u0915\u093f\u0924\u093e\u092c",
    "\u4e2d\u6587ABCdef \u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd 12345 3.14 a1B2c3",
    "http://example.com/a/b?x=1 (HELLO)! \"Quote\" ...// // \n/ \t\r\n  \u00a0\u3000end",
]


def test_tekken_cases_match_hf(kind_files):
    """Tekken's case-aware letter runs and marks (TEKKEN_CASES) give Hugging Face's ids; and the cases reach the
    branches that set Tekken apart (checked on Hugging Face's own pre-tokenization)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from wqedge.runtime.native import Model

    d, path = kind_files("tekken")
    tok = Tokenizer.from_str((d / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = {p for text in TEKKEN_CASES for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)}
    assert {"HELLOworld", "\u0120hello", "World", "\u0120NASA", "'s", "1", "2"} <= pieces, sorted(pieces)
    assert {"\u0120XMLHttp", "Request", "\u0120get", "HTTPResponse", "\u0120E\u00cc\u0123TE\u00cc\u0123"} <= pieces   # marks
    hf = AutoTokenizer.from_pretrained(d)
    rng = random.Random(5)
    words = " ".join(TEKKEN_CASES).split(" ")
    texts = TEKKEN_CASES + ["".join(rng.choice(words) + rng.choice(["", " ", "\n"]) for _ in range(6)) for _ in range(200)]
    with Model(path) as m:
        for text in texts:
            want = hf(text)["input_ids"]
            got = m.tokenize(text).tolist()
            assert got == want, f"{text!r}: {_diff(got, want)}"
            assert m.detokenize(got) == hf.decode(want, skip_special_tokens=True), repr(text)


def test_llama3_ignore_merges(tiny_model_factory, copy_model, tmp_path):
    """LLaMA 3's tokenizer.json sets ignore_merges: a pre-token that is a vocabulary entry is that entry even
    when the merges would not build it (real Llama 3 vocabularies have such entries; a vocabulary trained
    here has none, so one merge is removed)."""
    import json

    from transformers import AutoTokenizer

    from wqedge.runtime.native import Model

    d = copy_model(tiny_model_factory(bpe=True, pretokenizer="llama3"))
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["ignore_merges"] is True
    merges = tj["model"]["merges"]
    pairs = [m if isinstance(m, list) else m.split(" ") for m in merges]
    k = max(i for i, (a, b) in enumerate(pairs) if (a + b).startswith("\u0120") and (a + b)[1:].isalpha()
            and len(a + b) > 3)
    word = "".join(pairs[k])
    del merges[k]
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    path = _convert(d, tmp_path / "m.gguf")
    text = f"{word[1:]}{word.replace(chr(0x120), ' ')}, {word[1:]}s{word.replace(chr(0x120), ' ')}!"
    hf = AutoTokenizer.from_pretrained(d)
    want = hf(text)["input_ids"]
    assert tj["model"]["vocab"][word] in want
    with Model(path) as m:
        assert m.tokenize(text).tolist() == want
        assert m.detokenize(want) == text


def test_spm_old_tokenizer_json_alone(tiny_model_factory, copy_model, tmp_path):
    """A SentencePiece tokenizer.json of the older export (normalizer Prepend("▁") + Replace, no
    pre-tokenizer), alone in the folder: "▁" before every segment, also after special tokens."""
    import json

    from transformers import AutoTokenizer

    from wqedge.runtime.native import Model

    d = copy_model(tiny_model_factory(tokenizer_files="json_only"))
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    path = _convert(d, tmp_path / "m.gguf")
    hf = AutoTokenizer.from_pretrained(d)
    assert gguf.GGUFReader(path).fields["wqedge.tokenizer.spm_prepend"].contents() == "prepend"
    assert hf(" hi")["input_ids"] != hf("hi")["input_ids"]                  # "▁▁hi" vs "▁hi"
    with Model(path) as m:
        for text in ["a<s>b", "x </s>y<s> z", TEXT, "<s>" + TEXT] + _texts(("<s>", "</s>", "<unk>"))[:80]:
            assert m.tokenize(text).tolist() == hf(text)["input_ids"], repr(text[:60])


def test_unknown_pre_tokenizer_is_refused_clearly(tiny_model_factory, tmp_path, monkeypatch):
    """A gpt2 vocabulary whose pre-tokenizer we do not implement: the model opens, tokenizing says why."""
    import wqedge.converters.tokenizer as ct
    from wqedge.runtime import _native
    from wqedge.runtime.native import Model

    monkeypatch.setattr(ct, "_detect_pre", lambda tj: "qwen2")
    path = _convert(tiny_model_factory(bpe=True), tmp_path / "qwen2.gguf")
    with Model(path) as m:
        assert m.info["has_tokenizer"] == 0
        with pytest.raises(_native.NativeError, match=r"pre-tokenizer 'qwen2'.*not supported") as e:
            m.tokenize("hello")
        assert e.value.code == _native.ERR_NO_TOKENIZER
        assert m.chat_template() == BPE_CHAT_TEMPLATE        # the rest of the file is usable


def test_no_chat_template_is_none(tiny_model_factory, copy_model, tmp_path):
    import json

    from wqedge.runtime.native import Model

    d = copy_model(tiny_model_factory())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    path = _convert(d, tmp_path / "plain.gguf")
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields
    with Model(path) as m:
        assert m.chat_template() is None
