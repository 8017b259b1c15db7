"""NeUQI light distillation: the fp16 parameters around the integer codes are trained (and, optionally, the codes).

Error feedback (wqedge.quant.gptq) picks each chunk's codes and per-row scale d and offset m one linear at a
time, against that linear's own input statistics. What it cannot see is how the errors of a whole decoder layer
(seven linears, attention, the MLP's product) add up in the layer's output. This module freezes every code and
trains, in fp32 master copies, the per-row parameters of every chunk plus the layer's two RMSNorm weights so
that the quantized layer's output matches the unquantized one (METHODS.md §2, "light distillation"):

  block stage (always): decoder layer by decoder layer, MSE between the quantized layer's output on the
      hidden states of the already quantized (and tuned) earlier layers and the fp layer's output on the fp
      hidden states; AdamW with a cosine schedule over the calibration windows.
  end-to-end stage (optional, e2e_steps > 0): every parameter of every layer and the final norm at once,
      KL divergence of the next-token distributions against the fp model.

Which parameters a chunk has comes from its block kind (wqedge.blocks traits): a chunk is tuned when the
per-row form w = d·(q − q0) + m (m only when the kind `has_offset`) reproduces exactly what
blocks.dequantize_chunk makes of it; chunks of any other kind (fp16, or a kind with parameters beyond one
d and m per row) stay as fitted and are listed in `DistillResult.skipped`. Protected columns keep their
weights: their fp16 residuals follow the new grid.

d and m are stored fp16 by the format, so the tuned values are rounded to fp16 at the end of each stage and
the model that goes on (to the next layer, to the file) is the rounded one; with codes frozen (code_lr = 0, the
method as published) the codes written are the fitted ones. Norms are stored F32 in the file, written as trained.

Trained codes (code_lr > 0; what `wqedge convert` does on a GPU, wqedge.pipeline.distill_options): each weight of
an affine, ternary or two-level chunk gets a latent code in code units, starting at its fitted code; the forward pass uses
the latent rounded to the kind's grid with a straight-through gradient, so a code changes only once its latent
has crossed a half-way point, and the file stores the rounded latents. Error feedback chooses codes one linear at
a time against its own inputs; this lets the layer's (and the model's) output choose them. It overfits a small
calibration set (bench/results/distill_codes.md: 32 windows), so a layer whose held-out error ends above where it
started is trained again with frozen codes, and an end-to-end stage that raises the held-out KL is dropped.

Scales and offsets are trained relative to their fitted values (d = d₀·(1 + a), m = m₀ + d₀·b), so one
learning rate suits every bit width and every layer; norms get their group's learning rate times their mean
magnitude for the same reason.
"""
from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import blocks
from ..blocks import ChunkData
from ..checkpoint import CheckpointView
from ..report import e2e_loss_label
from ..units import PROJECTIONS

BATCH = 4                # calibration windows per step
LR = 1e-3                # relative units (about a fraction of d₀ per step, for Adam); 3e-3 gave the same perplexity
#                          within 0.007 on llama-s at 2.0-3.25 bits (bench/results/distill.md)
NORM_LR = 1e-3           # times each norm's mean |weight|
E2E_LR = 2e-4            # end-to-end stage (all layers at once); higher rates are not measured yet
CODE_LR = 0.0            # latent codes, in code units per step (0: codes frozen, NeUQI's light distillation)
E2E_CE = 0.0             # weight of the text's cross-entropy in the end-to-end loss (0: KL to the fp model alone)
E2E_HEAD_LR = 0.0        # an untied output head trained in the end-to-end stage, times its mean |weight| (0: frozen)
# kinds whose codes can be trained: w = d * S * (q - zero_code) + B * m, q on the kind's grid, S = 1 for affine and
# ternary chunks and the sub-block's scale code for two-level ("subscale") ones
CODE_KINDS = ("affine", "ternary", "subscale")


