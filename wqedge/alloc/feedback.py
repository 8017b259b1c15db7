"""Error feedback inside a linear (GPTQ/LDLQ-style) for mixed per-chunk actions, and the sequential loop.

`gptq_linear(w, xtx, actions, group_size, method)` quantizes one linear W[N, K] chunk by chunk, left to
right: each chunk's quantizer parameters are fitted (wqedge.quant.fit.fit_chunk, NeUQI by default) on the
chunk's *current* weights, i.e. after the error of the earlier chunks was fed forward; then its columns are
rounded one at a time onto that grid and each column's error is spread over the not-yet-quantized columns
through the Cholesky factor of (XᵀX + damp)⁻¹ (Frantar et al., GPTQ). fp16 chunks and protected columns
are exact (their error, fp16 rounding only, is fed forward too). The result is a list of
blocks.ChunkData, exactly what the converter packs, so a plan lowered this way is bit-exact with what
`quantize_model` measured.

`quantize_model(model, plan, tokens)` runs wqedge.calib.layerwise_stats with an on_layer hook that
replaces each decoder layer's linears by their error-feedback quantization, computed from inputs that
already went through the quantized earlier layers; it returns every linear's ChunkData.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import blocks
from ..blocks import ChunkData
from ..units import chunk_bounds

DAMP = 0.1          # of mean diag(XᵀX); measured on llama-s: 0.1 beat 0.01 and 0.3 (ppl 6.43 vs 6.46 at 3.25 bits)
FEEDBACK_SEQS = 256  # calibration windows for the feedback loop; 256 vs 128: ppl 6.441 vs 6.449-6.463 at 3.25 bits (llama-s)


def _round_onto(x: torch.Tensor, c: ChunkData, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, k] -> (codes uint8 [N, k], dequantized [N, k]) on chunk c's stored grid."""
    bt = blocks.block_type(c.action)
    if bt.name == "fp16":
        return None, x.half().float()
    d = torch.as_tensor(c.d, device=dev).float().reshape(-1, 1)
    if bt.name == "ternary":
        t = torch.round(x / torch.where(d > 0, d, 1.0)).clamp_(-1, 1) + 1
        t = torch.where(d > 0, t, 1.0)
        return t.to(torch.uint8), d * (t - 1.0)
    m = torch.as_tensor(c.m, device=dev).float().reshape(-1, 1)
    q = torch.round((x - m) / torch.where(d > 0, d, 1.0)).clamp_(0, bt.levels - 1)
    q = torch.where(d > 0, q, 0.0)
    return q.to(torch.uint8), d * q + m


def gptq_linear(w: torch.Tensor, xtx: torch.Tensor, actions: list[str], group_size: int, method="neuqi",
                protected: list[list[int]] | None = None, damp: float = DAMP, hdiag: torch.Tensor | None = None,
                block: int = 128, act_order: str | None = "chunk") -> list[ChunkData]:
    """Error-feedback quantization of w [N, K] (float) with XᵀX [K, K]; one action per chunk.

    act_order: None (left to right), "chunk" (chunks left to right, columns inside a chunk by decreasing
    diag(XᵀX); each chunk's quantizer is fitted on its weights as updated by the earlier chunks' errors) or
    "global" (all columns by decreasing diag(XᵀX); every chunk's quantizer fitted up front on the original
    weights, GPTQ's static groups).
    """
    from ..quant.fit import fit_chunk

    dev = w.device
    W = w.detach().clone().float()
    N, K = W.shape
    H = xtx.to(dev, torch.float64).clone()
    hd = (torch.diag(H).clone() if hdiag is None else hdiag.to(dev, torch.float64)).float()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * float(torch.diag(H).mean()) * torch.eye(K, dtype=H.dtype, device=dev)
    bounds = chunk_bounds(K, group_size)
    prot = [sorted(int(i) for i in (p or [])) for p in (protected or [[] for _ in bounds])]
    methods = [method] * len(bounds) if isinstance(method, str) else list(method)
    chunk_of = torch.empty(K, dtype=torch.long)
    exact = torch.zeros(K, dtype=torch.bool)
    for c, (s, e) in enumerate(bounds):
        chunk_of[s:e] = c
        for i in prot[c]:
            exact[s + i] = True
    diag = torch.diag(H).cpu()
    if act_order == "global":
        perm = torch.argsort(-diag, stable=True)
    elif act_order == "chunk":
        perm = torch.cat([s + torch.argsort(-diag[s:e], stable=True) for s, e in bounds])
    elif act_order in (None, "none"):
        perm = torch.arange(K)
    else:
        raise ValueError(f"act_order must be None, 'chunk' or 'global', got {act_order!r}")
    Hp = H[perm][:, perm]
    L = torch.linalg.cholesky(Hp)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    del L, Hp
    params: list[ChunkData | None] = [None] * len(bounds)

    def fit(c):
        s, e = bounds[c]
        params[c] = fit_chunk(W[:, s:e], actions[c], methods[c], hd[s:e], prot[c] or None)

    if act_order == "global":
        for c in range(len(bounds)):
            fit(c)
    Wp = W[:, perm].contiguous()
    Q = torch.zeros_like(Wp)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=dev)
    perm_l = perm.tolist()
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        Err = torch.zeros(N, b1 - b0, device=dev)
        for i in range(b0, b1):
            j = perm_l[i]
            c = int(chunk_of[j])
            if params[c] is None:       # "chunk"/None order: fit when the chunk's first column comes up
                s, e = bounds[c]
                W[:, perm[i:i + (e - s)]] = Wp[:, i:i + (e - s)]
                fit(c)
            col = Wp[:, i:i + 1]
            qc, deq = _round_onto(col, params[c], dev)
            if qc is not None:
                codes[:, j] = qc[:, 0]
            if exact[j]:
                deq = col.half().float()          # exact up to the fp16 residual
            Q[:, i] = deq[:, 0]
            err = (col - deq) / U[i, i]
            Wp[:, i + 1:b1] -= err @ U[i:i + 1, i + 1:b1]
            Err[:, i - b0] = err[:, 0]
        Wp[:, b1:] -= Err @ U[b0:b1, b1:]
    inv = torch.argsort(perm)
    Wfinal = Q[:, inv]                 # dequantized weights (protected columns exact)
    out: list[ChunkData] = []
    for c, (s, e) in enumerate(bounds):
        ch = params[c]
        p = prot[c]
        if blocks.block_type(actions[c]).name == "fp16":
            ch = ChunkData("fp16", e - s, values=Wfinal[:, s:e].half().cpu().numpy())
            if p:
                ch.protected = np.asarray(p, dtype=np.int64)
                ch.residuals = np.zeros((N, len(p)), dtype=np.float16)
        else:
            ch.codes = codes[:, s:e].cpu().numpy()
            if p:
                deqc = _dequant_codes(ch, dev)
                pi = torch.as_tensor(p, device=dev)
                ch.residuals = (Wfinal[:, s:e][:, pi] - deqc[:, pi]).half().cpu().numpy()
        out.append(ch)
    return out


