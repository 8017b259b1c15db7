"""The quality guard of `convert`: how far the written file's model is from the original, measured at once.

A conversion that silently produces a broken model (a 27x perplexity was once written without a word) is
the worst outcome for a user. After writing, the original model and the file's dequantized model (the
PyTorch reference) are run on the same few hundred tokens: the calibration text when one was given, else
text the original model writes itself (sampled, seeded), so the check needs no data. Reported: the
perplexity of both on those tokens, the mean KL divergence KL(original || quantized) per token and the
top-1 agreement; `is_bad` applies thresholds that separate "a few percent" from "broken".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .calib_source import sample_tokens
from .checkpoint import LlamaCheckpoint
from .kl import token_kl
from .reference import load_reference

# A model whose perplexity rises by more than this factor, or whose mean KL per token exceeds MAX_KL nats,
# is reported as damaged: q4 on the fixture costs ~2% perplexity and ~0.02 nats; the q3-everywhere file of
# the ragged checkpoint in issue 13 was 27x.
MAX_PPL_RATIO = 1.25
MAX_KL = 0.25
DEFAULT_TOKENS = 256
MAX_PARAMS_DEFAULT = 1.5e9   # two float32 copies of the model are held; above this the check is opt-in


@dataclass
class QualityReport:
    n_tokens: int
    source: str              # "calibration text" or "self-generated text"
    ppl_original: float
    ppl_quantized: float
    kl: float                # mean KL(original || quantized) per token, nats
    top1: float              # fraction of positions where both models' argmax agree

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_quantized / self.ppl_original

    @property
    def is_bad(self) -> bool:
        return not (np.isfinite(self.ppl_ratio) and np.isfinite(self.kl)) or self.ppl_ratio > MAX_PPL_RATIO \
            or self.kl > MAX_KL

    def summary(self) -> str:
        return (f"quality check on {self.n_tokens} tokens of {self.source}: perplexity {self.ppl_original:.3f} -> "
                f"{self.ppl_quantized:.3f} ({100 * (self.ppl_ratio - 1):+.1f}%), KL {self.kl:.4f} nats/token, "
                f"top-1 agreement {100 * self.top1:.1f}%")


def _tokens_from_text(ckpt: LlamaCheckpoint, text: str, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    ids = tok(text[: 64 * n], add_special_tokens=False)["input_ids"][: n - 1]
    bos = ckpt.spec.bos_token_id
    return torch.tensor([([bos] if bos is not None else []) + list(ids)], dtype=torch.long)


def check_quality(ckpt: LlamaCheckpoint, gguf_path, text: str | None = None, n_tokens: int = DEFAULT_TOKENS,
                  seed: int = 0) -> QualityReport:
    """Compare the original checkpoint with the written file's model on n_tokens tokens (see module doc)."""
    original = ckpt.load_hf_model(torch.float32)
    n = max(8, min(n_tokens, ckpt.spec.max_position_embeddings))
    if text and text.strip():
        ids, source = _tokens_from_text(ckpt, text, n), "calibration text"
    else:
        batch = 4   # a quarter of the sequential steps
        ids = sample_tokens(original, ckpt.spec.bos_token_id, batch, max(8, n // batch), seed)
        source = "self-generated text"
    with torch.inference_mode():
        lp_o = torch.log_softmax(original(ids).logits.double(), -1)      # [B, T, V]
        del original
        quantized = load_reference(gguf_path)
        lp_q = torch.log_softmax(quantized(ids).logits.double(), -1)
    tgt = ids[:, 1:, None]
    nll_o = -lp_o[:, :-1].gather(2, tgt).mean()
    nll_q = -lp_q[:, :-1].gather(2, tgt).mean()
    kl = token_kl(lp_o.numpy(), lp_q.numpy()).mean()
    top1 = (lp_o.argmax(-1) == lp_q.argmax(-1)).double().mean()
    return QualityReport(int(ids.numel()), source, float(nll_o.exp()), float(nll_q.exp()), float(kl), float(top1))
