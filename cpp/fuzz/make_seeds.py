"""Write the fuzzers' seed inputs from tiny models, at run time (nothing large is committed).

    python3 cpp/fuzz/make_seeds.py OUT_DIR

OUT_DIR/corpus/gguf_file/    whole tiny wqedge files (mixed block types and protected columns; tied F32
                             embeddings with llama3 RoPE scaling; SentencePiece and byte-level BPE
                             tokenizers) plus the reproducers of ../shared/findings when present
OUT_DIR/corpus/gguf_header/  the header region (everything before the tensor data) of base.gguf
OUT_DIR/base.data            base.gguf's data section (fuzz_gguf_header appends it to every input)
OUT_DIR/vocab_*.gguf         models whose vocabularies fuzz_tokenizer uses: the fixture llama-s
                             SentencePiece vocabulary (32000 pieces) when present, tiny SentencePiece
                             and byte-level BPE (GPT-2, LLaMA-3 and Tekken pre-tokenizers) ones trained here
Needs the wqedge package (numpy, gguf; sentencepiece and tokenizers to train the vocabularies).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def _tokenizer_meta(kind: str, work: Path, vocab: int):
    from wqedge.converters.tokenizer import read_tokenizer
    from wqedge.tinymodel import build_tiny_bpe_model, build_tiny_model
    d = work / kind
    if kind == "spm":
        build_tiny_model(d, hidden=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate=32, vocab_size=vocab)
    else:
        build_tiny_bpe_model(d, vocab_size=vocab, pretokenizer=kind.split("-")[1], hidden=32, n_layers=1, n_heads=2,
                             n_kv_heads=1, intermediate=32)
    return read_tokenizer(d, vocab)


def main(out: Path) -> None:
    import gguf
    import numpy as np

    from cpp_support import write_tiny

    out.mkdir(parents=True, exist_ok=True)
    files = out / "corpus" / "gguf_file"
    header = out / "corpus" / "gguf_header"
    for d in (files, header):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    small = dict(D=32, layers=1, H=2, KV=1, hd=16, F=48, G=32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toks = {"spm": _tokenizer_meta("spm", work, 400), "bpe-gpt2": _tokenizer_meta("bpe-gpt2", work, 400),
                "bpe-llama3": _tokenizer_meta("bpe-llama3", work, 400),
                "bpe-tekken": _tokenizer_meta("bpe-tekken", work, 400)}
        write_tiny(files / "mixed.gguf", **small, V=64)
        write_tiny(files / "mixed-ragged.gguf", D=48, layers=1, H=3, KV=1, hd=16, F=80, G=32, V=40, seed=1)
        write_tiny(files / "tied-f32-llama3.gguf", **small, V=48, tied=True, emb_dtype=np.float32, seed=2,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        for kind, tok in toks.items():
            V = len(tok.tokens)
            write_tiny(files / f"{kind}.gguf", **small, V=V, tied=True, tokenizer=tok, seed=3)
            shutil.copyfile(files / f"{kind}.gguf", out / f"vocab_{kind}.gguf")
        fixture = Path(os.environ.get("WQEDGE_FIXTURES", REPO.parent / "shared" / "fixtures")) / "llama-s"
        if (fixture / "tokenizer.model").is_file():
            from wqedge.converters.tokenizer import read_tokenizer
            tok = read_tokenizer(fixture)
            write_tiny(out / "vocab_llama-s.gguf", D=16, layers=1, H=1, KV=1, hd=16, F=16, G=32, V=len(tok.tokens),
                       tied=True, tokenizer=tok, seed=4)
    findings = REPO.parent / "shared" / "findings"
    for f in sorted(findings.glob("*.gguf")) if findings.is_dir() else []:
        if f.stat().st_size < 200_000:  # large seeds slow every mutation down
            shutil.copyfile(f, files / f"finding-{f.name}")
    # Header seed: base = the SentencePiece model (its header holds a tokenizer and every key kind).
    base = files / "spm.gguf"
    raw = base.read_bytes()
    start = gguf.GGUFReader(base).data_offset
    assert start % 32 == 0
    (header / "spm.header").write_bytes(raw[:start])
    (out / "base.data").write_bytes(raw[start:])
    print(f"seeds in {out}: {len(list(files.iterdir()))} files, header {start} bytes, "
          f"vocabularies {sorted(p.name for p in out.glob('vocab_*.gguf'))}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