@dataclass
class DistillResult:
    """Tuned chunks (same codes, new d/m, fp16-valued) and norms (HF name -> float32), with what it cost."""
    chunks: dict[str, list[ChunkData]]
    norms: dict[str, torch.Tensor]
    seconds: float = 0.0
    peak_bytes: int = 0
    peak_what: str = ""
    layers: list[dict] = field(default_factory=list)   # per layer: held-out MSE before/after (relative)
    e2e: dict | None = None                            # held-out KL before/after the end-to-end stage
    skipped: list[str] = field(default_factory=list)   # chunks left as fitted, and why
    codes_changed: int = 0                             # codes the training moved (code_lr > 0), both stages
    code_lr: float = 0.0                               # the code learning rate the block stage ran with
    windows: int = 0                                   # calibration windows trained on (held-out ones aside)

    def record(self) -> dict:
        """What the distillation did, for the plan the file stores (fit.distilled); no timings, so that equal runs
        write equal files."""
        e2e = self.e2e or {}
        return {"code_lr": self.code_lr, "codes_changed": self.codes_changed, "windows": self.windows,
                "layers_codes_trained": sum(bool(x.get("codes_trained")) for x in self.layers),
                "e2e_steps": int(e2e.get("steps", 0)), "e2e_kept": bool(e2e.get("kept", False)),
                **({"e2e_ce": float(e2e["ce"])} if e2e.get("ce") else {}),
                **({"e2e_head_lr": float(e2e["head_lr"])} if e2e.get("head_lr") else {})}

    def summary(self) -> str:
        mb = self.peak_bytes / 2**20
        parts = [f"distillation: {self.seconds:.1f} s, peak memory {mb:.0f} MiB ({self.peak_what})"]
        if self.layers and not math.isnan(self.layers[0]["before"]):
            before = sum(x["before"] for x in self.layers) / len(self.layers)
            after = sum(x["after"] for x in self.layers) / len(self.layers)
            parts.append(f"held-out block MSE (relative to the fp output), mean over layers: {before:.4g} -> {after:.4g}")
        if self.e2e and not math.isnan(self.e2e["before"]):
            parts.append(f"held-out KL: {self.e2e['before']:.4g} -> {self.e2e['after']:.4g} nats/token")
            if self.e2e.get("ce"):
                parts.append(f"held-out end-to-end loss ({e2e_loss_label(self.e2e['ce'])}): "
                             f"{self.e2e['objective_before']:.4g} -> {self.e2e['objective_after']:.4g}")
        if self.code_lr:
            parts.append(f"codes changed: {self.codes_changed}")
        if self.skipped:
            parts.append(f"left as fitted: {'; '.join(self.skipped)}")
        return "\n".join(parts)


def check_ce_weight(w, what: str = "the end-to-end cross-entropy weight") -> float:
    """w as a float in [0, 1] (the text's cross-entropy share of the end-to-end loss), else ValueError."""
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {w!r}")
    return w


def check_steps(steps, what: str = "distillation steps") -> int:
    """steps as an int >= 0, else ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {steps!r}")
    return int(steps)


# ---------------------------------------------------------------- one linear with trainable row parameters

def _basis(c: ChunkData) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, B) float32 [N, g] with weights = A·d + B·m per row (protected residuals aside), found by evaluating
    the chunk's own dequantization (blocks.dequantize_chunk) at (d, m) = (1, 0) and (0, 1); None when the
    kind has no such header parameters or its weights are not linear in them."""
    bt = blocks.block_type(c.action)
    if bt.is_float or c.codes is None or c.d is None or bt.has_offset != (c.m is not None):
        return None
    n = c.codes.shape[0]
    one, zero = np.ones(n, np.float32), np.zeros(n, np.float32)
    probe = copy.copy(c)
    probe.protected = probe.residuals = None
    probe.d, probe.m = one, (zero if bt.has_offset else None)
    A = blocks.dequantize_chunk(probe)
    B = np.zeros_like(A)
    if bt.has_offset:
        probe.d, probe.m = zero, one
        B = blocks.dequantize_chunk(probe)
    d = np.asarray(c.d, np.float32)[:, None]
    m = np.asarray(c.m, np.float32)[:, None] if bt.has_offset else 0.0
    probe.d, probe.m = c.d, c.m
    w = blocks.dequantize_chunk(probe)
    if not np.allclose(A * d + B * m, w, rtol=1e-6, atol=1e-7 * float(np.abs(w).max(initial=0.0))):
        return None
    return A, B


def _subscale_multiplier(c: ChunkData) -> np.ndarray:
    """float32 [N, g]: each weight's sub-block scale code (a two-level chunk's w = d * sc * q - dmin * mn): the
    chunk's per-column scale (blocks.subscale_grid) at d = 1."""
    n = c.codes.shape[0]
    return blocks.subscale_grid(np.ones(n, np.float32), np.zeros(n, np.float32), c.sc, c.mn, c.g)[0]


