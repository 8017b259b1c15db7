"""Calibration: text -> token sequences -> per-linear input (and output-gradient) statistics.

Three passes, each bounded in memory:

* `calibration_tokens`: the text is tokenized with a leading BOS and cut into non-overlapping
  windows of `seqlen` tokens whose first token is replaced by BOS (as the perplexity tool cuts
  its windows); `n_seqs` windows are taken evenly spaced over the text, plus `n_heldout` further
  windows (disjoint from them) for measuring plans.
* `layerwise_stats`: the decoder is run one layer at a time (only that layer on the device; the
  hidden states of every calibration sequence are kept between layers). For each decoder linear it
  gathers the input statistics diag(XᵀX), mean |x| and max |x| per input channel and, when asked,
  the full XᵀX. An `on_layer` callback may change a layer's weights (quantize it) before its output
  is computed, so that later layers see the already-quantized earlier ones in the loop.
* `gradient_stats`: forward and backward of the LM loss through the whole model, gathering per
  linear the mean squared gradient of the per-token loss with respect to each output channel
  (G_i = E_t[(dℓ_t/dy_ti)²]), the output-side factor of a Kronecker (K-FAC) Fisher. With the input
  factor H = E_t[x xᵀ] this gives the loss-aware damage ½ Σ_i G_i Δw_i H Δw_iᵀ used by wqedge.damage.

All statistics are float64 means over the calibration tokens (XᵀX/T, not sums) so that figures from
different sequence counts compare. CUDA is used when available, the CPU otherwise.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import distributed
from .units import PROJECTIONS

DEFAULT_N_SEQS = 32       # laptop-sized defaults: 32 x 512 tokens = 16k calibration tokens
DEFAULT_SEQLEN = 512
DEFAULT_N_HELDOUT = 4

# Linears that read the same input tensor (their input statistics are shared).
INPUT_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- text -> sequences

@dataclass
class CalibrationSet:
    """Token windows for planning: `train` gathers statistics, `heldout` measures plans."""
    train: torch.Tensor      # int64 [n_seqs, seqlen]
    heldout: torch.Tensor    # int64 [n_heldout, seqlen]
    n_text_tokens: int
    source: str = ""

    @property
    def seqlen(self) -> int:
        return int(self.train.shape[1])


def read_texts(texts: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """One text from a file, a list of files, or (when it names no file) the text itself."""
    if isinstance(texts, (list, tuple)):
        return "\n".join(read_texts(t) for t in texts)
    if isinstance(texts, os.PathLike) or (isinstance(texts, str) and _names_a_file(texts)):
        return Path(texts).read_text(encoding="utf-8", errors="replace")
    if isinstance(texts, str) and len(texts) < 4096 and not any(c.isspace() for c in texts) \
            and (os.sep in texts or texts.endswith(".txt")):
        raise FileNotFoundError(f"calibration text {texts!r}: no such file")
    return str(texts)


def _names_a_file(s: str) -> bool:
    """Whether a one-line string is the path of an existing file (a long line of text is not: is_file()
    raises ENAMETOOLONG for it rather than answering False)."""
    if len(s) >= 4096 or "\n" in s:
        return False
    try:
        return Path(s).is_file()
    except (OSError, ValueError):
        return False


_TOKENIZED: dict = {}   # the last texts tokenized: planning and error feedback cut the same text (2 MB: ~4 s each)


def tokenize_text(tokenizer, text: str, bos_id: int) -> list[int]:
    """The whole text's tokens with one leading BOS (as llama.cpp's perplexity tool tokenizes). The last two
    (tokenizer, text) pairs are remembered, so a conversion tokenizes its calibration text once."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), int(bos_id),
           hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _TOKENIZED:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are windowed later
        while len(_TOKENIZED) >= 2:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = np.asarray([int(bos_id)] + [int(i) for i in ids], dtype=np.int64)
    return _TOKENIZED[key].tolist()


