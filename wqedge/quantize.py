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
from .converters.gguf_writer import QuantizedHead, check_finite, dense_tensors, write_gguf
from .converters.tokenizer import read_tokenizer
from .head import head_actions, head_tensor, is_quantized
from .plan import Plan
from .quant.fit import fit_chunk, fit_linear
from .quant.neuqi import FAST_GRID as HEAD_GRID
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
                     device: str | None = None, fitted: dict[str, list[ChunkData]] | None = None,
                     ) -> Iterator[tuple[Linear, list[ChunkData]]]:
    """Each linear's chunks, in unit order: taken from `fitted` (e.g. error feedback) or fitted here.

    A pruning plan's linears lose their pruned rows and columns first (stats: diag(XᵀX) of the unpruned
    model, restricted to the kept input columns)."""
    for orig, lin in zip(ckpt.spec.linears(), plan.model_spec(ckpt.spec).linears()):
        if fitted is not None:
            yield lin, fitted[lin.hf_name]
            continue
        w = plan.prune_weight(lin.hf_name, ckpt.linear_weight(orig)).to(device or "cpu", torch.float32).contiguous()
        h = None if not stats else stats.get(lin.hf_name)
        cols = plan.kept_columns(lin.hf_name)
        if h is not None and cols is not None:
            h = h[cols.tolist()]
        yield lin, quantize_linear(w, plan, lin.hf_name, None if h is None else h.to(w.device, torch.float32))


def _dense_source(ckpt: LlamaCheckpoint):
    """The non-linear tensors as the writer stores them (dtype each) and a reader of their float32 data."""
    stored = np.dtype(np.float16) if ckpt.dtype == "float16" else np.dtype(np.float32)
    by_gguf = {g: hf for hf, g, _ in other_tensors(ckpt.spec)}

    def dense_data(gguf_name: str) -> np.ndarray:
        return ckpt.get(by_gguf[gguf_name]).to(torch.float32).numpy()
    return dense_tensors(ckpt.spec, lambda hf: stored), dense_data


def check_dense_finite(ckpt: LlamaCheckpoint) -> None:
    """ValueError naming the first non-linear tensor (embeddings, norms, output head) with NaN/Inf, as the
    writer would store it; cheap enough to run before a long planning job so that a damaged checkpoint
    fails at once rather than when the file is written."""
    dense, dense_data = _dense_source(ckpt)
    for d in dense:
        with np.errstate(over="ignore"):
            check_finite(d.gguf_name, dense_data(d.gguf_name).astype(d.dtype))


def quantized_head(ckpt: LlamaCheckpoint, plan: Plan, kind: str, device: str | None = None) -> QuantizedHead | None:
    """The output head as a quantized linear of block kind `kind` (wqedge.head; None for "fp16"), fitted from the
    weights alone with the method of the plan's linears (NeUQI, or min-max), NeUQI with its coarse scale search
    (FAST_GRID: on llama-s's head the same error as the full search, in a third of the time; a TinyLlama head is
    16x llama-s's). The head's input statistics are not gathered, which keeps conversion cost as it was
    (bench/results/head_quant.md)."""
    if not is_quantized(kind):
        return None
    spec = ckpt.spec
    hf, name = head_tensor(spec.tie_word_embeddings)
    V, D = spec.vocab_size, spec.hidden_size
    actions = head_actions(D, plan.group_size, kind)
    method = plan.tensors[0].methods[0]

    def chunks() -> list[ChunkData]:
        w = ckpt.get(hf).to(device or "cpu", torch.float32).contiguous()
        try:
            return fit_linear(w, actions, plan.group_size, method, neuqi_grid=HEAD_GRID)
        except ValueError as err:
            raise ValueError(f"{hf}: {err}") from None
    return QuantizedHead(name, V, D, actions, chunks)


def convert_to_gguf(ckpt: LlamaCheckpoint, plan: Plan, out_path: str | Path,
                    stats: dict[str, torch.Tensor] | None = None, device: str | None = None,
                    progress: Callable[[str], None] | None = None,
                    fitted: dict[str, list[ChunkData]] | None = None, transforms: dict | None = None,
                    head: str = "fp16") -> Path:
    """Quantize `ckpt` by `plan` and write our GGUF atomically to out_path.

    stats: diag(XᵀX) per linear weighting the NeUQI fits; fitted: chunks already fitted by the caller
    (error feedback, wqedge.quant.feedback), written as they are after checking them against the plan;
    transforms: a rotated plan's stored input transforms (wqedge.pipeline.rotated; ckpt then reads folded);
    head: how the output head is stored (wqedge.head.HEAD_KINDS; "fp16" keeps the checkpoint's dense tensor).
    """
    plan.validate(ckpt.spec, ckpt.fingerprint())
    dense, dense_data = _dense_source(ckpt)
    return write_gguf(out_path, plan.model_spec(ckpt.spec), plan, read_tokenizer(ckpt.path), dense, dense_data,
                      quantize_linears(ckpt, plan, stats, device, fitted), progress, transforms,
                      quantized_head(ckpt, plan, head, device))