class TunableLinear(nn.Module):
    """A decoder linear rebuilt from its chunks: trainable per-row d and m of every chunk, codes frozen unless
    train_codes (then a latent code per weight of the affine, ternary and two-level chunks, `code_values`).

    weight = A ⊙ d[:, chunk] + B ⊙ m[:, chunk] + F: A and B come from each chunk's block kind (`_basis`: for
    affine kinds codes − q0 and 1, for sub-scale kinds codes × sub-scale and −sub-min), zero on the columns
    not tuned; F is the fixed rest (fp16 chunks, protected columns' full weights, chunks of other kinds).
    """

    def __init__(self, chunks: list[ChunkData], device, skipped: list[str] | None = None, name: str = "",
                 train_codes: bool = False):
        super().__init__()
        self.src = chunks
        n = next(c.codes.shape[0] if c.codes is not None else c.values.shape[0] for c in chunks)
        k = sum(c.g for c in chunks)
        A, B, fixed = torch.zeros(n, k), torch.zeros(n, k), torch.zeros(n, k)
        cidx = torch.zeros(k, dtype=torch.long)
        d0, m0 = torch.zeros(n, len(chunks)), torch.zeros(n, len(chunks))
        qlo, qhi, cmask = torch.zeros(k), torch.zeros(k), torch.zeros(k, dtype=torch.bool)
        Q0, S = torch.zeros(n, k), torch.ones(n, k)   # trained columns: codes - zero_code, and A = S * Q0
        self.tuned_chunks: list[bool] = []
        s = 0
        for ci, c in enumerate(chunks):
            e = s + c.g
            cidx[s:e] = ci
            full = torch.from_numpy(blocks.dequantize_chunk(c))
            basis = _basis(c)
            if basis is None:
                fixed[:, s:e] = full
                if not blocks.block_type(c.action).is_float and skipped is not None:
                    skipped.append(f"{c.action} chunks (weights not linear in one d, m per row)")
            else:
                keep = torch.ones(c.g)
                if c.n_protected:
                    keep[torch.as_tensor(c.protected, dtype=torch.long)] = 0.0
                A[:, s:e] = torch.from_numpy(basis[0]) * keep
                B[:, s:e] = torch.from_numpy(basis[1]) * keep
                fixed[:, s:e] = full * (1 - keep)
                d0[:, ci] = torch.from_numpy(np.asarray(c.d, np.float32))
                if c.m is not None:
                    m0[:, ci] = torch.from_numpy(np.asarray(c.m, np.float32))
                bt = blocks.block_type(c.action)
                if train_codes and bt.kind in CODE_KINDS:
                    qlo[s:e], qhi[s:e] = -bt.zero_code, bt.levels - 1 - bt.zero_code
                    cmask[s:e] = keep.bool()
                    Q0[:, s:e] = torch.from_numpy(np.asarray(c.codes)[:, :c.g].astype(np.float32) - bt.zero_code)
                    if bt.has_subscales:   # A = sub-block scale code x q (the basis at d = 1)
                        S[:, s:e] = torch.from_numpy(_subscale_multiplier(c))
            self.tuned_chunks.append(basis is not None)
            s = e
        self.in_features, self.out_features = k, n
        self.register_buffer("A", A.to(device))
        self.register_buffer("B", B.to(device))
        self.register_buffer("fixed", fixed.to(device) if bool(fixed.any()) else torch.zeros(0, device=device))
        self.register_buffer("cidx", cidx.to(device))
        self.register_buffer("d0", d0.to(device))
        self.register_buffer("m0", m0.to(device))
        self.a = nn.Parameter(torch.zeros(n, len(chunks), device=device))
        self.b = nn.Parameter(torch.zeros(n, len(chunks), device=device))
        # codes training (train_codes): a latent L per weight, in code units, starting at the fitted codes; the
        # forward pass uses its rounding (straight-through), so a code changes once L crosses a half-way point
        self.codes: nn.Parameter | None = None
        if bool(cmask.any()):
            self.register_buffer("qlo", qlo.to(device))
            self.register_buffer("qhi", qhi.to(device))
            self.register_buffer("cmask", cmask.to(device))
            self.register_buffer("Q0", Q0.to(device))
            self.register_buffer("S", S.to(device))
            self.codes = nn.Parameter(Q0.clone().to(device))
        self.codes_changed = 0
        self.expand: Callable[[torch.Tensor], torch.Tensor] | None = None   # pruned plans: kept -> full shape
        self.act_bits: int | None = None   # the runtime's per-token activation quantizer on the input (None: float)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, m) per row and chunk, fp32 masters."""
        return self.d0 * (1 + self.a), self.m0 + self.d0 * self.b

    def hard_codes(self) -> torch.Tensor:
        """The latent codes rounded to the kinds' grids (q - zero_code; meaningful on the trained columns)."""
        return torch.round(torch.minimum(torch.maximum(self.codes, self.qlo), self.qhi))

    def code_values(self) -> torch.Tensor:
        """A with the trained columns' codes taken from the latent ones (straight-through rounding)."""
        if self.codes is None:
            return self.A
        soft = torch.minimum(torch.maximum(self.codes, self.qlo), self.qhi)   # no gradient past the grid's ends
        q = soft + (torch.round(soft) - soft).detach()
        return torch.where(self.cmask, self.S * q, self.A)

    def weight(self) -> torch.Tensor:
        d, m = self.params()
        w = self.code_values() * d[:, self.cidx] + self.B * m[:, self.cidx]
        return w + self.fixed if self.fixed.numel() else w

    def forward(self, x):
        w = self.weight() if self.expand is None else self.expand(self.weight())
        if self.act_bits is not None:   # straight-through gradients (wqedge.actquant.fake_quant)
            from ..actquant import fake_quant
            x = fake_quant(x, self.act_bits)
        return nn.functional.linear(x, w.to(x.dtype))

    @torch.no_grad()
    def round_to_file(self) -> list[ChunkData]:
        """The chunks with the trained d, m rounded to fp16 (and, when codes are trained, the rounded latent
        codes); resets the masters to them."""
        d, m = self.params()
        d16, m16 = d.half(), m.half()
        bad = ~(torch.isfinite(d16) & torch.isfinite(m16) & (d16 >= 0))   # keep a row's fit if it would break
        d16 = torch.where(bad, self.d0.half(), d16)
        m16 = torch.where(bad, self.m0.half(), m16)
        bases = {}
        for ci, c in enumerate(self.src):   # compact kinds: onto their header grid, under a base refitted to d
            bt = blocks.block_type(c.action)
            if bt.compact and self.tuned_chunks[ci]:
                bases[ci], dn, mn = blocks.compact_snap(bt, d16[:, ci].float().cpu().numpy(),
                                                        m16[:, ci].float().cpu().numpy() if c.m is not None else None)
                d16[:, ci] = torch.from_numpy(dn).to(d16.device)
                if mn is not None:
                    m16[:, ci] = torch.from_numpy(mn).to(m16.device)
        A, Q = self.A, None
        if self.codes is not None:   # a row whose d or m is kept keeps its codes too
            trained = self.cmask & ~bad[:, self.cidx]
            Q = torch.where(trained, self.hard_codes(), self.Q0)
            A = torch.where(trained, self.S * Q, self.A)
            self.codes_changed += int((Q != self.Q0).sum())
        out = []
        e = 0
        for ci, c in enumerate(self.src):
            s, e = e, e + c.g    # [s, e): this chunk's columns
            if not self.tuned_chunks[ci]:
                out.append(c)
                continue
            nc = copy.copy(c)
            nc.base = bases.get(ci, c.base)
            nc.d = d16[:, ci].cpu().numpy()
            nc.m = m16[:, ci].cpu().numpy() if c.m is not None else None
            if self.codes is not None and bool(self.cmask[s:e].any()):
                zc = blocks.block_type(c.action).zero_code
                keep = self.cmask[s:e].cpu().numpy()
                new = (Q[:, s:e].cpu().numpy() + zc).round().astype(np.uint8)
                nc.codes = np.where(keep[None, :], new, np.asarray(c.codes)[:, :c.g]).astype(np.uint8)
            if c.n_protected:   # the protected columns keep their weights: residual = old weight - new grid
                p = np.asarray(c.protected, dtype=np.int64)
                grid = copy.copy(nc)
                grid.protected = grid.residuals = None
                nc.residuals = (blocks.dequantize_chunk(c)[:, p] - blocks.dequantize_chunk(grid)[:, p]).astype(np.float16)
            out.append(nc)
        self.src = out
        self.d0.copy_(d16.float())
        self.m0.copy_(m16.float())
        self.a.zero_()
        self.b.zero_()
        if self.codes is not None:
            self.A.copy_(A)
            self.Q0.copy_(Q)
            self.codes.copy_(Q)
        return out