def calibration_tokens(tokenizer, texts, n_seqs: int = DEFAULT_N_SEQS, seqlen: int = DEFAULT_SEQLEN,
                       n_heldout: int = DEFAULT_N_HELDOUT, bos_id: int | None = None, seed: int = 0) -> CalibrationSet:
    """Cut calibration text into BOS-led windows: n_seqs for statistics, n_heldout more for measuring.

    Windows are non-overlapping and spread evenly over the text (deterministic; `seed` only picks the
    offset of the held-out windows among the rest). Too short a text gives fewer windows (at least one
    for statistics) with a warning-free reduction; no text at all is an error.
    """
    if bos_id is None:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        bos_id = 1 if bos_id is None else bos_id
    text = read_texts(texts)
    toks = tokenize_text(tokenizer, text, bos_id)
    cs = windows_from_tokens(toks, n_seqs, seqlen, n_heldout, bos_id, seed)
    cs.source = texts if isinstance(texts, str) and len(texts) < 200 else ""
    return cs


def windows_from_tokens(toks, n_seqs: int = DEFAULT_N_SEQS, seqlen: int = DEFAULT_SEQLEN,
                        n_heldout: int = DEFAULT_N_HELDOUT, bos_id: int = 1, seed: int = 0) -> CalibrationSet:
    """calibration_tokens for an already tokenized text (leading BOS included)."""
    toks = [int(t) for t in toks]
    if seqlen < 8:
        raise ValueError(f"calibration sequence length must be >= 8, got {seqlen}")
    if n_seqs < 1:
        raise ValueError(f"need at least one calibration sequence, got n_seqs={n_seqs}")
    avail = len(toks) // seqlen
    if avail == 0:  # short text: one (shorter) window of all of it
        if len(toks) < 8:
            raise ValueError(f"calibration text has {len(toks)} tokens; need at least 8")
        seqlen = len(toks)
        avail = 1
    t = torch.tensor(toks[: avail * seqlen], dtype=torch.long).reshape(avail, seqlen)
    t[:, 0] = bos_id
    n_train = min(n_seqs, avail)
    n_ho = min(n_heldout, max(0, avail - n_train))
    if n_train + n_ho == avail:
        idx = list(range(avail))
    else:
        step = avail / (n_train + n_ho)
        idx = sorted({min(avail - 1, int(i * step)) for i in range(n_train + n_ho)})
    rng = np.random.default_rng(seed)
    ho_pos = set(rng.choice(len(idx), size=n_ho, replace=False).tolist()) if n_ho else set()
    train = [idx[i] for i in range(len(idx)) if i not in ho_pos][:n_train]
    held = [idx[i] for i in sorted(ho_pos)]
    return CalibrationSet(t[train].clone(), t[held].clone() if held else t[:0].clone(), len(toks))


# ---------------------------------------------------------------- statistics

@dataclass(frozen=True)
class XtxBand:
    """What a pruning search gathers of XᵀX (`_Accumulator`): each `block`-column block's products with itself and the
    next `width` blocks. A pruned model's chunks are re-cut from the kept columns, so its damage table reads XᵀX on
    kept columns that lie apart in the original; within `width` blocks they are exact, further apart they are taken as
    uncorrelated (zero; `InputStats.kept_blocks` counts them). Why not the dense matrix: float64 K x K for every
    linear input is ~44 GB for a 7B model (3.8 GB as this band of 4 blocks; Llama-2-7B's shapes, 32 layers)."""
    block: int
    width: int


PRUNE_XTX_BAND = 4   # blocks: exact while a kept chunk's columns span at most 5 original blocks (G = 128, groups of
                     # 32: up to 16 pruned groups inside it)


