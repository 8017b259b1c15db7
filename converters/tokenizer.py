"""Tokenizer -> GGUF `tokenizer.ggml.*` metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

A GGUF file is only usable by llama.cpp-style runtimes if its vocabulary is laid out exactly as their
converter lays it out (piece text with '▁', byte pieces `<0x0A>`, SentencePiece scores, llama.cpp token
types, "a b" merges). This module reproduces that for the two tokenizers LLaMA models ship with:
SentencePiece (`tokenizer.model`, GGUF model 'llama') and byte-level BPE (`tokenizer.json`, model 'gpt2').
It deliberately does not import torch or transformers: converting the vocabulary needs neither.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

__all__ = ["TokenizerMeta", "TokenizerError", "read_tokenizer", "add_tokenizer_to_gguf", "meta_from_gguf",
           "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE", "LLAMA3_PRETOKENIZER_REGEX",
           "TEKKEN_PRETOKENIZER_REGEX"]

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# LLaMA 3's pre-tokenizer split pattern; llama.cpp names this pre-tokenizer 'llama-bpe'.
LLAMA3_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tekken's (Mistral NeMo and later, as Hugging Face's tokenizer.json states it); llama.cpp names it 'tekken'.
TEKKEN_PRETOKENIZER_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Split-regex pre-tokenizers (Split then ByteLevel without its own regex) by their llama.cpp name.
SPLIT_PRETOKENIZERS = {LLAMA3_PRETOKENIZER_REGEX: "llama-bpe", TEKKEN_PRETOKENIZER_REGEX: "tekken"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_PREPEND_KEY = "wqedge.tokenizer.spm_prepend"


class TokenizerError(ValueError):
    """A tokenizer we cannot convert; the message names the folder or file."""


@dataclass
class TokenizerMeta:
    """Everything the GGUF tokenizer keys hold. Lists are indexed by token id."""
    model: str                       # 'llama' (SentencePiece) or 'gpt2' (byte-level BPE)
    tokens: list[str]
    scores: list[float]              # SentencePiece scores; empty for 'gpt2' (llama.cpp writes none)
    token_types: list[int]           # 1 normal, 2 unknown, 3 control, 4 user_defined, 5 unused, 6 byte
    merges: list[str] = field(default_factory=list)   # 'gpt2' only, "a b"
    pre: str | None = None           # llama.cpp pre-tokenizer name ('default' for SentencePiece)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None
    # 'llama' only: where SentencePiece's "▁" prefix goes. 'first' = before the text's first segment
    # (transformers' legacy=false, its default); 'always' = before every segment, also right after a
    # special token (legacy=true, e.g. Mistral); 'prepend' = before every segment even when it starts with
    # a space (an older tokenizer.json's Prepend normalizer). GGUF key wqedge.tokenizer.spm_prepend.
    spm_prepend: str | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        """Raise ValueError if the lists disagree or an id is out of range (a broken file otherwise)."""
        n = len(self.tokens)
        if len(self.token_types) != n:
            raise ValueError(f"{len(self.token_types)} token types for {n} tokens")
        if self.scores and len(self.scores) != n:
            raise ValueError(f"{len(self.scores)} scores for {n} tokens")
        if self.model not in ("llama", "gpt2"):
            raise ValueError(f"unknown tokenizer model {self.model!r}")
        if self.spm_prepend not in (None, "first", "always", "prepend"):
            raise ValueError(f"spm_prepend must be 'first', 'always' or 'prepend', got {self.spm_prepend!r}")
        bad = sorted(set(self.token_types) - {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})
        if bad:
            raise ValueError(f"invalid token types {bad}")
        for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name} {v} out of range for {n} tokens")


def _does_token_look_special(token: str) -> bool:
    """llama.cpp's heuristic (TextModel.does_token_look_special) for added tokens not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{file}: cannot parse ({e})") from e


def _model_vocab_size(model_dir: Path) -> int | None:
    cfg = _read_json(model_dir / "config.json") or {}
    v = cfg.get("vocab_size")
    return v if isinstance(v, int) and v > 0 else None