# ---------------------------------------------------------------- models with tunable linears

def _swap_linears(layer: nn.Module, li: int, chunks: dict[str, list[ChunkData]], device,
                  skipped: list[str], unprune=None, act_bits: int | None = None,
                  train_codes: bool = False) -> list[TunableLinear]:
    """Replace the seven projections of decoder layer `li` (in place) by TunableLinears that compute what the
    file's runtime does: the replaced linear's forward pre-hooks move over (a rotated model's x -> T(x),
    wqedge.rotation.rotate_model: the chunks were fitted on folded weights, which expect rotated inputs), then
    the input is fake-quantized per token at `act_bits` (None: float, as the reference at 8 bits)."""
    mods = []
    for hf, _ in PROJECTIONS:
        name = f"model.layers.{li}.{hf}.weight"
        parent_name, attr = hf.rsplit(".", 1)
        old = layer.get_submodule(hf)
        tl = TunableLinear(chunks[name], device, skipped, name, train_codes)
        if unprune is not None:
            shape = tuple(old.weight.shape)
            tl.expand = lambda w, name=name, shape=shape: unprune(name, w, shape)
        for hid, hook in old._forward_pre_hooks.items():
            tl.register_forward_pre_hook(hook, with_kwargs=hid in old._forward_pre_hooks_with_kwargs)
        tl.act_bits = act_bits
        setattr(layer.get_submodule(parent_name), attr, tl)
        mods.append(tl)
    return mods


def student_model(model, chunks: dict[str, list[ChunkData]], norms: dict[str, torch.Tensor], device=None,
                  act_bits: int | None = None, unprune=None, train_codes: bool = False):
    """A float32 copy of `model` whose decoder linears are TunableLinears of `chunks` (as `_swap_linears`: the
    model's input hooks, then activations at `act_bits`) and whose norms are `norms` where given: the quantized
    model distillation trains, which is the model the file written from the same chunks and norms defines."""
    from ..calib import default_device
    student = copy.deepcopy(model).to(default_device(device), torch.float32).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for li, layer in enumerate(student.model.layers):
        _swap_linears(layer, li, chunks, default_device(device), [], unprune, act_bits, train_codes)
    for name, w in norms.items():
        student.get_parameter(name).data.copy_(w)
    return student