@dataclass
class InputStats:
    """Statistics of one linear's input x (over every calibration token)."""
    n_tokens: int
    diag: torch.Tensor           # float64 [K]: E[x_j²]  (= diag(XᵀX)/T)
    mean_abs: torch.Tensor       # float64 [K]: E|x_j|
    max_abs: torch.Tensor        # float32 [K]: max |x_j|
    xtx: torch.Tensor | None = None   # float64 [K, K]: XᵀX/T, when gathered
    xtx_block: int | None = None      # when set, xtx holds only its diagonal blocks of this many columns (zeros elsewhere)
    xtx_band: int | None = None       # when set (with xtx_block), the blocks are bands: block i's [G, (band + 1) G] products

    def __post_init__(self):
        # diagonal blocks are stored as blocks (K/G x G² values, not K²: a 1.1B model's are 8 GB dense) and made
        # dense only when `xtx` is read; `block(s, e)` reads one without that
        x = self.__dict__.get("_xtx")
        if self.xtx_band is not None and x is not None:   # a band (XtxBand): its diagonal blocks are its first columns
            self.__dict__["_band"] = list(x)
            self.__dict__["_blocks"] = [b[:, :b.shape[0]] for b in x]
            self.__dict__["_xtx"] = None
            return
        if self.xtx_block and x is not None:
            if isinstance(x, torch.Tensor):
                x = [x[s:s + self.xtx_block, s:s + self.xtx_block].clone() for s in range(0, x.shape[0], self.xtx_block)]
            self.__dict__["_blocks"], self.__dict__["_xtx"] = list(x), None

    @property
    def has_xtx(self) -> bool:
        return self.__dict__.get("_blocks") is not None or self.__dict__.get("_xtx") is not None

    def block(self, s: int, e: int) -> torch.Tensor:
        """xtx[s:e, s:e] (inside one stored diagonal block when only those were gathered)."""
        b = self.__dict__.get("_blocks")
        if b is None:
            return self.xtx[s:e, s:e]
        i, o = divmod(s, self.xtx_block)
        if o + e - s > b[i].shape[0]:
            raise ValueError(f"columns {s}:{e} cross the {self.xtx_block}-column diagonal blocks of XᵀX")
        return b[i][o:o + e - s, o:o + e - s]

    def hessian(self) -> torch.Tensor:
        return self.xtx if self.has_xtx else torch.diag(self.diag)

    def kept_blocks(self, cols, group: int) -> tuple[list[torch.Tensor], int]:
        """XᵀX's diagonal `group`-column blocks over the kept columns `cols` (original indices, ascending): what a
        pruned linear's damage table reads ([list of blocks], as InputStats.xtx with xtx_block = group), and how many
        of their entries lay beyond the gathered band (taken as 0). Dense or banded XᵀX alike."""
        cols = torch.as_tensor(cols, dtype=torch.long)
        band = self.__dict__.get("_band")
        out, missing = [], 0
        for s in range(0, len(cols), group):
            c = cols[s:s + group]
            if band is None:
                out.append(self.xtx[c][:, c].clone())
                continue
            g, w = self.xtx_block, self.xtx_band
            lo, hi = torch.minimum(c[:, None], c[None, :]), torch.maximum(c[:, None], c[None, :])
            bi = lo // g                                    # the pair's band: the lower column's block,
            off = hi - bi * g                               # and the higher column's offset in it
            ok = off < (w + 1) * g
            missing += int((~ok).sum())
            m = torch.zeros(len(c), len(c), dtype=band[0].dtype)
            for b in torch.unique(bi[ok]).tolist():           # a few band blocks per chunk
                sel = ok & (bi == b)
                m[sel] = band[b][(lo - b * g)[sel], off[sel]]
            out.append(m)
        return out, missing


def _get_xtx(self):
    b = self.__dict__.get("_blocks")
    return torch.block_diag(*b) if b is not None else self.__dict__.get("_xtx")


def _set_xtx(self, value):
    self.__dict__["_blocks"], self.__dict__["_xtx"] = None, value


InputStats.xtx = property(_get_xtx, _set_xtx,
                          doc="float64 [K, K] XᵀX/T (dense; zeros off the diagonal blocks when xtx_block is set), or None")