def _special_vocab(model_dir: Path, n_vocab: int, load_merges: bool = False) -> gguf.SpecialVocab:
    # gguf.SpecialVocab is the very code llama.cpp's converter uses for special ids, add_bos/eos and merges.
    try:
        return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{model_dir}: cannot read special tokens ({e})") from e


def _chat_template(model_dir: Path, special: gguf.SpecialVocab) -> str | None:
    """tokenizer.chat_template: tokenizer_config.json's "chat_template", else chat_template.jinja, else
    chat_template.json (gguf.SpecialVocab reads them in llama.cpp's order, but only when a
    tokenizer_config.json exists: without one we read the two files here). A list of named templates
    gives its 'default' one (llama.cpp writes the others under tokenizer.chat_template.<name>)."""
    t = special.chat_template
    if t is None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            try:
                t = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja}: cannot read ({e})") from e
        else:
            t = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def read_tokenizer(model_dir, n_vocab: int | None = None) -> TokenizerMeta:
    """Read the tokenizer of a Hugging Face model folder into GGUF-ready metadata.

    `tokenizer.model` (SentencePiece) is preferred, as llama.cpp's converter prefers it; otherwise
    `tokenizer.json` (byte-level BPE -> 'gpt2'; a SentencePiece-derived BPE with byte fallback ->
    'llama'). The vocabulary is padded with `[PAD<i>]` (unused) up to `n_vocab`, by default
    config.json's vocab_size, because the GGUF token list must match the embedding rows.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: folder does not exist")
    if n_vocab is None:
        n_vocab = _model_vocab_size(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        return _read_sentencepiece(model_dir, n_vocab)
    if (model_dir / "tokenizer.json").is_file():
        return _read_tokenizer_json(model_dir, n_vocab)
    raise TokenizerError(f"{model_dir}: no tokenizer found (need tokenizer.model or tokenizer.json)")


def _apply_added_tokens(model_dir: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """added_tokens.json and tokenizer_config.json's added_tokens_decoder, as llama.cpp applies them."""
    n = len(tokens)
    added = _read_json(model_dir / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < n:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    tcfg = _read_json(model_dir / "tokenizer_config.json") or {}
    for tid_s, data in (tcfg.get("added_tokens_decoder") or {}).items():
        tid = int(tid_s)
        if not 0 <= tid < n:
            log.warning("ignoring added token %d: out of range for %d tokens", tid, n)
            continue
        text = data["content"]
        if data.get("special") or _does_token_look_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace("\u2581", " ")   # llama.cpp pre-normalizes user-defined spaces
            types[tid] = USER_DEFINED
        tokens[tid], scores[tid] = text, -1000.0


def _legacy_prepend(model_dir: Path) -> str | None:
    """transformers 5's LlamaTokenizer builds Metaspace(prepend_scheme='always' if legacy else 'first') from
    tokenizer_config.json's "legacy" (default false), whatever tokenizer.json says."""
    tcfg = _read_json(model_dir / "tokenizer_config.json") or {}
    if "legacy" in tcfg:
        return "always" if tcfg["legacy"] else "first"
    if tcfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return "first"
    return None     # no Llama tokenizer class: tokenizer.json's own pre-tokenizer decides


def _json_prepend(tj: dict) -> str:
    """Prepend scheme of a SentencePiece-style tokenizer.json: Metaspace's prepend_scheme, or 'prepend'
    for the older export (normalizer Prepend("▁") applied to every segment)."""
    def items(node):
        node = node or {}
        return node.get("pretokenizers") or node.get("normalizers") or [node]
    for p in items(tj.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            scheme = p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
            return "always" if scheme == "always" else "first"
    if any(n.get("type") == "Prepend" for n in items(tj.get("normalizer"))):
        return "prepend"     # unconditional, even before a leading space (" hi" -> "▁▁hi")
    return "first"


def _read_sentencepiece(model_dir: Path, n_vocab: int | None) -> TokenizerMeta:
    """Mirror of llama.cpp's TextModel._create_vocab_sentencepiece + _set_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    file = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(file))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{file}: not a valid SentencePiece model ({e})") from e
    n_sp = sp.vocab_size()
    n = n_vocab or n_sp
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(min(n, n_sp)):
        t = NORMAL
        if sp.IsUnknown(i):
            t = UNKNOWN
        elif sp.IsControl(i):
            t = CONTROL
        elif sp.IsUnused(i):
            t = UNUSED
        elif sp.IsByte(i):
            t = BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), t
    if n_sp > n:
        log.warning("%s: %d pieces, model vocab is %d: ignoring pieces from id %d", file, n_sp, n, n)
    _apply_added_tokens(model_dir, tokens, scores, types)

    special = _special_vocab(model_dir, len(tokens))
    ids = special.special_token_ids

    def sp_id(v: int) -> int | None:
        return v if 0 <= v < len(tokens) else None

    return TokenizerMeta(
        model="llama", tokens=tokens, scores=scores, token_types=types, merges=[], pre="default",
        bos_id=ids.get("bos", sp_id(sp.bos_id())), eos_id=ids.get("eos", sp_id(sp.eos_id())),
        unk_id=ids.get("unk", sp_id(sp.unk_id())), pad_id=ids.get("pad", sp_id(sp.pad_id())),
        add_bos=special.add_special_token.get("bos", True), add_eos=special.add_special_token.get("eos", False),
        chat_template=_chat_template(model_dir, special), spm_prepend=_legacy_prepend(model_dir) or "first",
    )


def _detect_pre(tj: dict) -> str:
    """llama.cpp pre-tokenizer name from tokenizer.json's pre_tokenizer.

    llama.cpp identifies pre-tokenizers by hashing the tokenization of a probe text against known
    models; we recognise the structures that matter for LLaMA-family checkpoints: LLaMA 3's split
    regex ('llama-bpe'), Mistral NeMo's Tekken split regex ('tekken'), GPT-2's built-in ByteLevel
    regex ('gpt-2') and SmolLM's individual digits before it ('smollm'). Anything else is written as
    'default', which wqedge's C++ tokenizer refuses (tokenizing would not match Hugging Face).
    """
    pt = tj.get("pre_tokenizer") or {}
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    splits = [p for p in items if p.get("type") == "Split"]
    bytelevel = [p for p in items if p.get("type") == "ByteLevel"]
    if (len(items) == 2 and len(splits) == 1 and len(bytelevel) == 1
            and (splits[0].get("pattern") or {}).get("Regex") in SPLIT_PRETOKENIZERS
            and not bytelevel[0].get("use_regex", True)):
        return SPLIT_PRETOKENIZERS[splits[0]["pattern"]["Regex"]]
    if len(items) == 1 and len(bytelevel) == 1 and bytelevel[0].get("use_regex", True):
        return "gpt-2"
    digits = [p for p in items if p.get("type") == "Digits"]
    if (len(items) == 2 and items[0] in digits and items[0].get("individual_digits")
            and items[1] in bytelevel and bytelevel[0].get("use_regex", True)):
        return "smollm"      # SmolLM: Digits(individual_digits=True) then ByteLevel with GPT-2's regex
    log.warning("unrecognised BPE pre-tokenizer %s; writing pre='default': wqedge's runtime will not tokenize "
                "text for this file (token ids still work)", json.dumps(pt)[:200])
    return "default"


def _read_tokenizer_json(model_dir: Path, n_vocab: int | None) -> TokenizerMeta:
    file = model_dir / "tokenizer.json"
    tj = _read_json(file)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{file}: tokenizer model type {model.get('type')!r} is not supported "
                             f"(need BPE, or a SentencePiece tokenizer.model)")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    n_base = max(list(vocab.values()) + list(added), default=-1) + 1
    n = n_vocab or n_base
    if n_base > n:
        raise TokenizerError(f"{file}: token ids go up to {n_base - 1}, but the model has only {n} embeddings")
    rev = {i: t for t, i in vocab.items()}
    byte_fallback = bool(model.get("byte_fallback"))
    decoder_type = (tj.get("decoder") or {}).get("type")
    if not byte_fallback and decoder_type != "ByteLevel":
        raise TokenizerError(f"{file}: BPE without byte fallback needs a ByteLevel decoder, found {decoder_type!r}")

    tokens, types = [], []
    for i in range(n):
        if i in added:
            text = added[i]["content"]
            if added[i].get("special") or _does_token_look_special(text):
                t = CONTROL
            else:
                text, t = text.replace("\u2581", " "), USER_DEFINED
        elif i in rev:
            text, t = rev[i], NORMAL
            if byte_fallback and _BYTE_PIECE.fullmatch(text):
                t = BYTE
        else:
            text, t = f"[PAD{i}]", UNUSED
        tokens.append(text)
        types.append(t)

    special = _special_vocab(model_dir, len(tokens), load_merges=not byte_fallback)
    ids = special.special_token_ids
    chat = _chat_template(model_dir, special)
    if byte_fallback:
        # A SentencePiece BPE exported to tokenizer.json ('llama'). Its scores are gone; SentencePiece
        # BPE scores are minus the rank among normal pieces, which is vocab order, so rebuild them:
        # llama.cpp's SentencePiece tokenizer picks merges by score.
        unk_text = model.get("unk_token") or ((_read_json(model_dir / "tokenizer_config.json") or {})
                                              .get("unk_token"))
        unk_id = ids.get("unk", vocab.get(unk_text) if isinstance(unk_text, str) else None)
        if unk_id is not None:
            types[unk_id] = UNKNOWN
        scores, rank = [], 0
        for t in types:
            if t == NORMAL:
                scores.append(-float(rank))
                rank += 1
            else:
                scores.append(0.0 if t != UNUSED else -10000.0)
        return TokenizerMeta(
            model="llama", tokens=tokens, scores=scores, token_types=types, merges=[], pre="default",
            bos_id=ids.get("bos"), eos_id=ids.get("eos"), unk_id=unk_id, pad_id=ids.get("pad"),
            add_bos=special.add_special_token.get("bos", True),
            add_eos=special.add_special_token.get("eos", False), chat_template=chat,
            spm_prepend=_legacy_prepend(model_dir) or _json_prepend(tj))
    pre = _detect_pre(tj)
    return TokenizerMeta(
        model="gpt2", tokens=tokens, scores=[], token_types=types, merges=list(special.merges), pre=pre,
        bos_id=ids.get("bos"), eos_id=ids.get("eos"), unk_id=ids.get("unk"), pad_id=ids.get("pad"),
        add_bos=special.add_special_token.get("bos", pre in ("llama-bpe", "tekken")),   # as llama.cpp for these pres
        add_eos=special.add_special_token.get("eos", False), chat_template=chat)


def add_tokenizer_to_gguf(writer: gguf.GGUFWriter, meta: TokenizerMeta) -> None:
    """Write the tokenizer.ggml.* keys (and chat template) in llama.cpp's order and types."""
    meta.validate()
    writer.add_tokenizer_model(meta.model)
    if meta.pre is not None:
        writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    if meta.scores:
        writer.add_token_scores(meta.scores)
    writer.add_token_types(meta.token_types)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    for key, v in (("bos", meta.bos_id), ("eos", meta.eos_id), ("unk", meta.unk_id), ("pad", meta.pad_id)):
        if v is not None:
            getattr(writer, f"add_{key}_token_id")(v)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
    if meta.model == "llama" and meta.spm_prepend:
        writer.add_string(SPM_PREPEND_KEY, meta.spm_prepend)


def meta_from_gguf(reader: gguf.GGUFReader) -> TokenizerMeta:
    """Inverse of add_tokenizer_to_gguf, for a gguf.GGUFReader (used by tests and readers)."""
    K = gguf.Keys.Tokenizer
    f = reader.fields

    def val(key, default=None):
        return f[key].contents() if key in f else default

    return TokenizerMeta(
        model=val(K.MODEL), tokens=val(K.LIST, []), scores=[float(x) for x in val(K.SCORES, [])],
        token_types=[int(x) for x in val(K.TOKEN_TYPE, [])], merges=val(K.MERGES, []), pre=val(K.PRE),
        bos_id=val(K.BOS_ID), eos_id=val(K.EOS_ID), unk_id=val(K.UNK_ID), pad_id=val(K.PAD_ID),
        add_bos=bool(val(K.ADD_BOS, False)), add_eos=bool(val(K.ADD_EOS, False)), chat_template=val(K.CHAT_TEMPLATE),
        spm_prepend=val(SPM_PREPEND_KEY),
    )