def _norms(layer: nn.Module) -> list[nn.Parameter]:
    return [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]


def _relative_lr(lr: float, p: torch.Tensor, floor: float) -> float:
    """A learning rate scaled by the parameter's mean magnitude (at least floor): norms and the head differ by orders
    of magnitude between models, and AdamW's steps are in absolute units."""
    return lr * float(p.detach().abs().mean().clamp_min(floor))


def _optimizer(linears: list[TunableLinear], norms: list[nn.Parameter], lr: float, norm_lr: float, steps: int,
               code_lr: float = 0.0, extra_groups: list[dict] | None = None):
    for p in norms:
        p.requires_grad_(True)
    groups = [{"params": [p for tl in linears for p in (tl.a, tl.b)], "lr": lr}]
    codes = [tl.codes for tl in linears if tl.codes is not None]
    if codes and code_lr > 0:
        groups.append({"params": codes, "lr": code_lr})
    groups += [{"params": [p], "lr": _relative_lr(norm_lr, p, 1e-3)} for p in norms]
    groups += extra_groups or []
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    return opt, sched


def _batches(n: int, steps: int, batch: int, seed: int):
    """Window indices for each step: seeded permutations of 0..n-1, one after the other."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch / n) + 1)])
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def _peak_start(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> tuple[int, str]:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), f"{dev} allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


# ---------------------------------------------------------------- the two stages

def distill_model(model, chunks: dict[str, list[ChunkData]], tokens: torch.Tensor, heldout: torch.Tensor | None,
                  steps: int, e2e_steps: int = 0, device=None, batch_size: int = BATCH,
                  lr: float = LR, norm_lr: float = NORM_LR, e2e_lr: float = E2E_LR, seed: int = 0,
                  progress: Callable[[str], None] | None = None, unprune=None,
                  act_bits: int | None = None, code_lr: float = CODE_LR,
                  e2e_code_lr: float | None = None, e2e_ce: float = E2E_CE,
                  e2e_head_lr: float = E2E_HEAD_LR) -> DistillResult:
    """Tune `chunks` (every decoder linear of the fp transformers LlamaForCausalLM `model`, as fitted) on the
    calibration windows `tokens` [n, seqlen]; `heldout` windows only measure. `model` is left unchanged.

    steps: AdamW steps per decoder layer (block stage, MSE of the layer's output); e2e_steps: steps of the
    end-to-end KL stage after it (0: none); e2e_ce: the weight of the next-token cross-entropy on the calibration
    text in that stage's loss, (1 - e2e_ce)·KL + e2e_ce·CE (0: KL alone); e2e_head_lr > 0: that stage also trains an
    untied output head (float32 master, at this rate times its mean |weight|; `norms` then holds "lm_head.weight",
    which the writers quantize as they do the checkpoint's head). Each step takes `batch_size` windows.
    unprune(name, w, shape): for a pruning plan's chunks (kept rows and columns only), the kept weight in the
    model's shape with zeros where structures were removed (Plan.unprune_weight), so the unpruned fp layers stay the
    teachers. act_bits: the plan's activation bits when below 8: the student's linears quantize their inputs per
    token as the runtime does (straight-through gradients). A rotated model (wqedge.rotation.rotate_model: folded
    weights, input hooks) is its own teacher, and its hooks move onto the student's linears (`_swap_linears`).
    """
    from ..calib import _layer_call, _rotary, default_device

    steps = check_steps(steps)
    e2e_steps = check_steps(e2e_steps, "end-to-end distillation steps")
    if not (code_lr >= 0 and (e2e_code_lr is None or e2e_code_lr >= 0)):
        raise ValueError(f"code learning rates must be >= 0, got {code_lr!r} / {e2e_code_lr!r}")
    e2e_ce = check_ce_weight(e2e_ce)
    if not e2e_head_lr >= 0:
        raise ValueError(f"the head learning rate must be >= 0, got {e2e_head_lr!r}")
    if e2e_code_lr is None:   # the same rate: llama-s 2.5 b 6.652 against 6.681 at a fifth of it (distill_codes.md)
        e2e_code_lr = code_lr
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    missing = [f"model.layers.{li}.{hf}.weight" for li in range(len(model.model.layers)) for hf, _ in PROJECTIONS
               if f"model.layers.{li}.{hf}.weight" not in chunks]
    if missing:
        raise ValueError(f"no fitted chunks for {missing[0]} ({len(missing)} linears missing)")
    dev = default_device(device)
    t0 = time.time()
    _peak_start(dev)
    say = progress or (lambda s: None)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    heldout = tokens[:0] if heldout is None else torch.as_tensor(heldout, dtype=torch.long)
    n_tr = tokens.shape[0]
    allt = torch.cat([tokens, heldout])
    out_chunks = dict(chunks)
    norms: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    per_layer: list[dict] = []
    codes_changed = 0
    frozen_again: list[int] = []
    emb = model.model.embed_tokens
    emb_dev = next(emb.parameters()).device
    bs = batch_size
    with torch.no_grad():
        h_fp = torch.cat([emb(allt[i:i + bs].to(emb_dev)).to(dev, torch.float32) for i in range(0, len(allt), bs)])
    h_q = h_fp.clone()
    rot = model.model.rotary_emb
    rot_dev = next(iter(rot.buffers())).device
    rot.to(dev)
    pos = tuple(p.float() for p in _rotary(model, h_fp[:1]))

    def run(layer, h, grad=False):
        with torch.set_grad_enabled(grad):
            return torch.cat([_layer_call(layer, h[i:i + bs], pos) for i in range(0, len(h), bs)])

    def rel_mse(y, t):
        return float(((y - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-30))

    try:
        for li, layer in enumerate(model.model.layers):
            teacher = copy.deepcopy(layer).to(dev, torch.float32)
            for p in teacher.parameters():
                p.requires_grad_(False)
            target = run(teacher, h_fp)
            ho = slice(n_tr, len(allt))
            # with codes trained, a layer whose held-out error rises (too few windows: they overfit) and whose codes
            # moved is trained again with its codes frozen; the attempt of lower held-out error is kept
            best = None
            for train_codes in ([True, False] if code_lr > 0 else [False]):
                student = copy.deepcopy(teacher) if code_lr > 0 else teacher   # a retry starts from the fp layer
                tls = _swap_linears(student, li, chunks, dev, skipped, unprune, act_bits, train_codes)
                before = rel_mse(run(student, h_q[ho]), target[ho]) if len(heldout) else float("nan")
                if steps:
                    opt, sched = _optimizer(tls, _norms(student), lr, norm_lr, steps, code_lr if train_codes else 0.0)
                    for idx in _batches(n_tr, steps, bs, seed + li):
                        idx = idx.to(dev)
                        y = _layer_call(student, h_q[idx], pos)
                        loss = ((y - target[idx]) ** 2).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                for p in _norms(student):
                    p.requires_grad_(False)
                layer_chunks = {f"model.layers.{li}.{hf}.weight": tl.round_to_file()
                                for (hf, _), tl in zip(PROJECTIONS, tls)}
                moved = sum(tl.codes_changed for tl in tls)
                h_next = run(student, h_q)
                after = rel_mse(h_next[ho], target[ho]) if len(heldout) else float("nan")
                attempt = {"chunks": layer_chunks, "moved": moved, "h": h_next, "after": after, "codes": moved > 0,
                           "norms": [p.detach().float().cpu() for p in _norms(student)]}
                if best is None or after < best["after"]:
                    best = attempt
                del student, tls
                if not (train_codes and moved and after > before):
                    break
                frozen_again.append(li)
            out_chunks.update(best["chunks"])
            codes_changed += best["moved"]
            norms[f"model.layers.{li}.input_layernorm.weight"] = best["norms"][0]
            norms[f"model.layers.{li}.post_attention_layernorm.weight"] = best["norms"][1]
            h_next, after = best["h"], best["after"]
            h_q = h_next
            per_layer.append({"layer": li, "before": before, "after": after, "codes_trained": best["codes"]})
            mse = "" if not len(heldout) else f", held-out output MSE {before:.4g} -> {after:.4g} (relative)"
            again = "" if li not in frozen_again else (
                " (codes left as fitted: training them raised it)" if not best["codes"]
                else " (trained codes kept: lower than frozen)")
            say(f"distillation: layer {li + 1}/{len(model.model.layers)}{mse}{again}, {time.time() - t0:.0f} s")
            h_fp = target
            del teacher, best
        del h_fp, h_q
        e2e = None
        if e2e_steps:
            try:
                out_chunks, norms, e2e = _e2e(model, out_chunks, norms, tokens, heldout, e2e_steps, dev, bs, e2e_lr,
                                              norm_lr, seed, say, unprune, act_bits, e2e_code_lr, e2e_ce, e2e_head_lr)
                codes_changed += e2e["codes_changed"]
            except torch.cuda.OutOfMemoryError:   # the whole model at once did not fit: the block stage stands
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                say("distillation (end to end): out of GPU memory; keeping the block stage's result")
                e2e = {"before": float("nan"), "after": float("nan"), "steps": e2e_steps, "kept": False,
                       "codes_changed": 0, "out_of_memory": True}
    finally:
        rot.to(rot_dev)
    peak, what = _peak(dev)
    res = DistillResult(out_chunks, norms, time.time() - t0, peak, what, per_layer, e2e,
                        sorted(set(skipped)), codes_changed, code_lr, n_tr)
    return res


def _e2e(model, chunks, norms, tokens, heldout, steps, dev, bs, lr, norm_lr, seed, say, unprune, act_bits=None,
         code_lr: float = 0.0, ce: float = 0.0, head_lr: float = 0.0):
    """End-to-end stage: KL(fp || quantized) of the next-token distributions, all layers at once; with ce > 0 the
    loss is (1 - ce)·KL + ce·(cross-entropy of the text's next tokens), and the guard compares that held-out loss;
    with head_lr > 0 an untied output head trains too (a tied one stays: it is the embedding table as well)."""
    teacher = copy.deepcopy(model).to(dev, torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student_model(teacher, chunks, norms, dev, act_bits, unprune, code_lr > 0)
    tls = [layer.get_submodule(hf) for layer in student.model.layers for hf, _ in PROJECTIONS]
    norm_params = [p for layer in student.model.layers for p in _norms(layer)] + [student.model.norm.weight]
    head = student.lm_head.weight
    train_head = head_lr > 0 and head.data_ptr() != student.model.embed_tokens.weight.data_ptr()

    def losses(x):
        """(KL, the trained objective) of a batch of windows, means per position: the objective is the KL itself,
        or with ce > 0 (1 - ce)·KL + ce·(the text's next-token cross-entropy)."""
        with torch.no_grad():
            pt = torch.log_softmax(teacher(x).logits.float(), -1)
        ps = torch.log_softmax(student(x).logits.float(), -1)
        k = (pt.exp() * (pt - ps)).sum(-1).mean()
        if not ce:
            return k, k
        return k, (1 - ce) * k + ce * -ps[:, :-1].gather(-1, x[:, 1:, None]).mean()

    def heldout_losses() -> tuple[float, float]:
        """(held-out KL, held-out objective)."""
        if not len(heldout):
            return float("nan"), float("nan")
        tot = np.zeros(2)
        with torch.no_grad():
            for i in range(0, len(heldout), bs):
                x = heldout[i:i + bs].to(dev)
                tot += len(x) * np.array([float(v) for v in losses(x)])
        return tuple(tot / len(heldout))

    before, obj_before = heldout_losses()
    extra = []
    if train_head:
        head.requires_grad_(True)
        extra = [{"params": [head], "lr": _relative_lr(head_lr, head, 1e-6)}]
    opt, sched = _optimizer(tls, norm_params, lr, norm_lr, steps, code_lr, extra)
    for step, idx in enumerate(_batches(tokens.shape[0], steps, bs, seed + 10_000)):
        loss = losses(tokens[idx].to(dev))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            say(f"distillation (end to end): step {step + 1}/{steps}, {'KL' if not ce else 'loss'} {loss.item():.4g}")
    for p in norm_params + [head]:
        p.requires_grad_(False)
    out, new_norms = dict(chunks), dict(norms)
    if train_head:
        new_norms["lm_head.weight"] = head.detach().float().cpu()
    i = 0
    for li in range(len(student.model.layers)):
        for hf, _ in PROJECTIONS:
            out[f"model.layers.{li}.{hf}.weight"] = tls[i].round_to_file()
            i += 1
        layer = student.model.layers[li]
        new_norms[f"model.layers.{li}.input_layernorm.weight"] = layer.input_layernorm.weight.detach().float().cpu()
        new_norms[f"model.layers.{li}.post_attention_layernorm.weight"] = \
            layer.post_attention_layernorm.weight.detach().float().cpu()
    new_norms["model.norm.weight"] = student.model.norm.weight.detach().float().cpu()
    after, obj_after = heldout_losses()
    res = {"before": before, "after": after, "steps": steps, "kept": True,
           "codes_changed": sum(tl.codes_changed for tl in tls)}
    if ce:
        res.update(ce=ce, objective_before=obj_before, objective_after=obj_after)
    if train_head:
        res.update(head_lr=head_lr)
    if obj_after > obj_before:   # the held-out loss rose (3.25 b, or a code rate too high): keep the block stage's
        say(f"distillation (end to end): held-out {'KL' if not ce else 'loss'} {obj_before:.4g} -> {obj_after:.4g}; "
            "keeping the block stage's result")
        return chunks, norms, {**res, "kept": False, "codes_changed": 0}
    return out, new_norms, res


def _weights(spec) -> tuple[int, int]:
    """(decoder linear weights, embedding and head weights) of a model: what the memory estimates scale with."""
    p = sum(lin.in_features * lin.out_features for lin in spec.linears())
    return p, spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)


def e2e_stage_bytes(spec, train_codes: bool, batch_size: int = BATCH, seqlen: int = 512) -> int:
    """About what the end-to-end stage holds on its device (the whole model at once, float32): the resident planning
    model and the teacher (2 per weight), the student's TunableLinears (A, B and the fixed rest: 3 per weight;
    trained codes add a latent, its gradient and Adam's two moments: 4 more), the models' other tensors, the logits
    of one batch (teacher, student, softmax and gradient: about 6 copies) and the student's saved activations (per
    token and layer about 10 hidden-wide and 4 FFN-wide vectors and 3 rows of attention scores per head). llama-s:
    2.7 GiB estimated, 3.0-3.3 GiB peak measured (bench/results/distill_codes.md). The block stage holds one layer
    at a time."""
    p, e = _weights(spec)
    tokens = batch_size * seqlen
    acts = tokens * spec.n_layers * (10 * spec.hidden_size + 4 * spec.intermediate_size + 3 * spec.n_heads * seqlen)
    return 4 * (p * (2 + 3 + (4 if train_codes else 0)) + 3 * e + 6 * tokens * spec.vocab_size + acts)


def block_stage_bytes(spec, windows: int, seqlen: int = 512, n_heldout: int = 4) -> int:
    """About what the block stage holds on its device: three float32 hidden-state tensors over all windows (the fp
    model's, the quantized model's, one layer's target), the resident planning model (fp16) and one layer's teacher
    and student (float32, trained codes' latents and Adam moments included). llama-s at 512 windows: 1.6 GiB
    estimated; the measured peak of the whole distillation (end-to-end stage included) was 3.8 GiB."""
    p, e = _weights(spec)
    hidden = 3 * (windows + n_heldout) * seqlen * spec.hidden_size * 4
    return hidden + 2 * (p + e) + 4 * 9 * p // max(spec.n_layers, 1)


# ---------------------------------------------------------------- checkpoint-level entry points

def distill_checkpoint(ckpt, chunks: dict[str, list[ChunkData]], calib_text, steps: int,
                       e2e_steps: int = 0, device=None, n_seqs: int | None = None, seqlen: int = 512,
                       n_heldout: int = 4, seed: int = 0, progress: Callable[[str], None] | None = None,
                       unprune=None, act_bits: int | None = None, code_lr: float = CODE_LR,
                       min_code_windows: int = 0, e2e_needs_heldout: bool = False,
                       e2e_ce: float = E2E_CE, e2e_head_lr: float = E2E_HEAD_LR) -> DistillResult:
    """distill_model on a checkpoint's fp model and `calib_text` (the windows error feedback takes). A
    wqedge.rotation.RotatedCheckpoint gives its rotated planning model, whose hooks the student keeps.

    The text may hold fewer windows than asked for (self-calibration's ~16): codes are trained only with at least
    `min_code_windows` training windows and some held-out ones (without those the guards cannot see overfitting),
    and with e2e_needs_heldout (the default's stage, not one asked for) the end-to-end stage only with held-out
    windows."""
    from transformers import AutoTokenizer

    from ..calib import calibration_tokens, default_device
    from .feedback import FEEDBACK_SEQS
    steps = check_steps(steps)
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, n_seqs or FEEDBACK_SEQS, seqlen, n_heldout, bos_id=bos, seed=seed)
    say = progress or (lambda m: None)
    n_tr, n_ho = int(cs.train.shape[0]), int(cs.heldout.shape[0])
    if code_lr > 0 and (n_tr < min_code_windows or not n_ho):
        say(f"distillation: codes frozen: the calibration text gives {n_tr} training and {n_ho} held-out windows "
            f"(trained codes need {min_code_windows} and some held out)")
        code_lr = 0.0
    elif code_lr > 0:
        say(f"distillation: codes trained (latent codes, {code_lr:g} per step) on {n_tr} windows, {n_ho} held out")
    else:
        say("distillation: codes frozen")
    if e2e_steps and e2e_needs_heldout and not n_ho:
        say("distillation: no end-to-end stage: the calibration text leaves no held-out windows to check it on")
        e2e_steps = 0
    model = ckpt.load_planning_model(default_device(device))
    return distill_model(model, chunks, cs.train, cs.heldout, steps, e2e_steps, device, seed=seed, progress=progress,
                         unprune=unprune, act_bits=act_bits, code_lr=code_lr, e2e_ce=e2e_ce,
                         e2e_head_lr=e2e_head_lr)


class TunedCheckpoint(CheckpointView):
    """A checkpoint whose norm tensors (and output head, when distillation trained it) are the distilled ones, as read
    (`get`, what the writers read) and as loaded (`load_hf_model`: the model the file holds, up to its codes);
    everything else is read from `ckpt`."""

    def __init__(self, ckpt, norms: dict[str, torch.Tensor]):
        super().__init__(ckpt)
        self._norms = norms

    def view_key(self) -> str:
        return "tuned:" + ",".join(sorted(self._norms))

    def get(self, name: str) -> torch.Tensor:
        return self._norms[name].clone() if name in self._norms else self._ckpt.get(name)

    def transform_model(self, model):
        with torch.no_grad():
            for name, w in self._norms.items():
                p = model.get_parameter(name)
                p.copy_(w.to(p.device, p.dtype))
        return model