def _dequant_codes(c: ChunkData, dev) -> torch.Tensor:
    bt = blocks.block_type(c.action)
    q = torch.as_tensor(c.codes, device=dev).float()
    d = torch.as_tensor(c.d, device=dev).float().reshape(-1, 1)
    if bt.name == "ternary":
        return d * (q - 1.0)
    return d * q + torch.as_tensor(c.m, device=dev).float().reshape(-1, 1)


def dequantize(chunks: list[ChunkData]) -> torch.Tensor:
    from ..quant.fit import dequantize_chunk
    return torch.cat([dequantize_chunk(c) for c in chunks], 1)


def quantize_model(model, plan, tokens: torch.Tensor, device=None, batch_size: int = 4, feedback: bool = True,
                   act_order: str | None = "chunk", damp: float = DAMP, progress: Callable[[str], None] | None = None) -> dict[str, list[ChunkData]]:
    """Quantize every decoder linear of an HF model in place by `plan`, layer by layer, with the quantized
    earlier layers in the loop. feedback=False fits each chunk alone (fit_chunk with diag(XᵀX), as
    wqedge.quantize does) but still on sequential statistics. Returns {hf_name: [ChunkData per chunk]}."""
    from ..calib import layerwise_stats
    from ..quant.fit import fit_chunk

    result: dict[str, list[ChunkData]] = {}

    def on_layer(li, layer, stats):
        for name, st in stats.items():
            t = plan.tensor(name)
            mod = layer.get_submodule(name.split(".", 3)[3][: -len(".weight")])
            w = mod.weight.data.float()
            if feedback:
                chunks = gptq_linear(w, st.xtx.to(w.device), t.actions, plan.group_size, t.methods, t.protected,
                                     hdiag=st.diag, act_order=act_order, damp=damp)
            else:
                chunks = [fit_chunk(w[:, s:e], a, m, st.diag[s:e].float(), p or None)
                          for (s, e), a, m, p in zip(chunk_bounds(t.in_features, plan.group_size), t.actions,
                                                     t.methods, t.protected)]
            result[name] = chunks
            mod.weight.data.copy_(dequantize(chunks).to(mod.weight.device, mod.weight.dtype))
        return True

    layerwise_stats(model, tokens, device=device, batch_size=batch_size, full_xtx=feedback, on_layer=on_layer,
                    progress=progress)
    return result


def quantize_checkpoint(ckpt, plan, calib_text, device=None, n_seqs: int = FEEDBACK_SEQS, seqlen: int = 512,
                        act_order: str | None = "chunk", damp: float = DAMP, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> dict[str, list[ChunkData]]:
    """Every decoder linear of `ckpt` quantized by `plan` with error feedback (the planner's recommended
    conversion): {hf_name: [ChunkData per chunk]}, ready for the GGUF writer."""
    from transformers import AutoTokenizer

    from ..calib import calibration_tokens
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, n_seqs, seqlen, 0, bos_id=bos, seed=seed)
    model = ckpt.load_hf_model(torch.float32)
    return quantize_model(model, plan, cs.train, device=device, act_order=act_order, damp=damp, progress=progress)