XTX_TILE = 256   # XᵀX of inputs wider than 2 tiles is gathered in tiles, the upper triangle only (it is symmetric)


class _Accumulator:
    """Sums over tokens of x², |x|, max |x| and, when asked, XᵀX: full (`xtx` True) or only its diagonal blocks of
    `xtx` columns (an int: the chunk blocks H_cc the damage table reads, K/G times cheaper than the full matrix)."""

    def __init__(self, k: int, xtx: "bool | int | XtxBand", device):
        self.n = 0
        self.s2 = torch.zeros(k, dtype=torch.float64, device=device)
        self.s1 = torch.zeros(k, dtype=torch.float64, device=device)
        self.mx = torch.zeros(k, dtype=torch.float32, device=device)
        self.band = xtx.width if isinstance(xtx, XtxBand) else None
        self.block = xtx.block if isinstance(xtx, XtxBand) else None if isinstance(xtx, bool) else int(xtx)
        if self.block:    # block i: its columns against themselves and the next `band` blocks (diagonal blocks: none)
            g, w = self.block, self.band or 0
            self.xtx = [torch.zeros(min(g, k - s), min((w + 1) * g, k - s), dtype=torch.float64, device=device)
                        for s in range(0, k, g)]
        else:
            self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device) if xtx else None

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        self.s2 += (x * x).sum(0, dtype=torch.float64)
        self.s1 += x.abs().sum(0, dtype=torch.float64)
        self.mx = torch.maximum(self.mx, x.abs().amax(0))
        if self.xtx is None:
            return
        k = x.shape[1]
        if self.block:               # diagonal blocks, or bands of them
            for i, s in enumerate(range(0, k, self.block)):
                self.xtx[i] += (x[:, s:s + self.block].T @ x[:, s:s + self.xtx[i].shape[1]]).double()
            return
        if k <= 2 * XTX_TILE:        # fp32 products of one batch, summed in fp64
            self.xtx += (x.T @ x).double()
            return
        xt = x.T.contiguous()        # wide inputs: tiles on and above the diagonal (K=1408: 35 vs 46 ms a batch)
        for i in range(0, k, XTX_TILE):
            up = (xt[i:i + XTX_TILE] @ x[:, i:]).double()
            self.xtx[i:i + XTX_TILE, i:] += up
            if up.shape[1] > XTX_TILE:
                self.xtx[i + XTX_TILE:, i:i + XTX_TILE] += up[:, XTX_TILE:].T

    def result(self) -> InputStats:
        self._reduce_over_ranks()
        n = max(self.n, 1)
        xtx = None if self.xtx is None else ([(b / n).cpu() for b in self.xtx] if self.block else (self.xtx / n).cpu())
        return InputStats(self.n, (self.s2 / n).cpu(), (self.s1 / n).cpu(), self.mx.cpu(), xtx, self.block, self.band)


    def _reduce_over_ranks(self):
        """Under --distributed (wqedge.distributed), the sums of every rank's windows: then every rank holds the
        statistics of all windows, the same on each."""
        if distributed.world() == 1:
            return
        self.n = int(distributed.reduce_sums(float(self.n))[0])
        distributed.reduce_sum_(self.s2)
        distributed.reduce_sum_(self.s1)
        distributed.reduce_max_(self.mx)
        for t in (self.xtx if self.block else [] if self.xtx is None else [self.xtx]):
            distributed.reduce_sum_(t)


