"""Small random LLaMA checkpoints built on the spot, so that tests and `wqedge convert` need no download.

A tiny model is a real Hugging Face folder (config.json, safetensors, tokenizer files) in exactly the
layout a downloaded checkpoint has, so everything downstream (loader, converter, runtime) exercises the
same code paths as with a real model. Weights are random (HF init, seeded); the tokenizer is trained on
a deterministic synthetic text embedded here, so a build is reproducible byte for byte and takes seconds.
"""
from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

from wqedge.converters.tokenizer import LLAMA3_PRETOKENIZER_REGEX, TEKKEN_PRETOKENIZER_REGEX  # (imports no torch)

__all__ = ["build_tiny_model", "build_tiny_bpe_model", "build_speed_model", "tiny_corpus",
           "LLAMA3_PRETOKENIZER_REGEX", "DEFAULT_LLAMA3_SCALING", "SPEED_SHAPES", "SPM_CHAT_TEMPLATE",
           "BPE_CHAT_TEMPLATE", "TOKENIZER_FILES"]

# Small chat templates (Jinja, the language of tokenizer_config.json's "chat_template"), written by the
# builders into tokenizer_config.json, chat_template.jinja or chat_template.json (see `tokenizer_files`).
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")
BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start|>' + message['role'] + '\n' + message['content']"
    " + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}")

# How a builder lays out the tokenizer files:
#   "default"   SentencePiece: tokenizer.model + tokenizer_config.json (template inside);
#               BPE: tokenizer.json + tokenizer_config.json (template inside)
#   "json"      tokenizer.json + tokenizer_config.json without the template + chat_template.json
#               (SentencePiece: the tokenizer.json transformers derives from tokenizer.model; no .model file)
#   "json_only" tokenizer.json alone, plus chat_template.jinja (no tokenizer_config.json)
TOKENIZER_FILES = ("default", "json", "json_only")

# Used when rope_scaling="llama3" is passed without parameters (LLaMA 3.1's values, shorter context).
DEFAULT_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

_SEED_TEXT = """\
The quick brown fox jumps over the lazy dog. A model file is a list of tensors and a list of keys.
Quantization replaces each weight by a small integer code and a scale, so that the file is smaller
and the matrix product reads fewer bytes from memory. Every column chunk of a linear layer may use a
different number of bits: the important chunks keep eight bits, the others four, three or two.
To read the file, open it, check the magic number and the version, then walk the key/value pairs.
Numbers such as 3.14159, 2718, 0x1F and 1e-5 appear in code; so do names like hidden_size,
num_attention_heads and rope_theta. "Hello, world!" she said; (then) [nothing] {else} <happened>.
def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
for (int i = 0; i < n; ++i) { sum += w[i] * x[i]; }
Ünïcödé façade naïve café — résumé; 東京 北京; Ελληνικά; русский текст; emoji 🙂 ✓.
"""

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which not have has had "
    "model layer weight tensor column chunk scale zero bit byte file key value token vocab merge head "
    "attention query key value output gate up down norm embed rope theta base factor frequency position "
    "hidden size inter mediate vocab length batch sequence window perplexity error loss gradient matrix "
    "vector product sum mean variance float half integer signed unsigned array list string bool read "
    "write open close seek check load save convert quantize dequantize pack unpack run test build plan "
    "small large fast slow first last next previous every each some many few all none one two three "
    "four five six seven eight nine ten hundred thousand million time day year people world house water "
    "light music river mountain city language number program function return class import print while "
    "because however therefore although between through during without within about against under over"
).split()


