"""Error-feedback conversion of a whole model: the sequential loop around wqedge.quant.gptq.

`quantize_model(model, plan, tokens)` runs wqedge.calib.layerwise_stats with an on_layer hook that
replaces each decoder layer's linears by their error-feedback quantization (wqedge.quant.gptq.gptq_linear),
computed from inputs that already went through the quantized earlier layers; it returns every linear's
blocks.ChunkData, exactly what the converter packs, so a plan lowered this way is bit-exact with what
`quantize_model` measured. `quantize_checkpoint` does the same from a checkpoint and calibration text.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .. import distributed
from ..blocks import ChunkData
from .gptq import DAMP, dequantize, gptq_linear, gptq_linears
from ..units import chunk_bounds

__all__ = ["DAMP", "FEEDBACK_SEQS", "FEEDBACK_SEQS_CPU", "feedback_windows", "dequantize", "gptq_linear",
           "gptq_linears", "input_groups", "quantize_checkpoint", "quantize_model"]
# Calibration windows (of 512 tokens) the feedback loop runs, by planning device. On a GPU the loop is
# launch-bound and 256 cost what 32 do; on CPU cores its two forward passes per layer over them are most of a
# conversion. llama-s, eval.txt, 32 windows (bench/results/feedback_windows.md): 32/64/128/256 windows gave
# 6.462/6.456/6.433/6.438 at 3.25 bits and 6.841/6.878/6.837/6.822 at 2.5 bits (differences of 0.3-0.5% are
# within the run-to-run spread of the plans' files).
FEEDBACK_SEQS = 256
FEEDBACK_SEQS_CPU = 32   # as good as 64 in that run; the 2-core conversion of llama-s then fits in ~90 s
FIT_THREADS = 2          # a layer's groups fitted at once on CPU (quantize_model)


def feedback_windows(device=None) -> int:
    """The default window count of error feedback on `device` (FEEDBACK_SEQS on CUDA, else FEEDBACK_SEQS_CPU)."""
    from ..calib import default_device
    return FEEDBACK_SEQS if default_device(device).type == "cuda" else FEEDBACK_SEQS_CPU


def input_groups(stats: dict, plan, batch: bool = True) -> list[list[str]]:
    """The layer's linears in groups that error feedback quantizes in one column loop (gptq_linears): those that
    read one input (one InputStats object: q/k/v, gate/up) and keep the same input columns; each alone when
    `batch` is False."""
    groups: dict = {}
    for name, st in stats.items():
        cols = plan.kept_columns(name)
        key = (id(st), None if cols is None else tuple(int(c) for c in cols)) if batch else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def quantize_model(model, plan, tokens: torch.Tensor, device=None, batch_size: int = 4, feedback: bool = True,
                   act_order: str | None = "chunk", damp: float = DAMP, refit: bool = True,
                   progress: Callable[[str], None] | None = None,
                   batch_linears: bool = True, store=None, checkpoints=None) -> dict[str, list[ChunkData]]:
    """Quantize every decoder linear of an HF model in place by `plan`, layer by layer, with the quantized
    earlier layers in the loop. feedback=False fits each chunk alone (fit_chunk with diag(XᵀX), as
    wqedge.quantize does) but still on sequential statistics. batch_linears: the linears that share an input run
    one error-feedback column loop (`input_groups`; False: one loop per linear, the same result up to float
    summation order). Returns {hf_name: [ChunkData per chunk]}, in `store` when given (a mapping, e.g.
    wqedge.stream.ChunkSpill: each linear's chunks go there when fitted). `model` may be a
    wqedge.stream.StreamedModel: each layer is then read from disk for its turn and dropped after it.
    checkpoints: a wqedge.resume.StatsCheckpoints keyed by this conversion's inputs: each layer's fitted chunks are
    saved there (`fits-L`), and a layer found there is loaded instead of fitted (no statistics gathered for it)."""
    from ..calib import layerwise_stats
    from ..quant.fit import fit_chunk

    result = {} if store is None else store
    t0 = time.time()
    n_layers = len(model.model.layers)

    def fit_group(layer, stats, names):
        """The fitted chunks of one group of linears that share an input (one gptq_linears column loop)."""
        ts = [plan.tensor(n) for n in names]
        mods = [layer.get_submodule(n.split(".", 3)[3][: -len(".weight")]) for n in names]
        # a pruning plan: the kept rows and columns are fitted, the pruned ones become zeros in the model
        ws = [plan.prune_weight(n, m.weight.data.float()) for n, m in zip(names, mods)]
        st = stats[names[0]]
        cols = plan.kept_columns(names[0])
        diag = st.diag if cols is None else st.diag[cols]
        if feedback:
            xtx = st.xtx if cols is None else st.xtx[cols][:, cols]
            return gptq_linears(ws, xtx.to(ws[0].device), [t.actions for t in ts], plan.group_size,
                                [t.methods for t in ts], [t.protected for t in ts], hdiag=diag,
                                act_order=act_order, damp=damp, refit=refit)
        return [[fit_chunk(w[:, s:e], a, m, diag[s:e].float(), p or None)
                 for (s, e), a, m, p in zip(chunk_bounds(t.in_features, plan.group_size), t.actions,
                                            t.methods, t.protected)] for w, t in zip(ws, ts)]

    ck = checkpoints

    def apply(layer, name, chunks):
        mod = layer.get_submodule(name.split(".", 3)[3][: -len(".weight")])
        result[name] = chunks
        deq = plan.unprune_weight(name, dequantize(chunks).to(mod.weight.device), tuple(mod.weight.shape))
        mod.weight.data.copy_(deq.to(mod.weight.dtype))

    def on_layer(li, layer, stats):
        if ck is not None and ck.has(f"fits-{li}"):      # resumed: this layer was fitted by an earlier run
            for name, chunks in ck.load(f"fits-{li}").items():
                apply(layer, name, chunks)
            if progress:
                progress(f"error feedback: layer {li + 1}/{n_layers} loaded from its checkpoint")
            return True
        groups = input_groups(stats, plan, batch_linears)
        # --distributed: each group fitted by its owner rank (every rank has the same statistics and weights, so the
        # same chunks as one process), then handed to all: each rank's model needs every quantized weight
        owner = distributed.owners([sum(plan.tensor(n).out_features for n in g) * plan.tensor(g[0]).in_features
                                    for g in groups])
        mine = [k for k in range(len(groups)) if owner is None or owner[k] == distributed.rank()]
        fits = [None] * len(groups)
        # the groups are independent; two at a time keep both cores busy through each one's single-threaded steps
        # (the column loop, small torch ops) on CPU; their results do not depend on the order
        with ThreadPoolExecutor(FIT_THREADS if next(layer.parameters()).device.type == "cpu" else 1) as ex:
            for k, f in zip(mine, ex.map(lambda k: fit_group(layer, stats, groups[k]), mine)):
                fits[k] = f
        layer_fits = {}
        for k, names in enumerate(groups):
            fitted = fits[k] if owner is None else distributed.broadcast_object(fits[k], owner[k])
            for name, chunks in zip(names, fitted):
                apply(layer, name, chunks)
                layer_fits[name] = chunks
        if ck is not None:
            ck.save(f"fits-{li}", layer_fits)
        if progress:
            progress(f"error feedback: layer {li + 1}/{n_layers} fitted ({time.time() - t0:.0f} s)")
        return True

    layerwise_stats(model, tokens, device=device, batch_size=batch_size, full_xtx=feedback, on_layer=on_layer,
                    keep=False, skip=None if ck is None else (lambda li: ck.has(f"fits-{li}")))
    return result


def quantize_checkpoint(ckpt, plan, calib_text, device=None, n_seqs: int = FEEDBACK_SEQS, seqlen: int = 512,
                        act_order: str | None = "chunk", damp: float = DAMP, seed: int = 0,
                        progress: Callable[[str], None] | None = None,
                        stream: bool | None = None, resume_dir=None) -> dict[str, list[ChunkData]]:
    """Every decoder linear of `ckpt` quantized by `plan` with error feedback (the planner's recommended
    conversion): {hf_name: [ChunkData per chunk]}, ready for the GGUF writer, kept on disk (a wqedge.stream.ChunkSpill:
    a 1.1B model's codes alone are 1 GB as uint8) until the writer reads them one linear at a time. stream: read the
    model one layer at a time from its files instead of holding it whole; None = when the model does not fit the
    device (wqedge.stream.wants_streaming). resume_dir: keep each layer's fitted chunks there and resume from them
    (wqedge.resume; the key holds the plan, the windows and the fit settings)."""
    from transformers import AutoTokenizer

    from ..calib import calibration_tokens, default_device
    from ..stream import ChunkSpill, StreamedModel, planning_model
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, n_seqs, seqlen, 0, bos_id=bos, seed=seed)
    model = planning_model(ckpt, default_device(device), stream)
    if isinstance(model, StreamedModel) and progress:
        progress("error feedback: streaming decoder layers from the checkpoint's files")
    ck = None
    if resume_dir is not None:
        from ..resume import StatsCheckpoints, tokens_digest
        what = {k: v for k, v in plan.to_dict().items() if k != "meta"}
        # the fit settings, not whether distillation follows (it starts from these fits, whatever it does)
        fit = {k: v for k, v in (plan.meta.get("fit") or {}).items() if not k.startswith("distill")}
        ck = StatsCheckpoints(resume_dir, {"stage": "error feedback", "model": ckpt.fingerprint(),
                                           "windows": tokens_digest(cs.train), "plan": what, "fit": fit,
                                           "act_order": act_order, "damp": damp}, progress)
    return quantize_model(model, plan, cs.train, device=device, act_order=act_order, damp=damp, progress=progress,
                          store=ChunkSpill(), checkpoints=ck)
