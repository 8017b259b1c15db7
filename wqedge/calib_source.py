"""Calibration text when the user gives none: text the model writes itself.

Without calibration the planner can only price weights by their own error (uniform plans, NeUQI with
uniform weights), and a real checkpoint can lose a lot at 3-4 bits that way (issue 13). Data-free
calibration in the manner of LLM-QAT: sample sequences from the original model (seeded, temperature 1,
top-k 40, started from BOS) and use them as calibration text. The model's own samples follow the
distribution of its activations on real text well enough for diag(XᵀX), gradients and error feedback,
and nothing is downloaded or shipped. bench/calib_source.py measures it against no calibration and
against real text (bench/results/calib_source.md).

The same sampler gives the quality check (wqedge.quality) its data-free text, with another seed so
that the check does not score the model on what it was calibrated with.
"""
from __future__ import annotations

import inspect
import sys
import time
from typing import Callable

import torch

DEFAULT_SEQS = 32          # sequences sampled side by side
DEFAULT_LENGTH = 256       # tokens per sequence (BOS included): 8k calibration tokens in all
CALIBRATION_SEED = 1234    # the quality check samples with seed 0: disjoint texts
SMALL_MODEL_PARAMS = 3e8   # below this, sampling runs on one thread (OpenMP threads idle-spin on tiny steps)


def sample_tokens(model, bos: int | None, n_seqs: int, length: int, seed: int) -> torch.Tensor:
    """[n_seqs, length] token ids sampled from `model` (temperature 1, top-k 40), seeded, all sequences
    generated side by side; row 0 of each is BOS (or 0 when the model has none)."""
    from transformers import DynamicCache

    length = max(8, int(length))
    dev = next(model.parameters()).device
    out = torch.full((n_seqs, length), bos if bos is not None else 0, dtype=torch.long, device=dev)
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)   # a decode step of a small model is too short to share: threads only wait
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    try:
        # a plain KV-cached loop: ~1.7x faster than model.generate for these small batched steps (llama-s).
        # Newer transformers (5.25 here) name the cache argument `cache` and deprecate past_key_values (5.17 has only it)
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            cache, tok = DynamicCache(), out[:, :1]
            for i in range(1, length):
                logits = model(input_ids=tok, use_cache=True, **{key: cache}).logits[:, -1].float()
                top, idx = logits.topk(min(40, logits.shape[-1]), dim=-1)
                tok = idx.gather(1, torch.multinomial(torch.softmax(top, -1), 1, generator=gen))
                out[:, i:i + 1] = tok
    finally:
        torch.set_num_threads(threads)
    return out


def self_generated_text(ckpt, n_seqs: int = DEFAULT_SEQS, length: int = DEFAULT_LENGTH, seed: int = CALIBRATION_SEED,
                        progress: Callable[[str], None] | bool | None = True, device=None) -> str:
    """Calibration text sampled from the checkpoint itself: n_seqs sequences of `length` tokens, decoded to
    text and separated by blank lines (the calibration pipeline re-tokenizes text). `device`: where the model
    samples (a CUDA device when planning runs there; default the CPU)."""
    from transformers import AutoTokenizer

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress is True else (progress or (lambda m: None))
    t0 = time.time()
    say(f"no calibration text given: sampling {n_seqs} x {length} tokens from the model itself "
        "(data-free calibration; give --calib FILE to use real text)…")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = ckpt.load_hf_model(torch.float32, device=dev)
    ids = sample_tokens(model, ckpt.spec.bos_token_id, n_seqs, length, seed).cpu()
    del model
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    texts = [tok.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in ids]
    text = "\n\n".join(t for t in texts if t)
    say(f"sampled {ids.numel()} tokens in {time.time() - t0:.1f} s")
    if not text.strip():
        raise ValueError("the model's own samples decode to empty text; give calibration text (--calib FILE)")
    return text


def resolve_calibration(ckpt, text: str | None, self_calib: bool | None = None,
                        say: Callable[[str], None] | bool | None = True, device=None) -> tuple[str | None, str]:
    """The calibration text a conversion uses and where it came from: (text, "file") when the user gave
    text; else, unless self_calib is False, (self-generated text, "self"); else (None, "none")."""
    if text is not None:
        return text, "file"
    if self_calib is False:
        return None, "none"
    return self_generated_text(ckpt, progress=say, device=device), "self"