def tiny_corpus(n_sentences: int = 3000) -> list[str]:
    """Deterministic training text: an embedded passage plus generated sentences.

    Generated pseudo-words (random syllables) give the BPE trainers enough distinct merges for
    vocabularies of a few thousand pieces; real words and code lines keep the pieces realistic.
    """
    rng = random.Random(1234)
    syll = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng", "st"]
    pseudo = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    lines = _SEED_TEXT.splitlines()
    for i in range(n_sentences):
        k = rng.randint(4, 14)
        words = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(pseudo) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), rng.choice(["x_1", "self.w", "a[i]", "f(x)", "i += 1",
                                                                 "==", "->", "::", "{}", "/* c */"]))
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ";", ":"])
        if i % 7 == 0:
            s = "    " + s
        lines.append(s)
        if i % 50 == 0:
            lines.extend(_SEED_TEXT.splitlines()[i // 50 % 12:][:2])
    return lines


@functools.lru_cache(maxsize=8)
def _train_sentencepiece(vocab_size: int) -> bytes:
    """A LLaMA-2 style SentencePiece BPE model (byte fallback; unk=0, bos=1, eos=2), serialized."""
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        _sp_train(spm, buf, vocab_size)
    except RuntimeError as e:
        # SentencePiece needs 3 specials + 256 byte pieces + every character of the corpus.
        raise ValueError(f"cannot train a SentencePiece tokenizer with vocab_size {vocab_size} on the "
                         f"built-in corpus (use >= 400): {e}") from e
    return buf.getvalue()


def _sp_train(spm, buf, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.9999, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )


def _write_sentencepiece_tokenizer(out_dir: Path, vocab_size: int, max_len: int,
                                   tokenizer_files: str = "default", legacy: bool = False) -> None:
    (out_dir / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_size))
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
           "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_files != "default":
        # What a checkpoint shipping only tokenizer.json holds: transformers' own export of the model.
        from transformers import AutoTokenizer
        text = AutoTokenizer.from_pretrained(out_dir).backend_tokenizer.to_str(pretty=True)
        (out_dir / "tokenizer.model").unlink()
        (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    _write_chat_template(out_dir, SPM_CHAT_TEMPLATE, tokenizer_files)


def _write_chat_template(out_dir: Path, template: str, tokenizer_files: str) -> None:
    cfg_path = out_dir / "tokenizer_config.json"
    if tokenizer_files == "default":
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    elif tokenizer_files == "json":
        (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    elif tokenizer_files == "json_only":
        cfg_path.unlink(missing_ok=True)
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        raise ValueError(f"tokenizer_files must be one of {TOKENIZER_FILES}, got {tokenizer_files!r}")


BPE_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>")
BPE_USER_TOKEN = "<tool_call>"   # an added, non-special token: llama.cpp types it USER_DEFINED


@functools.lru_cache(maxsize=8)
def _train_bytelevel_bpe(vocab_size: int, pretokenizer: str) -> str:
    """tokenizer.json text of a byte-level BPE (LLaMA 3 style: specials at the end of the vocab)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_added = len(BPE_SPECIAL_TOKENS) + 1
    if vocab_size - n_added < 256 + 16:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level BPE (need >= {256 + 16 + n_added})")
    split_regex = {"llama3": LLAMA3_PRETOKENIZER_REGEX, "tekken": TEKKEN_PRETOKENIZER_REGEX}.get(pretokenizer)
    tok = Tokenizer(models.BPE(ignore_merges=split_regex is not None))   # as both models' tokenizer.json
    if split_regex:   # a Split regex, then ByteLevel without its own
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif pretokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pretokenizer == "smollm":   # SmolLM's: every digit alone, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    else:
        raise ValueError(f"pretokenizer must be 'llama3', 'tekken', 'gpt2' or 'smollm', got {pretokenizer!r}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    base = tok.get_vocab_size()
    if base != vocab_size - n_added:
        raise ValueError(f"byte-level BPE training produced {base} tokens, wanted {vocab_size - n_added}: "
                         f"vocab_size {vocab_size} is too large for the built-in corpus")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BPE_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(BPE_USER_TOKEN, special=False, normalized=False)])
    bos = BPE_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, base)])
    return tok.to_str(pretty=True)


def _write_bpe_tokenizer(out_dir: Path, vocab_size: int, pretokenizer: str, max_len: int,
                         tokenizer_files: str = "default") -> tuple[int, int]:
    text = _train_bytelevel_bpe(vocab_size, pretokenizer)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    added = {t["content"]: t for t in json.loads(text)["added_tokens"]}
    bos, eos = (added[t]["id"] for t in BPE_SPECIAL_TOKENS)
    decoder = {str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": t["special"]} for t in added.values()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BPE_SPECIAL_TOKENS[0],
           "eos_token": BPE_SPECIAL_TOKENS[1], "added_tokens_decoder": decoder, "model_max_length": max_len,
           "clean_up_tokenization_spaces": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _write_chat_template(out_dir, BPE_CHAT_TEMPLATE, tokenizer_files)
    return bos, eos


def _normalize_scaling(rope_scaling) -> dict | None:
    if rope_scaling is None:
        return None
    if rope_scaling == "llama3":
        return dict(DEFAULT_LLAMA3_SCALING)
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
        d = dict(DEFAULT_LLAMA3_SCALING)
        d.update({k: v for k, v in rope_scaling.items() if k != "type"})
        return d
    raise ValueError(f"rope_scaling must be None, 'llama3' or a llama3 dict, got {rope_scaling!r}")


def _write_weights_and_config(out_dir: Path, *, hidden, n_layers, n_heads, n_kv_heads, intermediate, vocab_size,
                              tie_embeddings, dtype, shards, rope_form, rope_scaling, rope_theta,
                              max_position_embeddings, bos_id, eos_id, seed, init="hf") -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if rope_form not in ("tf5", "tf4"):
        raise ValueError(f"rope_form must be 'tf5' or 'tf4', got {rope_form!r}")
    if hidden % n_heads or n_heads % n_kv_heads:
        raise ValueError("hidden must be divisible by n_heads and n_heads by n_kv_heads")
    scaling = _normalize_scaling(rope_scaling)
    rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if scaling:
        rope_parameters = {**scaling, "rope_theta": float(rope_theta)}
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=hidden // n_heads, intermediate_size=intermediate, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, tie_word_embeddings=tie_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, rope_parameters=rope_parameters,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    if init == "hf":
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
        state = model.state_dict()
    elif init == "normal":
        state = _normal_init(LlamaForCausalLM, config, torch_dtype, seed)
    else:
        raise ValueError(f"init must be 'hf' or 'normal', got {init!r}")
    config.dtype = dtype
    cfg = json.loads(config.to_json_string(use_diff=True))     # what save_pretrained writes
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    # Written by hand rather than with save_pretrained so the shard count is exact and the
    # tied head is dropped explicitly (as save_pretrained does); HF order: embed, layers, norm, head.
    tensors = {k: v.detach().contiguous() for k, v in state.items()
               if not (tie_embeddings and k == "lm_head.weight")}
    order = list(tensors)
    if shards <= 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        if shards > len(order):
            raise ValueError(f"cannot split {len(order)} tensors into {shards} shards")
        sizes = [tensors[k].numel() * tensors[k].element_size() for k in order]
        total = sum(sizes)
        # Balance bytes; fall back to equal tensor counts if one big tensor would leave a shard empty.
        groups: list[list[str]] = [[] for _ in range(shards)]
        acc = 0
        for k, sz in zip(order, sizes):
            groups[min(shards - 1, acc * shards // total)].append(k)
            acc += sz
        if not all(groups):
            step = -(-len(order) // shards)
            groups = [order[j * step:(j + 1) * step] for j in range(shards)]
            if not all(groups):
                groups = [order[j::shards] for j in range(shards)]
        weight_map = {}
        for j, names in enumerate(groups):
            fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in names}, out_dir / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # config.json is written last: its presence marks a complete build.
    cfg_path = out_dir / "config.json"
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    if rope_form == "tf5":
        cfg["rope_parameters"] = rope_parameters
        cfg["dtype"] = dtype
    else:   # as transformers 4 (>= 4.43) wrote it
        cfg.pop("rope_parameters", None)
        cfg.pop("dtype", None)
        cfg["rope_theta"] = float(rope_theta)
        cfg["rope_scaling"] = scaling
        cfg["torch_dtype"] = dtype
        cfg["transformers_version"] = "4.46.3"
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def _normal_init(model_cls, config, torch_dtype, seed: int) -> dict:
    """State dict drawn directly in the target dtype (N(0, 0.02) matrices, unit norms): no fp32 model is
    ever built, so a billion-parameter checkpoint costs its fp16 bytes in memory, not three times that."""
    import torch
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        out[k] = torch.ones(shape, dtype=torch_dtype) if len(shape) == 1 else _randn_rows(shape, g, torch_dtype)
    return out


def _randn_rows(shape, g, torch_dtype):
    """A large N(0, 0.02) matrix filled in row blocks, so the float32 scratch stays small."""
    import torch
    t = torch.empty(shape, dtype=torch_dtype)
    step = max(1, (1 << 22) // shape[1])
    for i in range(0, shape[0], step):
        t[i:i + step] = torch.randn((min(step, shape[0] - i), shape[1]), generator=g).mul_(0.02)
    return t


_OUR_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*-of-*.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _prepare(out_dir) -> Path:
    """Create out_dir; remove only files a previous build wrote there (never anything else)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _OUR_FILES:
        for f in out.glob(pattern):
            f.unlink()
    return out


def build_tiny_model(out_dir, *, hidden: int = 128, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                     intermediate: int = 352, vocab_size: int = 512, tie_embeddings: bool = False,
                     dtype: str = "float16", shards: int = 1, rope_form: str = "tf5", rope_scaling=None,
                     seed: int = 0, rope_theta: float = 10000.0, max_position_embeddings: int = 2048,
                     tokenizer_vocab: int | None = None, init: str = "hf",
                     tokenizer_files: str = "default", legacy: bool = False) -> Path:
    """Write a random-init LlamaForCausalLM with a trained SentencePiece tokenizer to `out_dir`.

    Files of an earlier build in out_dir are replaced; other files are left alone. `rope_form`
    chooses how config.json spells RoPE: 'tf5' (`rope_parameters`) or 'tf4' (top-level
    `rope_theta` / `rope_scaling`); `rope_scaling` is None,
    'llama3' (DEFAULT_LLAMA3_SCALING) or a llama3 dict. `shards` > 1 writes exactly that many
    safetensors shards plus model.safetensors.index.json. Same arguments -> same bytes.
    config.json is written last, so its presence means the build completed.
    `tokenizer_vocab` (< vocab_size) trains a smaller SentencePiece model for a large-vocab shape (the
    built-in corpus cannot fill 32k pieces; converters pad the vocabulary to vocab_size). `init="normal"`
    draws weights directly in `dtype` (see _normal_init) instead of transformers' fp32 init.
    `tokenizer_files` (TOKENIZER_FILES) chooses the tokenizer files and where SPM_CHAT_TEMPLATE goes.
    `legacy` is tokenizer_config.json's "legacy" (True as in Mistral's: "▁" also after special tokens).
    """
    sp_vocab = tokenizer_vocab or vocab_size
    if sp_vocab > vocab_size:
        raise ValueError(f"tokenizer_vocab {sp_vocab} exceeds vocab_size {vocab_size}")
    _train_sentencepiece(sp_vocab)            # fail on a bad vocab_size before writing anything
    if tokenizer_files not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer_files must be one of {TOKENIZER_FILES}, got {tokenizer_files!r}")
    out = _prepare(out_dir)
    _write_sentencepiece_tokenizer(out, sp_vocab, max_position_embeddings, tokenizer_files, legacy)
    _write_weights_and_config(out, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                              intermediate=intermediate, vocab_size=vocab_size, tie_embeddings=tie_embeddings,
                              dtype=dtype, shards=shards, rope_form=rope_form, rope_scaling=rope_scaling,
                              rope_theta=rope_theta, max_position_embeddings=max_position_embeddings,
                              bos_id=1, eos_id=2, seed=seed, init=init)
    return out


# Real models' shapes, for speed benchmarks on random weights (speed does not depend on the values).
SPEED_SHAPES = {
    "tinyllama-1.1b": dict(hidden=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate=5632, vocab_size=32000,
                           tie_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048),
    "llama-3.2-1b": dict(hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate=8192, vocab_size=128256,
                         tie_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def build_speed_model(out_dir, shape: str = "tinyllama-1.1b", seed: int = 0, shards: int = 4) -> Path:
    """A random-weight fp16 checkpoint with the shape of a real ~1B model (SPEED_SHAPES), written with
    init="normal" and a 1000-piece tokenizer padded to the model's vocabulary: no download, ~2.2 GB, and
    peak memory about the checkpoint's size."""
    if shape not in SPEED_SHAPES:
        raise ValueError(f"unknown speed-model shape {shape!r} (known: {', '.join(SPEED_SHAPES)})")
    return build_tiny_model(out_dir, **SPEED_SHAPES[shape], dtype="float16", shards=shards, seed=seed,
                            tokenizer_vocab=1000, init="normal")


def build_tiny_bpe_model(out_dir, *, vocab_size: int = 512, pretokenizer: str = "gpt2",
                         tokenizer_files: str = "default", **kwargs) -> Path:
    """Same as build_tiny_model but with a byte-level BPE tokenizer (tokenizer.json, LLaMA 3 layout).

    The vocab ends with the specials <|begin_of_text|> (BOS, added by the post-processor) and
    <|end_of_text|> (EOS), then one non-special added token, <tool_call>. `pretokenizer` is
    'gpt2' (plain ByteLevel with GPT-2's regex; llama.cpp pre 'gpt-2', the one wqedge's C++
    tokenizer implements) or 'llama3' (LLaMA 3's split regex; llama.cpp pre 'llama-bpe') or 'tekken'
    (Mistral NeMo's split regex; llama.cpp pre 'tekken') or 'smollm' (SmolLM's individual digits +
    GPT-2's regex; llama.cpp pre 'smollm'). `tokenizer_files`
    (TOKENIZER_FILES) chooses the files and where BPE_CHAT_TEMPLATE goes.
    Other keyword arguments are those of build_tiny_model.
    """
    defaults = dict(hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=352, tie_embeddings=False,
                    dtype="float16", shards=1, rope_form="tf5", rope_scaling=None, seed=0, rope_theta=10000.0,
                    max_position_embeddings=2048)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"build_tiny_bpe_model got unexpected arguments {sorted(unknown)}")
    _train_bytelevel_bpe(vocab_size, pretokenizer)
    if tokenizer_files not in TOKENIZER_FILES:
        raise ValueError(f"tokenizer_files must be one of {TOKENIZER_FILES}, got {tokenizer_files!r}")
    out = _prepare(out_dir)
    max_len = kwargs.get("max_position_embeddings", 2048)
    bos, eos = _write_bpe_tokenizer(out, vocab_size, pretokenizer, max_len, tokenizer_files)
    _write_weights_and_config(out, **{**defaults, **kwargs}, vocab_size=vocab_size, bos_id=bos, eos_id=eos)
    return out
