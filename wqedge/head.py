"""How the output head is stored (docs/format.md, "Output head"): dense as in the checkpoint, or quantized.

The head reads V x D weights per decoded token (TinyLlama: 131 MB of 646 MB at q4), so storing it as a quantized
linear in the decoder linears' row-block layout cuts the bytes per token without new kernels. A tied head is
the embedding table: then `token_embd.weight` itself is the quantized tensor (no `output.weight`), the runtime
dequantizes one row per looked-up token, and the file holds one copy. The head is not part of the plan and not
counted in the effective bits.
"""
from __future__ import annotations

from .blocks import block_type
from .units import chunk_bounds

HEAD_KINDS = ("fp16", "q8", "q4")   # fp16: the checkpoint's dense tensor (F16, or F32), as before issue 12's head


def check_head(kind: str) -> str:
    """The head kind, or ValueError naming the known ones."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown output head kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
    return kind


def is_quantized(kind: str) -> bool:
    return check_head(kind) != "fp16"


def head_tensor(tied: bool) -> tuple[str, str]:
    """(Hugging Face name, GGUF name) of the tensor that holds the head: the embedding table when tied."""
    return ("model.embed_tokens.weight", "token_embd.weight") if tied else ("lm_head.weight", "output.weight")


def head_actions(in_features: int, group_size: int, kind: str) -> list[str]:
    """One action per chunk of the head's rows (the same kind everywhere, no protected columns)."""
    if not is_quantized(kind):
        raise ValueError("an fp16 head is a dense tensor, not chunks")
    return [block_type(kind).name] * len(chunk_bounds(in_features, group_size))
