"""RUQuant stage 1: orthogonal transforms that make a linear's input activations uniform.

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
* H: one global Householder reflection x - 2 (v·x) v with a unit vector v (O(d) per token).

Everything is orthogonal except s, so `fold_into_weight(W) = W diag(s) Mᵀ` gives W' x' = W x.
Construction is seeded and runs in float64; the stored matrices are float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 128          # B: channels per block
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

@dataclass
class BlockRotation:
    """Block-diagonal orthogonal matrix: `full` (B×B) on every full block of B channels, `tail` on the rest."""
    dim: int
    full: torch.Tensor                 # float32 [B, B] (unused, [B, B] identity, when d < B)
    tail: torch.Tensor | None = None   # float32 [d mod B, d mod B], when B does not divide d

    @property
    def block(self) -> int:
        return self.full.shape[0]

    @property
    def n_full(self) -> int:
        return self.dim // self.block

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """R x along the last dimension (x [..., d])."""
        nf, b = self.n_full, self.block
        head = x[..., : nf * b]
        y = (head.reshape(*x.shape[:-1], nf, b) @ self.full.to(x.device, x.dtype).T).reshape(head.shape)
        if self.tail is None:
            return y
        return torch.cat([y, x[..., nf * b:] @ self.tail.to(x.device, x.dtype).T], -1)

    @classmethod
    def build(cls, x: torch.Tensor, gen: torch.Generator, block: int = BLOCK) -> "BlockRotation":
        """Greedy matrices from activation samples x [T, d]: the full blocks' vectors are pooled into one
        set (the matrix is shared), the ragged tail gets its own."""
        d = x.shape[1]
        nf = d // block
        x = x.double()
        full = torch.eye(block, dtype=torch.float64)
        if nf:
            full = greedy_rotation(x[:, : nf * block].reshape(-1, block), gen)
        tail = greedy_rotation(x[:, nf * block:], gen).float() if d % block else None
        return cls(d, full.float(), tail)


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
        """W' = W diag(s) Mᵀ, so that W' apply(x) = W x. Row i of W Mᵀ is M applied to row i of W."""
        if self.smooth is not None:
            w = w * self.smooth.to(w.device, w.dtype)
        return self.rotate(w)

    def matrix(self) -> torch.Tensor:
        """The dense d×d orthogonal M (for tests and inspection; never needed to run)."""
        return self.rotate(torch.eye(self.dim, dtype=torch.float32)).T

    @classmethod
    def identity(cls, d: int, block: int = BLOCK) -> "Transform":
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


def group_weights(model, li: int, gi: int) -> list[torch.Tensor]:
    """The weights [N, d] of the linears of group gi in layer li (what smoothing balances against)."""
    from .calib import INPUT_GROUPS

    layer = model.model.layers[li]
    return [layer.get_submodule(name).weight.detach().float() for name in INPUT_GROUPS[gi]]


def build_model_transforms(model, acts: dict[tuple[int, int], torch.Tensor], seed: int = 0,
                           smooth_alpha: float | None = None, block: int = BLOCK) -> dict[tuple[int, int], Transform]:
    """One stage-1 Transform per group from `group_activations`; smoothing when smooth_alpha is given.
    Each group gets its own seed (seed, layer, group), so the result does not depend on build order."""
    out = {}
    for (li, gi), x in sorted(acts.items()):
        s = None
        if smooth_alpha is not None:
            s = smooth_scales(x.abs().amax(0), group_weights(model, li, gi), smooth_alpha)
        out[(li, gi)] = build_transform(x, seed=seed * 1000003 + li * 16 + gi, block=block, smooth=s)
    return out


# ---------------------------------------------------------------- stage 2: learn the global reflection

def _fake_quant_weight(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Training surrogate of the weight quantizer: min-max per row of each `group`-column chunk, straight-through
    gradients (the final weights are fitted by wqedge.quant.fit afterwards, not by this)."""
    from .actquant import fake_quant

    return torch.cat([fake_quant(w[:, s:s + group], bits) for s in range(0, w.shape[1], group)], 1)


