"""RUQuant: orthogonal transforms that make a linear's input activations uniform (stage 1, and stage 2's
learnt reflection).

Why: a uniform (affine) quantizer reconstructs each interval at its midpoint, which is MSE-optimal only
when the values inside are uniformly distributed (Lloyd-Max). LLaMA activations are not: a few channels
carry outliers far larger than the rest, so a per-token grid wastes almost all its levels on them. An
orthogonal transform M of the input, with the inverse folded into the weights (W x = (W Mᵀ)(M x)), leaves
the product unchanged but lets the quantizer see M x, which we build to be as uniform as possible
(../shared/docs/METHODS.md §3, arXiv 2604.04013).

One `Transform` per transform group of a decoder layer (the linears that read the same input: q/k/v,
o, gate/up, down). Applied to an input x [..., d] it computes

    x' = H · R2 · P · R1 · (x / s)

* s: SmoothQuant-style per-channel scales (optional), s_j = max|x_j|^α / max_i|W_ij|^(1-α): moves part
  of an activation outlier into the weights, where it costs less.
* R1, R2: block-diagonal orthogonal matrices (`BlockRotation`): one B×B matrix shared by every full
  block of B channels, plus one for a ragged last block when B does not divide d. Each is built greedily
  (`greedy_rotation`): Householder reflections of the worst block vector onto a uniform target, then
  rounds of a random permutation with Givens rotations of coordinate pairs towards uniform pairs.
* P: the zig-zag permutation (`zigzag_permutation`), which deals the channels, largest first, over the
  blocks so that no block keeps several outliers.
* H: one global Householder reflection x - 2 (v·x) v with a unit vector v (O(d) per token); stage 1 aims it at
  the worst token, stage 2 (`learn_reflection`, optional) learns v on the group's quantized output error.

R1 and R2 are built orthogonal, then stored as int8 codes with per-row scales (`quantize_rows`): a quarter
of float32's bytes, which the runtime streams once per token. The model uses exactly those matrices, and
`fold_into_weight(W) = W diag(s) M⁻¹` takes their exact inverse, so W' x' = W x. Construction is seeded
and runs in float64.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .actquant import work_dtype
from .checkpoint import CheckpointView
from .rotation_format import DEFAULT_BLOCK, LEGACY_BLOCK, MAX_INT8_BLOCK, identity_matrix

BLOCK = DEFAULT_BLOCK  # B: channels per block (32; why: rotation_format.DEFAULT_BLOCK)
N_REFLECTIONS = 16   # K: greedy Householder steps per block matrix
N_GIVENS_ROUNDS = 3  # rounds of random permutation + B/2 Givens rotations
SMOOTH_ALPHA = 0.6


# ---------------------------------------------------------------- targets and elementary transforms

def _uniform_target(n: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A vector with entries drawn uniformly from [-1, 1], rescaled to `norm`: what we want a block to look like."""
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    return t * (norm / max(float(t.norm()), 1e-300))