def _layer_call(layer, h, pos_emb):
    out = layer(h, attention_mask=None, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def _rotary(model, hidden: torch.Tensor):
    seqlen = hidden.shape[1]
    pos = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
    return model.model.rotary_emb(hidden, position_ids=pos)


class InputStatsHooks:
    """Forward pre-hooks that gather every decoder layer's input statistics (as layerwise_stats does) during
    whole-model forward passes, e.g. the gradient pass's: its windows then need no second forward in
    layerwise_stats (`prior`), which runs only the others. The sums of all layers are held at once, so this is
    for block-diagonal XᵀX (an int `xtx`) or none; used as a context manager (the hooks go on exit)."""

    def __init__(self, model, xtx: bool | int, device):
        if xtx is True:
            raise ValueError("InputStatsHooks holds every layer's sums at once: full XᵀX would not fit; use layerwise_stats")
        self.accs: dict[tuple[int, str], _Accumulator] = {}
        self._hooks = []
        for li, layer in enumerate(model.model.layers):
            for group in INPUT_GROUPS:
                mod = layer.get_submodule(group[0])
                acc = self.accs[(li, group[0])] = _Accumulator(mod.in_features, xtx, device)
                self._hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, acc=acc: acc.add(args[0].detach().to(acc.s2.device))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@torch.no_grad()
def layerwise_stats(model, tokens: torch.Tensor, device=None, batch_size: int = 4, full_xtx: bool | int = True,
                    on_layer: Callable[[int, torch.nn.Module, dict[str, InputStats]], bool | None] | None = None,
                    progress: Callable[[str], None] | None = None, keep: bool = True,
                    checkpoints=None, skip: Callable[[int], bool] | None = None,
                    prior: "InputStatsHooks | None" = None) -> dict[str, InputStats]:
    """Input statistics of every decoder linear, gathered one decoder layer at a time.

    `model` is a transformers LlamaForCausalLM (any dtype, on the CPU, or already on a CUDA `device`: then the
    hidden states stay there too); each layer is moved to `device` in float32 for its turn and back.
    Statistics are keyed by Hugging Face weight name
    (model.layers.L.self_attn.q_proj.weight). `on_layer(l, layer, stats_of_layer)` runs after a layer's
    statistics are gathered and before its output is computed for the next layer; it returns True when
    it changed the layer's weights (then the outputs are recomputed with the new weights).
    full_xtx: True gathers XᵀX, an int G only its diagonal G x G blocks (InputStats.xtx_block), False neither.
    keep: False drops each layer's statistics once on_layer has used them (error feedback: a 1.1B model's full XᵀX
    of every layer would be 7.7 GB) and returns {}.
    checkpoints: a wqedge.resume.StatsCheckpoints: each layer's statistics are saved there (`inputs-L`) and, when
    present, loaded instead of gathered (the layer still runs to feed the next, unless no later layer needs it).
    skip(l) True: layer l gathers nothing and is not run before on_layer(l, layer, {}), which must set its weights
    (error feedback resumed from saved fits); its outputs are then computed once.
    prior: sums already gathered over other windows by an InputStatsHooks (the gradient pass's forward): `tokens`
    are then the remaining windows, and the statistics are those of all of them.
    """
    dev = default_device(device)
    tokens = distributed.shard(torch.as_tensor(tokens, dtype=torch.long))   # this rank's windows (all, alone)
    n = tokens.shape[0]
    emb = model.model.embed_tokens
    emb_dev = next(emb.parameters()).device
    cdtype = torch.float32
    # hidden states live where the model lives: on the GPU when it was loaded there (no host copies, no host
    # memory: 256 windows of a 1.1B model are 1 GB per copy), else in host memory between layers
    home = dev if (emb_dev.type == "cuda" and dev.type == "cuda") else torch.device("cpu")
    hidden = torch.cat([emb(tokens[i:i + batch_size].to(emb_dev)).to(home, cdtype) for i in range(0, n, batch_size)])
    rot = model.model.rotary_emb
    rot_orig = next(rot.buffers()).device if list(rot.buffers()) else None
    rot.to(dev)
    pos_emb = _rotary(model, hidden[:1].to(dev))
    pos_emb = tuple(p.to(cdtype) for p in pos_emb)
    out: dict[str, InputStats] = {}
    layers = model.model.layers
    ck = checkpoints
    for li, layer in enumerate(layers):
        if ck is not None and on_layer is None and all(ck.has(f"inputs-{j}") for j in range(li, len(layers))):
            for j in range(li, len(layers)):     # the rest is saved: no layer needs to run any more
                out.update(ck.load(f"inputs-{j}"))
            break
        saved = ck is not None and ck.has(f"inputs-{li}")
        skipped = skip is not None and bool(skip(li))
        orig_dev = next(layer.parameters()).device
        orig_dtype = next(layer.parameters()).dtype
        layer.to(dev, cdtype)
        accs = {}
        hooks = []
        for group in (() if saved or skipped else INPUT_GROUPS):
            mod = layer.get_submodule(group[0])
            acc = prior.accs[(li, group[0])] if prior is not None else _Accumulator(mod.in_features, full_xtx, dev)
            for name in group:
                accs[f"model.layers.{li}.{name}.weight"] = acc
            hooks.append(mod.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
        outs = []
        try:
            for i in range(0, 0 if skipped else n, batch_size):   # a skipped layer runs after on_layer
                outs.append(_layer_call(layer, hidden[i:i + batch_size].to(dev), pos_emb).to(home, cdtype))
        finally:
            for hk in hooks:
                hk.remove()
        results = {}
        for name, acc in accs.items():
            if id(acc) not in results:
                results[id(acc)] = acc.result()
            out[name] = results[id(acc)]
        if saved:
            out.update(ck.load(f"inputs-{li}"))
        this_layer = {k: v for k, v in out.items() if k.startswith(f"model.layers.{li}.")}
        if ck is not None and not saved:
            ck.save(f"inputs-{li}", this_layer)
        changed = (on_layer is not None and bool(on_layer(li, layer, this_layer))) or skipped
        if not keep:
            out.clear()
        del accs, results
        if changed:
            outs.clear()        # the unquantized layer's outputs: not needed, and a whole copy of the states
            if li + 1 < len(layers):     # (the last layer's new outputs would feed nothing)
                outs = [_layer_call(layer, hidden[i:i + batch_size].to(dev), pos_emb).to(home, cdtype)
                        for i in range(0, n, batch_size)]
        del hidden
        hidden = torch.cat(outs) if outs else None
        del outs
        layer.to(orig_dev, orig_dtype)
        if progress:
            progress(f"calibration: layer {li + 1}/{len(layers)}")
    if rot_orig is not None:
        rot.to(rot_orig)
    return out


@dataclass
class GradStats:
    """Output-side statistics of one linear from backward passes of the LM loss."""
    n_tokens: int
    g2: torch.Tensor                     # float64 [N]: E_t[(dℓ_t/dy_ti)²], ℓ_t the per-token loss
    fisher: torch.Tensor | None = None   # float32 [N, K]: E_seq[(dℓ_seq/dW)²] (empirical Fisher diag), when asked


def _grad_square_hook(acc: dict, name: str, scale: list):
    """Backward hook adding the squared output gradients of one linear (rows of its gout, times scale[0]) into
    acc[name]: the whole-model and the layer-streamed gradient passes accumulate the same statistic."""
    def hook(mod, gin, gout):
        g = gout[0].reshape(-1, gout[0].shape[-1]).double() * scale[0]
        acc[name] += (g * g).sum(0)
    return hook


def gradient_stats(model, tokens: torch.Tensor, device=None, batch_size: int = 1, fisher_diag: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict[str, GradStats]:
    """Per decoder linear, the mean squared output gradient of the per-token LM loss (and optionally the
    empirical Fisher diagonal of its weights), from forward+backward over `tokens`.

    The model is moved to `device` whole (a 7B model needs a GPU of 16+ GB in fp16, or CPU memory).
    Only gradients of the decoder linears' outputs are kept; parameters get no .grad unless
    fisher_diag is asked for.
    """
    dev = default_device(device)
    tokens = distributed.shard(torch.as_tensor(tokens, dtype=torch.long))
    from .stream import StreamedModel
    if isinstance(model, StreamedModel):
        if fisher_diag:
            raise ValueError("the empirical Fisher diagonal needs the whole model (not a layer-streamed one)")
        return _streamed_gradient_stats(model, tokens, dev, batch_size, progress)
    orig = next(model.parameters()).device
    model.to(dev)
    names = [f"model.layers.{li}.{hf}.weight" for li in range(len(model.model.layers)) for hf, _ in PROJECTIONS]
    mods = {n: model.get_submodule(n[: -len(".weight")]) for n in names}
    g2 = {n: torch.zeros(m.out_features, dtype=torch.float64, device=dev) for n, m in mods.items()}
    fis = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()} if fisher_diag else None
    scale = [1.0]
    hooks = []
    for n, m in mods.items():
        hooks.append(m.register_full_backward_hook(_grad_square_hook(g2, n, scale)))
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if fisher_diag:
        for m in mods.values():
            m.weight.requires_grad_(True)
    n_tok = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            x = tokens[i:i + batch_size].to(dev)
            emb = model.model.embed_tokens(x).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1)
            nll = -lp.gather(-1, x[:, 1:, None])[..., 0]
            t = nll.numel()
            scale[0] = float(t)          # d(mean loss)/dy * T = d(per-token loss)/dy
            loss = nll.mean()
            if fisher_diag:
                for m in mods.values():
                    m.weight.grad = None
            loss.backward()
            if fisher_diag:
                for n, m in mods.items():
                    fis[n] += m.weight.grad.float() ** 2
            n_tok += t
            if progress:
                progress(f"gradients: {min(i + batch_size, tokens.shape[0])}/{tokens.shape[0]} sequences")
    finally:
        for hk in hooks:
            hk.remove()
        for p, r in req.items():
            p.requires_grad_(r)
            p.grad = None
        model.to(orig)
        model.train(was_training)
    nb = math.ceil(tokens.shape[0] / batch_size)
    n_tok, nb = _reduce_grad_sums(g2, fis, n_tok, nb)
    return {n: GradStats(n_tok, (g2[n] / max(n_tok, 1)).cpu(),
                         None if fis is None else (fis[n] / nb).cpu()) for n in names}


def _reduce_grad_sums(g2: dict, fis: dict | None, n_tok: int, nb: int) -> tuple[int, int]:
    """Under --distributed: the squared-gradient sums (and Fisher sums) of all ranks' windows, in place; returns the
    total token and batch counts."""
    if distributed.world() == 1:
        return n_tok, nb
    for name in sorted(g2):            # the same order on every rank
        distributed.reduce_sum_(g2[name])
        if fis is not None:
            distributed.reduce_sum_(fis[name])
    n_tok, nb = distributed.reduce_sums(float(n_tok), float(nb))
    return int(n_tok), int(nb)


def _streamed_gradient_stats(model, tokens: torch.Tensor, dev, batch_size: int, progress=None) -> dict[str, GradStats]:
    """gradient_stats for a wqedge.stream.StreamedModel, one decoder layer in memory at a time: a forward pass layer
    by layer keeps every layer's input hidden states (of these few windows: on the device on CUDA, else in files),
    the loss's gradient at the last layer's output comes from the final norm and head, and the backward pass runs
    layer by layer in reverse, each layer read again and its forward recomputed from its stored input. Same
    batches, same per-token scaling and the same layer arithmetic as the whole-model pass (equal up to float
    summation order)."""
    import tempfile
    n_layers = len(model.model.layers)
    batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
    spill = None if dev.type == "cuda" else tempfile.TemporaryDirectory(prefix="wqedge-grad-")

    def keep(li, bi, t):
        if spill is None:
            return t
        f = Path(spill.name) / f"{li}-{bi}.pt"
        torch.save(t.cpu(), f)
        return f

    def load(x):
        return x if isinstance(x, torch.Tensor) else torch.load(x, weights_only=True).to(dev)

    try:
        with torch.no_grad():
            h = [model.model.embed_tokens(b.to(dev)).to(dev, torch.float32) for b in batches]
            pos_emb = None
            model.model.rotary_emb.to(dev)
            pos_emb = tuple(p.to(torch.float32) for p in _rotary(model, h[0][:1]))
            inputs = []
            for li, layer in enumerate(model.model.layers):
                inputs.append([keep(li, bi, x) for bi, x in enumerate(h)])
                h = [_layer_call(layer, x, pos_emb) for x in h]
                del layer
        norm, head = model.final_norm(), model.head_weight()
        grads, scale, n_tok = [], [], 0
        for b, x in zip(batches, h):
            x = x.detach().requires_grad_(True)
            logits = torch.nn.functional.linear(norm(x), head).float()
            bt = b.to(dev)
            lp = torch.log_softmax(logits[:, :-1], -1)
            nll = -lp.gather(-1, bt[:, 1:, None])[..., 0]
            nll.mean().backward()
            grads.append(x.grad.detach())
            scale.append(float(nll.numel()))
            n_tok += nll.numel()
        del h, norm, head
        names = [hf for hf, _ in PROJECTIONS]
        g2: dict[str, torch.Tensor] = {}
        for li in reversed(range(n_layers)):
            layer = model.model.layers[li]
            mods = {f"model.layers.{li}.{hf}.weight": layer.get_submodule(hf) for hf in names}
            acc = {n: torch.zeros(m.out_features, dtype=torch.float64, device=dev) for n, m in mods.items()}
            cur = [1.0]
            hooks = []
            for n, m in mods.items():
                hooks.append(m.register_full_backward_hook(_grad_square_hook(acc, n, cur)))
            try:
                for bi in range(len(batches)):
                    x = load(inputs[li][bi]).detach().requires_grad_(True)
                    cur[0] = scale[bi]
                    with torch.enable_grad():
                        _layer_call(layer, x, pos_emb).backward(grads[bi])
                    grads[bi] = x.grad.detach()
            finally:
                for hk in hooks:
                    hk.remove()
            inputs[li] = None
            g2.update(acc)
            del layer
            if progress:
                progress(f"gradients: layer {li + 1} of {n_layers} (backward)")
    finally:
        if spill is not None:
            spill.cleanup()
    n_tok, _ = _reduce_grad_sums(g2, None, n_tok, 0)
    return {f"model.layers.{li}.{hf}.weight": GradStats(n_tok, (g2[f"model.layers.{li}.{hf}.weight"] /
                                                                max(n_tok, 1)).cpu())
            for li in range(n_layers) for hf in names}


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, device=None, batch_size: int = 4, second_half: bool = False) -> float:
    """Mean next-token NLL of `model` on `tokens` (every position, or the second half of each window)."""
    dev = default_device(device)
    tokens = distributed.shard(torch.as_tensor(tokens, dtype=torch.long))
    tot, cnt = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        x = tokens[i:i + batch_size].to(dev)
        lg = model(x).logits.float()
        lp = torch.log_softmax(lg[:, :-1], -1)
        nll = -lp.gather(-1, x[:, 1:, None])[..., 0]
        if second_half:
            nll = nll[:, x.shape[1] // 2:]
        tot += float(nll.sum())
        cnt += nll.numel()
    tot, cnt = distributed.reduce_sums(tot, float(cnt))
    return tot / max(cnt, 1)


def collect_stats(ckpt, calib_text, device=None, n_seqs: int = DEFAULT_N_SEQS, seqlen: int = DEFAULT_SEQLEN,
                  seed: int = 0, stream: bool | None = None) -> dict[str, torch.Tensor]:
    """diag(XᵀX)/T of every decoder linear's input (float32 [K], keyed by HF weight name), from the
    unquantized model: the weights wqedge.quantize gives the NeUQI fits. stream: wqedge.stream.planning_model's."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, n_seqs, seqlen, 0, bos_id=bos, seed=seed)
    from .stream import planning_model
    model = planning_model(ckpt, default_device(device), stream)
    st = layerwise_stats(model, cs.train, device=device, full_xtx=False)
    return {k: v.diag.float() for k, v in st.items()}
