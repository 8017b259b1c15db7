"""The C++ tokenizer (cpp/src/tokenizer.cpp) against Hugging Face.

Builds cpp/tests/tokenizer_test_main.cpp with g++, writes the tokenizer arrays a
GGUF file would hold (as llama.cpp's convert_hf_to_gguf.py makes them) into a
real GGUF file with the gguf package, reads them back with GGUFReader, dumps
them in the driver's text format and compares token ids and decoded text with
transformers / tokenizers.

`dump_vocab_from_gguf(gguf_path, out_path)` also works on a full model GGUF:
    python -c "from tests.test_cpp_tokenizer import dump_vocab_from_gguf as d; d('m.gguf', 'vocab.txt')"
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPP_SRC = REPO / "cpp" / "src"
DRIVER_SRC = REPO / "cpp" / "tests" / "tokenizer_test_main.cpp"
FIXTURES = Path(os.environ.get("WQEDGE_FIXTURES", REPO.parent / "shared" / "fixtures"))
LLAMA_DIR = FIXTURES / "llama-s"
TEXT_DIR = FIXTURES / "text"

# tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

EDGE_CASES = [
    "",
    " ",
    "  ",
    "hello",
    " hello",
    "  hello",
    "hello ",
    "hello   ",
    "  hello  world  ",
    "a  b   c    d",
    "\n",
    "\n\n",
    "a\nb",
    "\nhello",
    "hello\n",
    "line one\n  indented\n\tTabbed\n",
    "x\tb",
    "\t x",
    "\r\n",
    "trailing \n",
    "    def f(x):\n        return x  # comment\n",
    "😀",
    "😀 中文 日本語のテキスト 한국어",
    "emoji 🔥❗✓ mixed",
    "é e\u0301 ǅ ß ñ Ωμέγα",
    "\u00a0nbsp\u00a0x\u3000y",
    "<s>",
    "</s>",
    "<unk>",
    "<s>hello</s>",
    "hi <s> there",
    "hi<s>there",
    "a </s> b <unk> c",
    "<s<s>>",
    "< s > <0x41> <0x0A>",
    "\u2581hi",
    " \u2581hi",
    "12345 3.14159 1e-9 0x7fff",
    "don't I'll we've they're it's",
    "=" * 40 + "\n" + "-" * 33,
    "ends with spaces    ",
    "\x00\x01\x1f control chars \x7f",
]

# Extra texts for byte-level BPE (Unicode classes of the GPT-2 pattern).
BPE_EXTRA_CASES = [
    "I'LL DON'T ''s 's 'S 're're 'll'd",
    "٣٤٥ ४२ ² ½ Ⅳ ① 10,000.5",
    "a\u2028b\u0085c\u200ad\u2009e",
    "x  \n  y \n\n z\t\t w",
    "Hello,world!!  ...?? (foo)[bar]{baz} <tag/> @user #hash $5 %20",
    "naïve café résumé Ελληνικά русский עברית العربية",
    "wqedge_tok inside wqedge_tok<|endoftext|>after",
    "<|endoftext|>",
    "  leading spaces and trailing  ",
]


# --------------------------------------------------------------------------
# Vocabulary arrays as convert_hf_to_gguf.py makes them
# --------------------------------------------------------------------------


def spm_gguf_arrays(model_dir: Path) -> dict:
    """The SentencePiece arrays our converter writes into the GGUF (converters/tokenizer.read_tokenizer,
    which mirrors llama.cpp's convert_hf_to_gguf), so the C++ tokenizer is tested on the product's own vocabulary."""
    from wqedge.converters.tokenizer import read_tokenizer

    m = read_tokenizer(model_dir)
    opt = lambda v: -1 if v is None else int(v)  # noqa: E731
    return {"model": m.model, "tokens": [t.encode("utf-8") for t in m.tokens], "scores": list(m.scores),
            "types": list(m.token_types), "merges": list(m.merges), "bos": opt(m.bos_id), "eos": opt(m.eos_id),
            "unk": opt(m.unk_id), "add_bos": bool(m.add_bos), "add_eos": bool(m.add_eos)}


def bpe_gguf_arrays(tok) -> dict:
    """Byte-level BPE arrays from a `tokenizers.Tokenizer` (like convert_hf_to_gguf's get_vocab_base)."""
    import json

    j = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    rev = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in j["added_tokens"]}
    tokens, types = [], []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
        elif i in added:
            tokens.append(rev[i].encode("utf-8"))
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        else:
            tokens.append(rev[i].encode("utf-8"))
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return {
        "model": "gpt2",
        "tokens": tokens,
        "scores": [],
        "types": types,
        "merges": merges,
        "bos": -1,
        "eos": vocab.get("<|endoftext|>", -1),
        "unk": -1,
        "add_bos": False,
        "add_eos": False,
    }


def write_tokenizer_gguf(arrays: dict, path: Path) -> None:
    """A GGUF file holding only the tokenizer.ggml.* keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(arrays["model"])
    w.add_token_list(arrays["tokens"])
    if arrays["scores"]:
        w.add_token_scores(arrays["scores"])
    w.add_token_types(arrays["types"])
    if arrays["merges"]:
        w.add_token_merges(arrays["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id)):
        if arrays[key] >= 0:
            add(arrays[key])
    w.add_add_bos_token(arrays["add_bos"])
    w.add_add_eos_token(arrays["add_eos"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dump_vocab_from_gguf(gguf_path, out_path) -> None:
    """Write the driver's vocabulary dump (format: cpp/tests/tokenizer_test_main.cpp) from a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def field(name, default=None):
        f = r.fields.get(name)
        if f is None:
            return default
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]) for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]

    tokens = field("tokenizer.ggml.tokens")
    scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = field("tokenizer.ggml.merges") or []

    def hx(b: bytes) -> str:
        return b.hex() if b else "-"

    lines = [
        "wqedge-tokenizer-vocab 1",
        f"model {field('tokenizer.ggml.model')}",
        f"bos_token_id {field('tokenizer.ggml.bos_token_id', -1)}",
        f"eos_token_id {field('tokenizer.ggml.eos_token_id', -1)}",
        f"unknown_token_id {field('tokenizer.ggml.unknown_token_id', -1)}",
        f"add_bos_token {int(bool(field('tokenizer.ggml.add_bos_token', False)))}",
        f"add_eos_token {int(bool(field('tokenizer.ggml.add_eos_token', False)))}",
        f"add_space_prefix {int(bool(field('tokenizer.ggml.add_space_prefix', True)))}",
        f"tokens {len(tokens)}",
    ]
    lines += [f"{int(t)} {float(s)!r} {hx(tok)}" for tok, s, t in zip(tokens, scores, types)]
    lines.append(f"merges {len(merges)}")
    lines += [hx(m) for m in merges]
    Path(out_path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


class Driver:
    def __init__(self, exe: Path, vocab: Path, work: Path):
        self.exe, self.vocab, self.work = exe, vocab, work
        self.n = 0

    def _file(self, suffix: str) -> Path:
        self.n += 1
        return self.work / f"f{self.n}{suffix}"

    def encode(self, texts: list[str], special: bool = True) -> list[list[int]]:
        paths = []
        for t in texts:
            p = self._file(".txt")
            p.write_bytes(t.encode("utf-8"))
            paths.append(str(p))
        cmd = [str(self.exe), "encode"] + ([] if special else ["--no-special"]) + [str(self.vocab)] + paths
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
        if len(texts) == 1:
            return [[int(x) for x in out.split()]]
        res, cur = [], []
        for line in out.splitlines():
            if line == "---":
                res.append(cur)
                cur = []
            else:
                cur.append(int(line))
        assert len(res) == len(texts)
        return res

    def _render(self, mode: str, id_lists: list[list[int]]) -> list[bytes]:
        args, outs = [], []
        for ids in id_lists:
            p, o = self._file(".ids"), self._file(".out")
            p.write_text(" ".join(map(str, ids)))
            args += [str(p), str(o)]
            outs.append(o)
        subprocess.run([str(self.exe), mode, str(self.vocab)] + args, check=True, timeout=120)
        return [o.read_bytes() for o in outs]

    def decode(self, id_lists: list[list[int]]) -> list[str]:
        return [b.decode("utf-8") for b in self._render("decode", id_lists)]

    def pieces(self, id_lists: list[list[int]]) -> list[bytes]:
        return self._render("pieces", id_lists)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cpp_tokenizer")


class _Build:
    """g++ build of the driver, started in the background so it overlaps Hugging Face's encoding."""

    def __init__(self, workdir: Path):
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        self.skip_reason = None
        if not cxx:
            self.skip_reason = "no C++ compiler (g++/c++/clang++ or $CXX) found; cannot build the tokenizer driver"
            return
        self.exe = workdir / "tokenizer_test_main"
        self.cmd = [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", f"-I{CPP_SRC}",
                    str(DRIVER_SRC), str(CPP_SRC / "tokenizer.cpp"), "-o", str(self.exe)]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> Path:
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        _, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"driver build failed:\n{' '.join(self.cmd)}\n{err}"
        assert "warning" not in err, err
        return self.exe


@pytest.fixture(scope="module")
def driver_build(workdir):
    return _Build(workdir)


@pytest.fixture(scope="module")
def driver_exe(driver_build):
    return driver_build.wait()


def _requires(path: Path):
    if not path.exists():
        pytest.skip(f"fixture missing: {path}")


@pytest.fixture(scope="module")
def hf_spm():
    _requires(LLAMA_DIR / "tokenizer.model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(LLAMA_DIR))


@pytest.fixture(scope="module")
def spm(driver_exe, workdir):
    _requires(LLAMA_DIR / "tokenizer.model")
    g = workdir / "spm.gguf"
    write_tokenizer_gguf(spm_gguf_arrays(LLAMA_DIR), g)
    v = workdir / "spm.vocab"
    dump_vocab_from_gguf(g, v)
    return Driver(driver_exe, v, workdir)


@pytest.fixture(scope="module")
def hf_bpe():
    """A small byte-level BPE trained here (GPT-2 style: ByteLevel pre-tokenizer and decoder)."""
    _requires(TEXT_DIR / "calib.txt")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (TEXT_DIR / "calib.txt").read_text(encoding="utf-8")[:600_000]
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    tok.add_tokens([AddedToken("wqedge_tok", special=False, normalized=False)])
    return tok


@pytest.fixture(scope="module")
def bpe(driver_exe, workdir, hf_bpe):
    g = workdir / "bpe.gguf"
    write_tokenizer_gguf(bpe_gguf_arrays(hf_bpe), g)
    v = workdir / "bpe.vocab"
    dump_vocab_from_gguf(g, v)
    return Driver(driver_exe, v, workdir)


@pytest.fixture(scope="module")
def spm_fixture_ids(driver_build, hf_spm):
    """(name, text, HF ids) for both fixture files; `driver_build` first so g++ runs meanwhile."""
    texts = _fixture_texts()
    ids = hf_spm([t for _, t in texts])["input_ids"]
    return [(name, text, i) for (name, text), i in zip(texts, ids)]


@pytest.fixture(scope="module")
def spm_explicit_merges(driver_exe, workdir, hf_spm):
    """The fixture vocabulary plus HF's own merge list (as a converter copying tokenizer.json merges would store)."""
    import json

    arrays = spm_gguf_arrays(LLAMA_DIR)
    merges = json.loads(hf_spm.backend_tokenizer.to_str())["model"]["merges"]
    arrays["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    g = workdir / "spm_merges.gguf"
    write_tokenizer_gguf(arrays, g)
    v = workdir / "spm_merges.vocab"
    dump_vocab_from_gguf(g, v)
    return Driver(driver_exe, v, workdir)


def _random_texts(seed: int, n: int, words: list[str]) -> list[str]:
    """Random strings mixing ASCII, whitespace of all kinds, code points from every plane and `words`."""
    from text_samples import random_texts
    return random_texts(seed, n, words)


def _first_diff(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at {i}: cpp {a[max(0, i - 5):i + 5]} vs hf {b[max(0, i - 5):i + 5]}"
    return f"lengths differ: cpp {len(a)} vs hf {len(b)}"


def _fixture_texts() -> list[tuple[str, str]]:
    out = []
    for name in ("eval.txt", "calib.txt"):
        p = TEXT_DIR / name
        _requires(p)
        out.append((name, p.read_text(encoding="utf-8")))
    return out


# --------------------------------------------------------------------------
# SentencePiece ("llama") — the fixture tokenizer
# --------------------------------------------------------------------------


def test_spm_fixture_files_identical_ids(spm_fixture_ids, spm):
    got = spm.encode([text for _, text, _ in spm_fixture_ids])
    for (name, _, want), ids in zip(spm_fixture_ids, got):
        assert ids == want, f"{name}: {_first_diff(ids, want)}"


def test_spm_edge_cases_identical_ids(spm, hf_spm):
    got = spm.encode(EDGE_CASES)
    got_plain = spm.encode(EDGE_CASES, special=False)
    for text, ids, plain in zip(EDGE_CASES, got, got_plain):
        want = hf_spm(text)["input_ids"]
        assert ids == want, f"{text!r}: cpp {ids} hf {want}"
        assert plain == hf_spm(text, add_special_tokens=False)["input_ids"], repr(text)


def test_spm_random_strings_identical_ids(spm, hf_spm):
    words = ["<s>", "</s>", "<unk>", "  ", "    ", "hello", " world", "<0x41>", "don't", "中文", "😀"]
    texts = _random_texts(1234, 400, words)
    for text, ids in zip(texts, spm.encode(texts)):
        want = hf_spm(text)["input_ids"]
        assert ids == want, f"{text!r}: cpp {ids} hf {want}"
    decoded = spm.decode([hf_spm(t)["input_ids"] for t in texts])
    for text, got in zip(texts, decoded):
        assert got == hf_spm.decode(hf_spm(text)["input_ids"], skip_special_tokens=True), repr(text)


def test_spm_explicit_merges_identical_ids(spm_explicit_merges, hf_spm, spm_fixture_ids):
    """A "llama" vocabulary that carries tokenizer.ggml.merges uses them (rank = list index)."""
    texts = [spm_fixture_ids[0][1]] + EDGE_CASES
    wants = [spm_fixture_ids[0][2]] + [hf_spm(t)["input_ids"] for t in EDGE_CASES]
    for text, ids, want in zip(texts, spm_explicit_merges.encode(texts), wants):
        assert ids == want, f"{text[:60]!r}: {_first_diff(ids, want)}"


def test_spm_decode_matches_hf_and_round_trips(spm, hf_spm, spm_fixture_ids):
    ids = [hf_spm(t)["input_ids"] for t in EDGE_CASES]
    # Byte runs that are not valid UTF-8, special ids in the middle, ids without BOS.
    b = {x: hf_spm.convert_tokens_to_ids(f"<0x{x:02X}>") for x in (0xE4, 0xB8, 0xAD, 0xFF, 0x41)}
    world = hf_spm.convert_tokens_to_ids("▁world")
    extra = [
        [b[0xE4], b[0xB8]],
        [b[0xE4], b[0xB8], b[0xAD]],
        [b[0xE4], 1, b[0xB8], b[0xAD]],
        [world, b[0xFF], b[0x41], world],
        [world, 0, 2, world],
        [world],
    ]
    decoded = spm.decode(ids + extra + [i for _, _, i in spm_fixture_ids])
    for seq, got in zip(ids + extra, decoded):
        assert got == hf_spm.decode(seq, skip_special_tokens=True), seq[:20]
    # Whole files: decode(encode(x)) == x (HF round-trips them too).
    texts = EDGE_CASES + [None] * len(extra) + [t for _, t, _ in spm_fixture_ids]
    for text, got in zip(texts, decoded):
        if text is None:
            continue
        # HF's own round trip loses a leading space / literal "▁" and drops special tokens.
        if not text.startswith((" ", "\u2581")) and not any(s in text for s in ("<s>", "</s>", "<unk>")):
            assert got == text, repr(text[:80])


def test_spm_pieces_concatenate_to_decode(spm, hf_spm):
    texts = [t for t in EDGE_CASES if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    ids = [hf_spm(t, add_special_tokens=False)["input_ids"] for t in texts]
    for seq, pieces, dec in zip(ids, spm.pieces(ids), spm.decode(ids)):
        s = pieces.decode("utf-8")  # complete sequences: byte pieces join into valid UTF-8
        assert (s[1:] if s.startswith(" ") else s) == dec


# --------------------------------------------------------------------------
# Byte-level BPE ("gpt2")
# --------------------------------------------------------------------------


def test_bpe_identical_ids(bpe, hf_bpe):
    eval_text = _fixture_texts()[0][1]
    texts = [eval_text] + EDGE_CASES + BPE_EXTRA_CASES
    for text, ids in zip(texts, bpe.encode(texts)):
        want = hf_bpe.encode(text).ids
        assert ids == want, f"{text[:60]!r}: {_first_diff(ids, want)}"


def test_bpe_random_strings_identical_ids(bpe, hf_bpe):
    """Unicode classes of the GPT-2 pattern (letters/numbers/whitespace of every script), contractions, specials."""
    words = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "<|endoftext|>", "wqedge_tok", "  ", "   "]
    texts = _random_texts(4321, 600, words)
    for text, ids in zip(texts, bpe.encode(texts)):
        assert ids == hf_bpe.encode(text).ids, repr(text)
    import random

    rng = random.Random(7)
    n = hf_bpe.get_vocab_size()
    seqs = [hf_bpe.encode(t).ids for t in texts] + [[rng.randrange(n) for _ in range(rng.randint(1, 8))] for _ in range(300)]
    for seq, got in zip(seqs, bpe.decode(seqs)):  # random ids: invalid UTF-8 -> U+FFFD like from_utf8_lossy
        assert got == hf_bpe.decode(seq, skip_special_tokens=True), seq


def test_bpe_decode_matches_hf_and_round_trips(bpe, hf_bpe):
    texts = [t for t in EDGE_CASES + BPE_EXTRA_CASES]
    ids = [hf_bpe.encode(t).ids for t in texts]
    byte = lambda x: hf_bpe.token_to_id(bytes([x]).decode("latin-1")) if 0x21 <= x <= 0x7E else None  # noqa: E731
    a = hf_bpe.token_to_id("a")
    e4 = hf_bpe.token_to_id("ä")  # byte 0xE4 maps to itself in bytes_to_unicode
    extra = [[a, e4, a], [e4], [byte(0x41), e4, e4]]
    decoded = bpe.decode(ids + extra)
    for seq, got in zip(ids + extra, decoded):
        assert got == hf_bpe.decode(seq, skip_special_tokens=True), seq
    for text, got in zip(texts, decoded):
        if "<|endoftext|>" not in text:
            assert got == text, repr(text)