def learn_reflection(t: Transform, x: torch.Tensor, weights: list[torch.Tensor], act_bits: int = 4,
                     weight_bits: int | None = 4, group: int = 128, steps: int = 30, lr: float = 1e-2,
                     max_tokens: int = 1024, seed: int = 0) -> tuple[Transform, list[float]]:
    """Stage 2: choose the global Householder vector v of `t` by minimising the group's output error

        Σ_W ||Q_w(W') Q_a(x')ᵀ - W xᵀ||² / ||W xᵀ||²   over calibration tokens x [T, d]

    with AdamW on an unconstrained vector (v / ||v|| always gives an orthogonal reflection) and
    straight-through quantizers. Everything before the reflection is fixed, so it is applied once to the
    samples and to the weights. Returns the transform with the best v seen (the stage-1 v counts, so the
    calibration error never rises) and the loss history."""
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    x = x.float()
    before = Transform(t.r1, t.perm, t.r2, torch.zeros_like(t.v), t.smooth)   # everything but the reflection
    z = before.apply(x)
    us = [before.fold_into_weight(w.float()) for w in weights]
    targets = [x @ w.float().T for w in weights]
    norms = [float(y.pow(2).mean()) for y in targets]
    v0 = t.v.clone() if float(t.v.norm()) > 0 else torch.randn(t.dim, generator=g)
    v = torch.nn.Parameter(v0 / v0.norm())
    opt = torch.optim.AdamW([v], lr=lr, weight_decay=0.0)

    def loss_of(vec):
        u = vec / vec.norm()
        from .actquant import fake_quant
        zq = fake_quant(reflect(z, u), act_bits)
        total = 0.0
        for uw, y, n in zip(us, targets, norms):
            wq = reflect(uw, u)
            if weight_bits is not None:
                wq = _fake_quant_weight(wq, weight_bits, group)
            total = total + (zq @ wq.T - y).pow(2).mean() / n
        return total

    best_v, best, history = v.detach().clone(), float("inf"), []
    for _ in range(steps + 1):
        opt.zero_grad()
        loss = loss_of(v)
        history.append(float(loss.detach()))
        if history[-1] < best:
            best, best_v = history[-1], v.detach().clone()
        loss.backward()
        opt.step()
    return Transform(t.r1, t.perm, t.r2, best_v / best_v.norm(), t.smooth), history


# ---------------------------------------------------------------- stored form, and rotated models/checkpoints

def to_stored(t: Transform):
    """The arrays the GGUF stores (wqedge.rotation_format.StoredTransform)."""
    from .rotation_format import StoredTransform

    def np_(a):
        return None if a is None else a.detach().cpu().numpy()
    return StoredTransform(np_(t.r1.full).astype("float32"), np_(t.r1.tail), np_(t.perm).astype("int32"),
                           np_(t.r2.full).astype("float32"), np_(t.r2.tail), np_(t.v).astype("float32"),
                           np_(t.smooth))


def from_stored(st) -> Transform:
    """A Transform from a StoredTransform (float32, exactly the stored values)."""
    def t_(a, dtype=torch.float32):
        return None if a is None else torch.from_numpy(a.copy()).to(dtype)
    d = st.dim
    return Transform(BlockRotation(d, t_(st.r1), t_(st.r1_tail)), t_(st.perm, torch.long),
                     BlockRotation(d, t_(st.r2), t_(st.r2_tail)), t_(st.householder), t_(st.smooth))


