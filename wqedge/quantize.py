"""Apply a plan to a checkpoint: fit every chunk's quantizer and hand the result to the converter.

This is the planning side's last step (torch); it streams linear by linear so that only one
weight matrix is in memory at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .blocks import ChunkData
from .checkpoint import LlamaCheckpoint
from .converters.gguf_writer import dense_tensors, write_gguf
from .converters.tokenizer import read_tokenizer
from .plan import Plan
from .quant.fit import fit_chunk, fit_linear
from .spec import other_tensors
from .units import Linear, chunk_bounds


def quantize_linear(w: torch.Tensor, plan: Plan, name: str, h: torch.Tensor | None = None) -> list[ChunkData]:
    """Fit each chunk of one linear [N, K] as the plan says; h is diag(XᵀX) over K, or None.

    h is damped with the whole linear's mean (as NeUQI does, and as the allocators' damage table fits).
    """
    t = plan.tensor(name)
    try:
        if len(set(t.methods)) == 1:  # the usual case: one batched fit per action
            return fit_linear(w, t.actions, plan.group_size, t.methods[0], h, protected=t.protected)
        damp_mean = None if h is None else float(h.mean())
        return [fit_chunk(w[:, s:e], a, m, None if h is None else h[s:e], p or None, damp_mean=damp_mean)
                for (s, e), a, m, p in zip(chunk_bounds(t.in_features, plan.group_size), t.actions, t.methods,
                                           t.protected)]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def quantize_linears(ckpt: LlamaCheckpoint, plan: Plan, stats: dict[str, torch.Tensor] | None = None,
                     device: str | None = None) -> Iterator[tuple[Linear, list[ChunkData]]]:
    for lin in ckpt.spec.linears():
        w = ckpt.linear_weight(lin).to(device or "cpu", torch.float32)
        h = None if not stats else stats.get(lin.hf_name)
        yield lin, quantize_linear(w, plan, lin.hf_name, None if h is None else h.to(w.device, torch.float32))


def convert_to_gguf(ckpt: LlamaCheckpoint, plan: Plan, out_path: str | Path,
                    stats: dict[str, torch.Tensor] | None = None, device: str | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Quantize `ckpt` by `plan` and write our GGUF atomically to out_path."""
    plan.validate(ckpt.spec, ckpt.fingerprint())
    stored = np.dtype(np.float16) if ckpt.dtype == "float16" else np.dtype(np.float32)
    dense = dense_tensors(ckpt.spec, lambda hf: stored)
    by_gguf = {g: hf for hf, g, _ in other_tensors(ckpt.spec)}

    def dense_data(gguf_name: str) -> np.ndarray:
        t = ckpt.get(by_gguf[gguf_name])
        return t.to(torch.float32).numpy()

    return write_gguf(out_path, ckpt.spec, plan, read_tokenizer(ckpt.path), dense, dense_data,
                      quantize_linears(ckpt, plan, stats, device), progress)


def calibration_diag(ckpt: LlamaCheckpoint, text: str, n_seqs: int | None = None, seqlen: int | None = None,
                     device: str | None = None) -> dict[str, torch.Tensor]:
    """diag(XᵀX)/T of every decoder linear's input on calibration text (weights of the NeUQI fit)."""
    from transformers import AutoTokenizer

    from . import calib

    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    cs = calib.calibration_tokens(tok, text, n_seqs or calib.DEFAULT_N_SEQS, seqlen or calib.DEFAULT_SEQLEN,
                                  n_heldout=0, bos_id=ckpt.spec.bos_token_id)
    stats = calib.layerwise_stats(ckpt.load_hf_model(torch.float32), cs.train, device=device, full_xtx=False)
    return {name: s.diag.float() for name, s in stats.items()}