def householder_to(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """The unit vector u of the reflection I - 2uuᵀ that maps y onto t (||y|| = ||t||); None if y == t."""
    u = y - t
    n = float(u.norm())
    return None if n <= 1e-12 * max(float(y.norm()), 1e-300) else u / n


def reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x - 2 (u·x) u along the last dimension (u a unit vector): a Householder reflection, never a matrix."""
    return x - 2 * (x @ u).unsqueeze(-1) * u


def _givens_round(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An orthogonal b×b matrix: random disjoint coordinate pairs, each rotated so that y's pair lands on a
    uniform random pair of the same norm (a Givens rotation per pair; an odd coordinate is left alone)."""
    b = y.numel()
    g = torch.eye(b, dtype=torch.float64)
    perm = torch.randperm(b, generator=gen)
    for k in range(b // 2):
        p, q = int(perm[2 * k]), int(perm[2 * k + 1])
        a, c = float(y[p]), float(y[q])
        ta, tc = _uniform_target(2, math.hypot(a, c), gen).tolist()
        theta = math.atan2(tc, ta) - math.atan2(c, a)   # rotate (a, c) by theta onto (ta, tc)
        co, si = math.cos(theta), math.sin(theta)
        g[p, p], g[p, q], g[q, p], g[q, q] = co, -si, si, co
    return g


def _worst_row(y: torch.Tensor) -> torch.Tensor:
    """The sample row holding the largest |value|: the one a per-token grid suffers most from."""
    return y[int(y.abs().amax(1).argmax())]


def greedy_rotation(v: torch.Tensor, gen: torch.Generator, n_reflections: int = N_REFLECTIONS,
                    n_rounds: int = N_GIVENS_ROUNDS) -> torch.Tensor:
    """An orthogonal b×b matrix R (float64) built from sample block vectors v [n, b].

    K times: reflect the block vector with the largest |value| (after the R so far) onto a uniform target
    of the same norm, which spreads its outlier over the whole block. Then `n_rounds` rounds of a random
    permutation plus Givens rotations of pairs towards uniform pairs, which smooth what the reflections left.
    The rotated samples y = v Rᵀ are updated alongside R, so a step costs O(n b), not O(n b²).
    """
    b = v.shape[1]
    r = torch.eye(b, dtype=torch.float64)
    if b < 2 or v.shape[0] == 0:
        return r
    y = v.double().clone()
    for _ in range(n_reflections):
        worst = _worst_row(y)
        u = householder_to(worst, _uniform_target(b, float(worst.norm()), gen))
        if u is not None:
            r = reflect(r.T, u).T          # (I - 2uuᵀ) R
            y = reflect(y, u)
    for _ in range(n_rounds):
        g = _givens_round(_worst_row(y), gen)
        r = g @ r
        y = y @ g.T
    return r


# ---------------------------------------------------------------- block-diagonal rotation

def quantize_rows(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 per-row scales of a matrix: R ≈ diag(scale) codes, scale = max|row| / 127.
    Why: the runtime streams the matrices once per token, and int8 codes are a quarter of float32's bytes; the
    matrix the model uses *is* diag(scale) codes, and the weights are folded with its exact inverse, so the
    rounding changes no product, only how orthogonal the transform is (~1e-2)."""
    r = r.double()
    scale = (r.abs().amax(1) / 127).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    codes = torch.round(r / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def _int_block_product(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diag(scale) codes applied along the last dimension, in the runtime's order: (x codesᵀ) · scale; in float32
    (the runtime's precision), or in float64 for a float64 x (stage 2's problem, `Stage2Problem.make`)."""
    dt = work_dtype(x)
    return (x.to(dt) @ codes.to(x.device, dt).T) * scale.to(x.device, dt)


@dataclass
class BlockRotation:
    """Block-diagonal matrix: `full` (B×B) on every full block of B channels, `tail` on the rest.

    Built (`build`) as an orthogonal matrix, then stored as int8 codes with per-row scales (`quantize_rows`):
    `full` is then diag(full_scale) full_codes. A transform read from a format-2 file has float32 matrices
    only (codes None)."""
    dim: int
    full: torch.Tensor                 # float32 [B, B] (unused, [B, B] identity, when d < B)
    tail: torch.Tensor | None = None   # float32 [d mod B, d mod B], when B does not divide d
    full_codes: torch.Tensor | None = None   # int8 [B, B]: full = diag(full_scale) full_codes
    full_scale: torch.Tensor | None = None   # float32 [B]
    tail_codes: torch.Tensor | None = None
    tail_scale: torch.Tensor | None = None

    @property
    def block(self) -> int:
        return self.full.shape[0]

    @property
    def n_full(self) -> int:
        return self.dim // self.block

    @property
    def integer(self) -> bool:
        """True when the matrices are int8 codes with row scales (format 3)."""
        return self.full_codes is not None

    @classmethod
    def from_codes(cls, dim: int, full_codes: torch.Tensor, full_scale: torch.Tensor,
                   tail_codes: torch.Tensor | None = None, tail_scale: torch.Tensor | None = None) -> "BlockRotation":
        """The int8 matrices with their row scales, `full` and `tail` being diag(scale) codes."""
        deq = lambda c, sc: None if c is None else c.float() * sc[:, None]  # noqa: E731
        return cls(dim, deq(full_codes, full_scale), deq(tail_codes, tail_scale), full_codes, full_scale, tail_codes,
                   tail_scale)

    @classmethod
    def quantized(cls, dim: int, full: torch.Tensor, tail: torch.Tensor | None) -> "BlockRotation":
        return cls.from_codes(dim, *quantize_rows(full), *(quantize_rows(tail) if tail is not None else (None, None)))

    def _blockwise(self, x: torch.Tensor, fn) -> torch.Tensor:
        """fn(v, full) on the [..., n_full, B] view of the whole blocks (full=True) and on the ragged tail (False),
        concatenated along the last dimension: the one block loop of apply, its inverse and `Transform.matrix`."""
        nf, b = self.n_full, self.block
        y = fn(x[..., : nf * b].reshape(*x.shape[:-1], nf, b), True).reshape(*x.shape[:-1], nf * b)
        return y if self.tail is None else torch.cat([y, fn(x[..., nf * b:], False)], -1)

    def matrix_of(self, full: bool) -> torch.Tensor:
        return self.full if full else self.tail

    @functools.cached_property
    def is_identity(self) -> bool:
        """True when every matrix is the identity (rotation_format.identity_matrix: float, or int8 codes 127·I with
        row scales 1/127, which the runtime skips as it skips float identities); apply is then exactly x. Found
        once per matrix, not per apply."""
        def np_(a):
            return None if a is None else a.detach().cpu().numpy()
        return (identity_matrix(np_(self.full if self.full_codes is None else self.full_codes), np_(self.full_scale))
                and identity_matrix(np_(self.tail if self.tail_codes is None else self.tail_codes),
                                    np_(self.tail_scale)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """R x along the last dimension (x [..., d])."""
        if self.is_identity:
            return x
        if self.integer:
            return self._blockwise(x, lambda v, full: _int_block_product(
                v, *((self.full_codes, self.full_scale) if full else (self.tail_codes, self.tail_scale))).to(x.dtype))
        return self._blockwise(x, lambda v, full: v @ self.matrix_of(full).to(x.device, x.dtype).T)

    def apply_inverse_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """R⁻ᵀ x along the last dimension, i.e. x R⁻¹ for row vectors: what folding into weights needs. An
        orthogonal (float) R uses Rᵀ⁻ᵀ = R, exactly the old fold; an int8 R its exact inverse (float64)."""
        if self.is_identity:
            return x
        if not self.integer:
            return self.apply(x)
        return self._blockwise(x, lambda v, full: (
            v.double() @ torch.linalg.inv(self.matrix_of(full).double()).to(x.device)).to(x.dtype))

    @classmethod
    def build(cls, x: torch.Tensor, gen: torch.Generator, block: int = BLOCK) -> "BlockRotation":
        """Greedy matrices from activation samples x [T, d]: the full blocks' vectors are pooled into one
        set (the matrix is shared), the ragged tail gets its own; then stored as int8 rows (`quantized`)."""
        if block > MAX_INT8_BLOCK:
            raise ValueError(f"rotation block {block} is above {MAX_INT8_BLOCK}, the largest int8 block matrix "
                             f"format 3 stores")
        d = x.shape[1]
        nf = d // block
        x = x.double()
        full = torch.eye(block, dtype=torch.float64)
        if nf:
            full = greedy_rotation(x[:, : nf * block].reshape(-1, block), gen)
        tail = greedy_rotation(x[:, nf * block:], gen) if d % block else None
        return cls.quantized(d, full, tail)



def zigzag_permutation(max_abs: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """perm [d] such that x[..., perm] deals channels over blocks in zig-zag order of descending max |x|.

    The largest channel goes to block 0, the next to block 1, ... the n-th to the last block, then back
    (last, ..., 0), and so on; a full block is skipped (the ragged last block fills early). Each block ends
    up with a similar share of outliers, so the second rotation has something to spread them against.
    """
    d = max_abs.numel()
    sizes = [min(block, d - s) for s in range(0, d, block)]
    slots: list[list[int]] = [[] for _ in sizes]
    order = torch.argsort(max_abs.double(), descending=True, stable=True).tolist()
    nb, step, bi = len(sizes), 1, 0
    for ch in order:
        while len(slots[bi]) >= sizes[bi]:
            bi, step = _zigzag_next(bi, step, nb)
        slots[bi].append(ch)
        bi, step = _zigzag_next(bi, step, nb)
    return torch.tensor([c for s in slots for c in s], dtype=torch.long)


def _zigzag_next(bi: int, step: int, nb: int) -> tuple[int, int]:
    """Next block index of 0, 1, ..., nb-1, nb-1, ..., 0, 0, 1, ... (bounces, repeating the ends)."""
    if 0 <= bi + step < nb:
        return bi + step, step
    return bi, -step


# ---------------------------------------------------------------- smoothing

def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant scales s_j = max|x_j|^α / max_i|W_ij|^(1-α) over every weight of the group (x / s, W diag(s))."""
    w_max = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _dense_block(r: BlockRotation, x: torch.Tensor) -> torch.Tensor:
    """R x in float64 with the matrices as stored: for `Transform.matrix`."""
    return r._blockwise(x, lambda v, full: v @ r.matrix_of(full).double().T)


# ---------------------------------------------------------------- the transform of one group

@dataclass
class Transform:
    """x' = H R2 P R1 (x / s) for one transform group; see the module docstring."""
    r1: BlockRotation
    perm: torch.Tensor                 # long [d]: x[..., perm]
    r2: BlockRotation
    v: torch.Tensor                    # float32 [d], unit (a zero vector means no reflection)
    smooth: torch.Tensor | None = None # float32 [d] or None

    @property
    def dim(self) -> int:
        return self.r1.dim

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The orthogonal part M x = H R2 P R1 x along the last dimension."""
        x = self.r2.apply(self.r1.apply(x)[..., self.perm.to(x.device)])
        return reflect(x, self.v.to(x.device, x.dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x' = M (x / s): what the quantizer sees at run time."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.device, x.dtype)
        return self.rotate(x)

    def fold_into_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W diag(s) M⁻¹, so that W' apply(x) = W x. Row i of
        W M⁻¹ is M⁻ᵀ = H R2⁻ᵀ P R1⁻ᵀ applied to row i of W (Mᵀ when R1, R2 are orthogonal float matrices)."""
        if self.smooth is not None:
            w = w * self.smooth.to(w.device, w.dtype)
        w = self.r2.apply_inverse_transpose(self.r1.apply_inverse_transpose(w)[..., self.perm.to(w.device)])
        return reflect(w, self.v.to(w.device, w.dtype))

    def matrix(self) -> torch.Tensor:
        """The dense d×d M (for tests and inspection; never needed to run): H R2 P R1 with the matrices as
        stored (diag(scale) codes: orthogonal within ~1e-2)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        y = _dense_block(self.r1, eye)[..., self.perm]
        y = _dense_block(self.r2, y)
        return reflect(y, self.v.double()).T.float()

    @classmethod
    def identity(cls, d: int, block: int = BLOCK) -> "Transform":
        """No transform: float identity matrices (applied in float, as a format-2 file's)."""
        eye = torch.eye(block)
        tail = torch.eye(d % block) if d % block else None
        return cls(BlockRotation(d, eye, tail), torch.arange(d), BlockRotation(d, eye.clone(), tail),
                   torch.zeros(d))


def build_transform(x: torch.Tensor, seed: int = 0, block: int = BLOCK, smooth: torch.Tensor | None = None,
                    global_reflection: bool = True) -> Transform:
    """Stage 1 from calibration activations x [T, d] of one group (outlier tokens such as BOS left out by the
    caller if wanted). `smooth` (from `smooth_scales`) is divided out before the rotations are fitted.
    Deterministic for a given (x, seed)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    if smooth is not None:
        x = x / smooth.double()
    r1 = BlockRotation.build(x, gen, block)
    y = r1.apply(x)
    perm = zigzag_permutation(y.abs().amax(0), block)
    y = y[:, perm]
    r2 = BlockRotation.build(y, gen, block)
    y = r2.apply(y)
    v = torch.zeros(x.shape[1], dtype=torch.float64)
    if global_reflection:
        worst = y[int(y.abs().amax(1).argmax())]
        u = householder_to(worst, _uniform_target(worst.numel(), float(worst.norm()), gen))
        if u is not None:
            v = u
    return Transform(r1, perm, r2, v.float(), None if smooth is None else smooth.float())


# ---------------------------------------------------------------- a whole model

@torch.no_grad()
def group_activations(model, tokens: torch.Tensor, skip_first: bool = True,
                      batch_size: int = 4) -> dict[tuple[int, int], torch.Tensor]:
    """Inputs of every transform group of a transformers LlamaForCausalLM on calibration windows tokens [n, L]:
    {(layer, group index in wqedge.calib.INPUT_GROUPS): float32 [tokens, d]}. Position 0 (BOS, whose
    "massive activations" are a per-token grid's problem only for that one token) is left out by default,
    so that the greedy steps are spent on the outliers of ordinary tokens."""
    from .calib import INPUT_GROUPS

    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for gi, group in enumerate(INPUT_GROUPS):
            def hook(mod, args, key=(li, gi)):
                x = args[0][:, 1:] if skip_first else args[0]
                out.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).float().cpu())
            hooks.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def group_weights(model, li: int, gi: int, cols: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The weights [N, d] of the linears of group gi in layer li (what smoothing balances against); with `cols`,
    those input columns only."""
    from .calib import INPUT_GROUPS

    layer = model.model.layers[li]
    ws = [layer.get_submodule(name).weight.detach().float() for name in INPUT_GROUPS[gi]]
    return ws if cols is None else [w[:, cols] for w in ws]


def build_model_transforms(model, acts: dict[tuple[int, int], torch.Tensor], seed: int = 0,
                           smooth_alpha: float | None = None, block: int = BLOCK,
                           columns: dict[tuple[int, int], torch.Tensor] | None = None) -> dict[tuple[int, int], Transform]:
    """One stage-1 Transform per group from `group_activations`; smoothing when smooth_alpha is given.
    Each group gets its own seed (seed, layer, group), so the result does not depend on build order. `columns`
    (`pruned_columns`): the acts of those groups are the kept columns already, and so are the weights smoothed."""
    out = {}
    for (li, gi), x in sorted(acts.items()):
        s = None
        if smooth_alpha is not None:
            s = smooth_scales(x.abs().amax(0), group_weights(model, li, gi, (columns or {}).get((li, gi))), smooth_alpha)
        out[(li, gi)] = build_transform(x, seed=group_seed(seed, li, gi), block=block, smooth=s)
    return out


# ---------------------------------------------------------------- stage 2: learn the global reflection

STAGE2_LR = 1e-2       # (steps: wqedge.pipeline.STAGE2_STEPS)
STAGE2_TOKENS = 256    # calibration tokens per group the output error is measured on


def _fake_quant_weight(w: torch.Tensor, bits: int | None, group: int) -> torch.Tensor:
    """Training surrogate of the weight quantizer: min-max per row of each `group`-column chunk at `bits` (1-8;
    None: float weights), straight-through gradients. The final weights are fitted by the plan's own fitters
    afterwards, not by this; it only lets stage 2 see that the folded weights will be quantized too."""
    if bits is None:
        return w
    hi_code = (1 << int(bits)) - 1
    n, d = w.shape
    pad = -d % group
    wf = torch.nn.functional.pad(w.detach().to(work_dtype(w)), (0, pad)).reshape(n, -1, group)
    if pad:   # the ragged last chunk's padding must not widen its range: repeat its first column instead
        wf[:, -1, group - pad:] = wf[:, -1, :1]
    lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    s = ((hi - lo) / hi_code).clamp(min=1e-8)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(wf / s) + z, 0, hi_code)
    wq = (s * (q - z)).reshape(n, -1)[:, :d].to(w.dtype)
    return w + (wq - w).detach() if w.requires_grad else wq


@dataclass
class Stage2Problem:
    """What stage 2 minimises for one group, with everything before the reflection applied once: the sampled
    calibration tokens after s, R1, P, R2 (z), the group's weights folded through the same (us), and the
    fp outputs W xᵀ (targets) with their mean squares (norms). All in float64: float32 sums round differently
    with another BLAS or thread count, and through the quantizers' roundings and 20 AdamW steps that moved the learnt
    vector by up to 4e-2 between 1 and 2 threads (llama-s width); float64's differences (~1e-16) stay below a float32
    step of the stored vector."""
    z: torch.Tensor
    us: list[torch.Tensor]
    targets: list[torch.Tensor]
    norms: list[float]
    act_bits: int
    weight_bits: int | None
    group: int

    @classmethod
    def make(cls, t: Transform, x: torch.Tensor, weights: list[torch.Tensor], act_bits: int = 4,
             weight_bits: int | None = 4, group: int = 128, max_tokens: int = 1024) -> "Stage2Problem":
        if x.shape[0] > max_tokens:   # evenly spread, deterministic
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
        x = x.double()
        before = Transform(t.r1, t.perm, t.r2, torch.zeros_like(t.v), t.smooth)   # everything but the reflection
        targets = [x @ w.double().T for w in weights]
        return cls(before.apply(x), [before.fold_into_weight(w.double()) for w in weights], targets,
                   [float(y.pow(2).mean()) for y in targets], act_bits, weight_bits, group)

    def loss(self, u: torch.Tensor) -> torch.Tensor:
        """Σ_W ||Q_w(W') Q_a(x')ᵀ - W xᵀ||² / ||W xᵀ||² (means) with the reflection of the unit vector u
        (used as given: a zero u means no reflection)."""
        from .actquant import fake_quant
        zq = fake_quant(reflect(self.z, u), self.act_bits)
        total = 0.0
        for uw, y, n in zip(self.us, self.targets, self.norms):
            wq = _fake_quant_weight(reflect(uw, u), self.weight_bits, self.group)
            total = total + (zq @ wq.T - y).pow(2).mean() / n
        return total

    @torch.no_grad()
    def value(self, t: Transform) -> float:
        """The loss of transform `t` (whose stages before the reflection must be the problem's)."""
        return float(self.loss(t.v.double()))


def learn_reflection(t: Transform, x: torch.Tensor, weights: list[torch.Tensor], act_bits: int = 4,
                     weight_bits: int | None = 4, group: int = 128, steps: int = 30, lr: float = 1e-2,
                     max_tokens: int = 1024, seed: int = 0) -> tuple[Transform, list[float]]:
    """Stage 2: choose the global Householder vector v of `t` by minimising the group's output error

        Σ_W ||Q_w(W') Q_a(x')ᵀ - W xᵀ||² / ||W xᵀ||²   over calibration tokens x [T, d]

    (`Stage2Problem.loss`) with AdamW on an unconstrained vector (v / ||v|| always gives an orthogonal
    reflection) and straight-through quantizers. Everything before the reflection is fixed, so it is applied
    once to the samples and to the weights. Returns the transform with the best v seen and the loss history
    (steps + 1 values, as seen in training). The best v is chosen again by the exact loss without gradients
    against stage 1's own v, so `Stage2Problem.value` of the result never exceeds that of `t` (`t` itself is
    returned when nothing beat it)."""
    g = torch.Generator().manual_seed(seed)
    prob = Stage2Problem.make(t, x, weights, act_bits, weight_bits, group, max_tokens)
    v0 = t.v.clone() if float(t.v.norm()) > 0 else torch.randn(t.dim, generator=g)
    v = torch.nn.Parameter(v0.double())
    opt = torch.optim.AdamW([v], lr=lr, weight_decay=0.0)
    best_u, best, history = None, float("inf"), []
    for _ in range(steps + 1):
        opt.zero_grad()
        u = v / v.norm()
        loss = prob.loss(u)
        history.append(float(loss.detach()))
        if history[-1] < best:
            best, best_u = history[-1], u.detach().clone()
        loss.backward()
        opt.step()
    if best_u is None:
        return t, history
    t2 = Transform(t.r1, t.perm, t.r2, best_u.float(), t.smooth)
    return (t2 if prob.value(t2) < prob.value(t) else t), history


# ---------------------------------------------------------------- stored form, and rotated models/checkpoints

def to_stored(t: Transform):
    """The arrays the GGUF stores (wqedge.rotation_format.StoredTransform): int8 codes and row scales for
    integer matrices (format 3), float32 matrices otherwise (format 2)."""
    from .rotation_format import StoredTransform

    def np_(a):
        return None if a is None else a.detach().cpu().numpy()

    def mats(r: BlockRotation):
        if r.integer:
            return (np_(r.full_codes), np_(r.tail_codes), np_(r.full_scale), np_(r.tail_scale))
        return (np_(r.full).astype("float32"), np_(r.tail), None, None)
    r1, r1t, r1s, r1ts = mats(t.r1)
    r2, r2t, r2s, r2ts = mats(t.r2)
    return StoredTransform(r1, r1t, np_(t.perm).astype("int32"), r2, r2t, np_(t.v).astype("float32"),
                           np_(t.smooth), r1s, r1ts, r2s, r2ts)


def from_stored(st) -> Transform:
    """A Transform from a StoredTransform (exactly the stored values: int8 codes and scales, or float32)."""
    def t_(a, dtype=torch.float32):
        return None if a is None else torch.from_numpy(a.copy()).to(dtype)
    d = st.dim

    def block(m, tail, scale, tail_scale):
        if scale is None:
            return BlockRotation(d, t_(m), t_(tail))
        return BlockRotation.from_codes(d, t_(m, torch.int8), t_(scale), t_(tail, torch.int8), t_(tail_scale))
    return Transform(block(st.r1, st.r1_tail, st.r1_scale, st.r1_tail_scale), t_(st.perm, torch.long),
                     block(st.r2, st.r2_tail, st.r2_scale, st.r2_tail_scale), t_(st.householder), t_(st.smooth))


def apply_on_columns(t: Transform, x: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """T(x) along the last dimension; with `cols` (a pruned model seen in its unpruned shape, wqedge.masked), T of
    the kept columns in their places and zeros in the removed ones, which the masked weights never read."""
    if cols is None:
        return t.apply(x)
    y = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    y[..., cols.to(x.device)] = t.apply(x[..., cols.to(x.device)])
    return y


def fold_on_columns(t: Transform, w: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """W' = W diag(s) M⁻¹ (`Transform.fold_into_weight`); with `cols`, of the kept columns only, zeros elsewhere."""
    if cols is None:
        return t.fold_into_weight(w)
    out = torch.zeros_like(w)
    c = cols.to(w.device)
    out[:, c] = t.fold_into_weight(w[:, c]).to(w.dtype)
    return out


def pruned_columns(pruning, n_layers: int) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, group): kept input columns} of the groups a pruning narrows (o: the kept heads' channels, down: the
    kept FFN channels): there the transform is built on, and applies to, those columns only."""
    out = {}
    for li in range(n_layers):
        for gi, proj in ((1, "o_proj"), (3, "down_proj")):
            cols = pruning.kept(li, proj)[1]
            full = pruning.original_shape(li, proj, (1, len(cols)))[1]
            if len(cols) < full:
                out[(li, gi)] = torch.from_numpy(cols).long()
    return out


def rotate_model(model, transforms: dict[tuple[int, int], Transform], fold: bool = True,
                 columns: dict[tuple[int, int], torch.Tensor] | None = None):
    """Make a transformers LlamaForCausalLM (in place) compute with rotated inputs: each decoder linear gets
    a forward pre-hook x -> T(x) and (fold=True) its weight replaced by the folded W' = W diag(s) Mᵀ, so the
    model's outputs are unchanged. The hook is registered first, so hooks added later (wqedge.calib's
    statistics) see the rotated input, which is what the folded weights are fitted against. `columns`
    (`pruned_columns`): groups whose transform covers only the kept columns of a masked model. Returns the model."""
    from .calib import INPUT_GROUPS

    columns = columns or {}
    for (li, gi), t in transforms.items():
        layer = model.model.layers[li]
        cache: dict = {}
        cols = columns.get((li, gi))

        def pre(mod, args, t=t, cache=cache, cols=cols):
            x = args[0]
            if cache.get("x") is not x:   # q/k/v (gate/up) read the same tensor: transform it once
                cache["x"], cache["y"] = x, apply_on_columns(t, x.float(), cols).to(x.dtype)
            return (cache["y"],) + tuple(args[1:])
        for name in INPUT_GROUPS[gi]:
            mod = layer.get_submodule(name)
            if fold:
                w = mod.weight.data
                mod.weight.data = fold_on_columns(t, w.float(), cols).to(w.dtype)
            mod.register_forward_pre_hook(pre)
    return model


class RotatedCheckpoint(CheckpointView):
    """A checkpoint whose decoder linears are read folded (W' = W diag(s) Mᵀ) and whose models run the input
    transforms, so that any plan/allocator/fitter quantizes the rotated weights without knowing about it.
    `columns` (`pruned_columns`): for a pruned model seen masked (wqedge.masked.MaskedCheckpoint), the groups whose
    transforms cover the kept columns only."""

    def __init__(self, ckpt, transforms: dict[tuple[int, int], Transform],
                 columns: dict[tuple[int, int], torch.Tensor] | None = None):
        super().__init__(ckpt)
        self.transforms, self.columns = transforms, dict(columns or {})

    def _group_of(self, name: str) -> tuple[int, int] | None:
        from .calib import INPUT_GROUPS
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers" or not name.endswith(".weight"):
            return None
        sub = ".".join(parts[3:-1])
        for gi, group in enumerate(INPUT_GROUPS):
            if sub in group:
                return (int(parts[2]), gi)
        return None

    def _fold(self, name: str, w: torch.Tensor, as_float: bool = False) -> torch.Tensor:
        """w folded by its group's transform (as float32 when as_float); w itself, as read, outside every group."""
        key = self._group_of(name)
        t = None if key is None else self.transforms.get(key)
        if t is None:
            return w
        out = fold_on_columns(t, w.float() if as_float else w, self.columns.get(key))
        return out if as_float else out.contiguous()

    def get(self, name: str) -> torch.Tensor:
        return self._fold(name, self._ckpt.get(name), as_float=True)

    def linear_weight(self, linear) -> torch.Tensor:
        name = linear if isinstance(linear, str) else linear.hf_name
        return self._fold(name, self._ckpt.linear_weight(linear))

    def view_key(self) -> str:
        """The transforms' digest."""
        import hashlib
        h = hashlib.sha256()
        for k in sorted(self.transforms):
            st = to_stored(self.transforms[k])
            h.update(repr(k).encode())
            for name, a in sorted(st.arrays().items()):
                h.update(name.encode() + a.tobytes())
        return f"rotated:{h.hexdigest()[:16]}"

    def transform_model(self, model):
        return rotate_model(model, self.transforms, columns=self.columns)


ROTATE_SEQS, ROTATE_SEQLEN = 4, 512   # calibration windows for the transforms (bench/results/ruquant.md)


def rotation_config(seed: int = 0, smooth_alpha: float | None = None, block: int = BLOCK,
                    stage2: dict | None = None) -> dict:
    """What a plan records under "rotation" (docs/plan.md): enough to rebuild the same transforms. `stage2`
    (`stage2_config`) adds the learnt reflections; without it the config is stage 1's, as before."""
    c = {"method": "ruquant", "block": block, "seed": seed, "smooth_alpha": smooth_alpha,
         "n_seqs": ROTATE_SEQS, "seqlen": ROTATE_SEQLEN}
    if stage2 is not None:
        c["stage2"] = stage2
    return c


def stage2_config(steps: int, act_bits: int = 4, weight_bits: int | None = 4, group: int = 128,
                  lr: float = STAGE2_LR, tokens: int = STAGE2_TOKENS) -> dict:
    """The "stage2" entry of a rotation config: `learn_reflection`'s settings, all of them, so that a plan
    rebuilds the same reflections whatever this module's defaults become."""
    c = {"steps": steps, "act_bits": act_bits, "weight_bits": weight_bits, "group": group, "lr": lr, "tokens": tokens}
    check_config({"method": "ruquant", "stage2": c})
    return c


def check_config(config) -> None:
    """ValueError naming the field when a rotation config is not one `build_rotation` can rebuild."""
    from .actquant import ACT_BITS
    from .rotation_format import check_rotation_config
    check_rotation_config(config, ACT_BITS)


@dataclass
class RotationBuild:
    """The transforms of every group, with what building them cost and, with stage 2, each group's stage-2 loss
    (`Stage2Problem.value`) for the stage-1 transform and the learnt one: {(layer, group): (stage 1, stage 2)}."""
    transforms: dict[tuple[int, int], Transform]
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    stage2_losses: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)

    def report(self) -> dict:
        """For the plan's meta["rotation"]: times (dropped where plans are embedded in files) and mean losses."""
        r = {"stage1_seconds": round(self.stage1_seconds, 2)}
        if self.stage2_losses:
            a, b = zip(*self.stage2_losses.values())
            r.update(stage2_seconds=round(self.stage2_seconds, 2),
                     stage2_loss={"stage1": sum(a) / len(a), "stage2": sum(b) / len(b)})
        return r


def calibration_windows(ckpt, calib_text, config: dict) -> torch.Tensor:
    """The calibration windows [n, seqlen] the transforms of `config` are built from."""
    from transformers import AutoTokenizer

    from .calib import calibration_tokens
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    return calibration_tokens(tok, calib_text, int(config.get("n_seqs", ROTATE_SEQS)),
                              int(config.get("seqlen", ROTATE_SEQLEN)), 0, bos_id=bos,
                              seed=int(config.get("seed", 0))).train


def group_seed(seed: int, li: int, gi: int) -> int:
    """Each group's own seed, so a result does not depend on build order."""
    return seed * 1000003 + li * 16 + gi


def build_rotation(ckpt, calib_text, config: dict, progress=None,
                   columns: dict[tuple[int, int], torch.Tensor] | None = None) -> RotationBuild:
    """The transforms of every group of `ckpt` from its calibration text, as `config` (rotation_config) says:
    stage 1, then, when config has "stage2", each group's reflection learnt (`learn_reflection`). Runs on the
    CPU (float64 stage 1 and stage 2), seeded: equal (checkpoint, text, config) give equal transforms, with any
    thread count (tests/test_ruquant_stage2.py). progress(message):
    a line per layer of stage 1 and per group of stage 2. columns (`pruned_columns`, with a
    wqedge.masked.MaskedCheckpoint): those groups' transforms are built on the kept columns only."""
    import time
    check_config(config)
    say = progress or (lambda m: None)
    seed = int(config.get("seed", 0))
    columns = columns or {}
    t0 = time.time()
    model = ckpt.load_hf_model(torch.float32)
    acts = group_activations(model, calibration_windows(ckpt, calib_text, config))
    acts = {k: x if k not in columns else x[:, columns[k]] for k, x in acts.items()}
    n_layers = len(model.model.layers)
    out = {}
    for li in range(n_layers):
        out.update(build_model_transforms(model, {k: x for k, x in acts.items() if k[0] == li}, seed=seed,
                                          smooth_alpha=config.get("smooth_alpha"),
                                          block=int(config.get("block", LEGACY_BLOCK)), columns=columns))
        say(f"RUQuant stage 1: layer {li + 1}/{n_layers}, {time.time() - t0:.0f} s")
    build = RotationBuild(out, time.time() - t0)
    s2 = config.get("stage2")
    if s2 is None:
        return build
    t0 = time.time()
    for n, ((li, gi), t) in enumerate(sorted(out.items())):
        w = group_weights(model, li, gi, columns.get((li, gi)))
        t2, _ = learn_reflection(t, acts[(li, gi)], w, act_bits=s2["act_bits"], weight_bits=s2["weight_bits"],
                                 group=s2["group"], steps=s2["steps"], lr=s2["lr"], max_tokens=s2["tokens"],
                                 seed=group_seed(seed, li, gi))
        prob = Stage2Problem.make(t, acts[(li, gi)], w, s2["act_bits"], s2["weight_bits"], s2["group"], s2["tokens"])
        build.stage2_losses[(li, gi)] = (prob.value(t), prob.value(t2))
        out[(li, gi)] = t2
        a, b = build.stage2_losses[(li, gi)]
        say(f"RUQuant stage 2: group {n + 1}/{len(out)} (layer {li}, {'/'.join(_GROUP_NAMES[gi])}), output error "
            f"{a:.4g} -> {b:.4g}, {time.time() - t0:.0f} s")
    build.stage2_seconds = time.time() - t0
    return build


_GROUP_NAMES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def checkpoint_transforms(ckpt, calib_text, config: dict, device=None) -> dict[tuple[int, int], Transform]:
    """`build_rotation(...).transforms`: the transforms alone."""
    return build_rotation(ckpt, calib_text, config).transforms