def rotate_model(model, transforms: dict[tuple[int, int], Transform], fold: bool = True):
    """Make a transformers LlamaForCausalLM (in place) compute with rotated inputs: each decoder linear gets
    a forward pre-hook x -> T(x) and (fold=True) its weight replaced by the folded W' = W diag(s) Mᵀ, so the
    model's outputs are unchanged. The hook is registered first, so hooks added later (wqedge.calib's
    statistics) see the rotated input, which is what the folded weights are fitted against. Returns the model."""
    from .calib import INPUT_GROUPS

    for (li, gi), t in transforms.items():
        layer = model.model.layers[li]
        cache: dict = {}

        def pre(mod, args, t=t, cache=cache):
            x = args[0]
            if cache.get("x") is not x:   # q/k/v (gate/up) read the same tensor: transform it once
                cache["x"], cache["y"] = x, t.apply(x.float()).to(x.dtype)
            return (cache["y"],) + tuple(args[1:])
        for name in INPUT_GROUPS[gi]:
            mod = layer.get_submodule(name)
            if fold:
                w = mod.weight.data
                mod.weight.data = t.fold_into_weight(w.float()).to(w.dtype)
            mod.register_forward_pre_hook(pre)
    return model


class RotatedCheckpoint:
    """A checkpoint whose decoder linears are read folded (W' = W diag(s) Mᵀ) and whose models run the input
    transforms, so that any plan/allocator/fitter quantizes the rotated weights without knowing about it."""

    def __init__(self, ckpt, transforms: dict[tuple[int, int], Transform]):
        self._ckpt, self.transforms = ckpt, transforms

    def _transform_of(self, name: str) -> Transform | None:
        from .calib import INPUT_GROUPS
        parts = name.split(".")
        if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers" or not name.endswith(".weight"):
            return None
        sub = ".".join(parts[3:-1])
        for gi, group in enumerate(INPUT_GROUPS):
            if sub in group:
                return self.transforms.get((int(parts[2]), gi))
        return None

    def get(self, name: str) -> torch.Tensor:
        w = self._ckpt.get(name)
        t = self._transform_of(name)
        return w if t is None else t.fold_into_weight(w.float())

    def linear_weight(self, linear) -> torch.Tensor:
        name = linear if isinstance(linear, str) else linear.hf_name
        w = self._ckpt.linear_weight(linear)
        t = self._transform_of(name)
        return w if t is None else t.fold_into_weight(w).contiguous()

    def load_hf_model(self, *a, **k):
        return rotate_model(self._ckpt.load_hf_model(*a, **k), self.transforms)

    def load_planning_model(self, device=None):
        return rotate_model(self._ckpt.load_planning_model(device), self.transforms)

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)


ROTATE_SEQS, ROTATE_SEQLEN = 4, 512   # calibration windows for the transforms (bench/results/ruquant.md)


def rotation_config(seed: int = 0, smooth_alpha: float | None = None, block: int = BLOCK) -> dict:
    """What a plan records under "rotation" (docs/plan.md): enough to rebuild the same transforms."""
    return {"method": "ruquant", "block": block, "seed": seed, "smooth_alpha": smooth_alpha,
            "n_seqs": ROTATE_SEQS, "seqlen": ROTATE_SEQLEN}


def checkpoint_transforms(ckpt, calib_text, config: dict, device=None) -> dict[tuple[int, int], Transform]:
    """Stage-1 transforms of every group of `ckpt` from its calibration text, as `config` (rotation_config)
    says; deterministic for equal (checkpoint, text, config)."""
    from transformers import AutoTokenizer

    from .calib import calibration_tokens
    tok = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    bos = ckpt.spec.bos_token_id if ckpt.spec.bos_token_id is not None else 1
    cs = calibration_tokens(tok, calib_text, int(config.get("n_seqs", ROTATE_SEQS)),
                            int(config.get("seqlen", ROTATE_SEQLEN)), 0, bos_id=bos, seed=int(config.get("seed", 0)))
    model = ckpt.load_hf_model(torch.float32)
    acts = group_activations(model, cs.train)
    return build_model_transforms(model, acts, seed=int(config.get("seed", 0)),
                                  smooth_alpha=config.get("smooth_alpha"), block=int(config.get("block", BLOCK)))
