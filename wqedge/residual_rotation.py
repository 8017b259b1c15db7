"""Offline rotation of the residual stream, folded into the weights (computational invariance, as in QuaRot and
SpinQuant).

Why: a column-chunk quantizer fits one grid per row and chunk, so a few large input columns (the residual
stream's outlier channels) stretch the grid for every other column of their chunk. An orthogonal Q on the
residual stream spreads such columns over all of them (incoherence). With every RMSNorm's scale first folded into
the linears that read it, the model's function is unchanged: RMSNorm(hQ) = RMSNorm(h) Q when the norm's scale is
one, because ||hQ|| = ||h||. The attention values and the output projection's inputs get a second rotation H per
head (softmax mixes positions, not coordinates, so a per-head rotation of V passes through attention).

Unlike RUQuant's activation transforms (wqedge.rotation), nothing is left to compute online: the rotated model is
a plain LLaMA checkpoint, so every converter, llama.cpp and our runtime run it unchanged. The FFN's intermediate
activations (down_proj's inputs) are not rotated: SiLU(gate) * up is elementwise, so only an online transform could
rotate them.

Row-vector convention (y = x Wᵀ, W stored [out, in]), residual h' = h Q:
  embeddings E' = E Q;  readers of the residual (q, k, v, gate, up, head) W' = W diag(γ) Q;
  writers (o, down) W' = Qᵀ W;  v rows per KV head: Hᵀ W_v,h;  o columns per query head: W_o,h H;  norms γ' = 1.
A tied head becomes its own tensor (E diag(γ_final) Q differs from E Q).
"""
from __future__ import annotations

import re

import torch

from .checkpoint import CheckpointView

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_READS_NORM = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
               "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
               "mlp.up_proj": "post_attention_layernorm"}
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ Had_n / sqrt(n) along the last dimension (n a power of two), by the fast Walsh-Hadamard butterflies:
    O(n log n) per row instead of a dense product."""
    n = x.shape[-1]
    if not _is_power_of_two(n):
        raise ValueError(f"hadamard_transform: length {n} is not a power of two")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / n ** 0.5)


class Rotation:
    """An n x n orthogonal matrix applied to the last dimension (x -> x R) or its transpose. A randomized
    Hadamard matrix (random signs, then the normalized Walsh-Hadamard transform) where n is a power of two, else
    the Q factor of a seeded Gaussian matrix; both deterministic in `seed`."""

    def __init__(self, n: int, seed: int):
        self.n = n
        gen = torch.Generator().manual_seed(seed)
        if _is_power_of_two(n):
            self.signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float32)
            self.dense = None
        else:
            g = torch.randn(n, n, generator=gen, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            self.dense = (q * torch.sign(torch.diagonal(r))).to(torch.float32)   # Haar-distributed
            self.signs = None

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x R along the last dimension."""
        if self.dense is not None:
            return x @ self.dense.to(x.device, x.dtype)
        return hadamard_transform(x * self.signs.to(x.device, x.dtype))

    def matrix(self) -> torch.Tensor:
        return self.right(torch.eye(self.n))


ROWS_AT_ONCE = 8192   # vocabulary rows rotated at a time: the transform's temporaries stay small at 128k vocabularies


def _by_rows(fn, w: torch.Tensor) -> torch.Tensor:
    """fn (row-wise) on w, ROWS_AT_ONCE rows at a time, into one float32 result."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], ROWS_AT_ONCE):
        out[i:i + ROWS_AT_ONCE] = fn(w[i:i + ROWS_AT_ONCE])
    return out


def _per_head_right(w: torch.Tensor, rot: Rotation, head_dim: int) -> torch.Tensor:
    """Column blocks of head_dim each multiplied on the right by R (o_proj's inputs, one block per query head)."""
    out, cols = w.shape
    return rot.right(w.reshape(out, cols // head_dim, head_dim)).reshape(out, cols)


def _per_head_left_t(w: torch.Tensor, rot: Rotation, head_dim: int) -> torch.Tensor:
    """Row blocks of head_dim each multiplied on the left by Rᵀ (v_proj's outputs, one block per KV head):
    Rᵀ W_h = (W_hᵀ R)ᵀ."""
    rows, cols = w.shape
    blocks = w.reshape(rows // head_dim, head_dim, cols).transpose(1, 2)   # [heads, cols, head_dim] = W_hᵀ
    return rot.right(blocks).transpose(1, 2).reshape(rows, cols)


class ResidualRotation:
    """The rotations of one model: Q on the residual stream (hidden_size), H on each attention head (head_dim).
    `tensor(name, get)` gives any checkpoint tensor rotated, reading through get(name) -> tensor (only the norm
    scale it folds besides), so a checkpoint is rotated one tensor at a time."""

    def __init__(self, hidden_size: int, head_dim: int, seed: int = 0):
        self.seed = seed
        self.q = Rotation(hidden_size, seed)
        self.h = Rotation(head_dim, seed + 1)
        self.head_dim = head_dim

    def tensor(self, name: str, get, tied: bool = False) -> torch.Tensor:
        """The rotated float32 value of checkpoint tensor `name` (the head: `lm_head.weight`, read from the
        embeddings when `tied`)."""
        if name == "model.embed_tokens.weight":
            return _by_rows(lambda w: self.q.right(w.float()), get(name))
        if name == "lm_head.weight":
            gamma = get("model.norm.weight").float()
            return _by_rows(lambda w: self.q.right(w.float() * gamma), get("model.embed_tokens.weight" if tied else name))
        if name == "model.norm.weight":
            return torch.ones_like(get(name), dtype=torch.float32)
        m = _LAYER.match(name)
        if m is None:
            return get(name).float()
        layer, sub = m.group(1), m.group(2)
        if sub in _NORMS:
            return torch.ones_like(get(name), dtype=torch.float32)
        w = get(name).float()
        if sub in _READS_NORM:
            gamma = get(f"model.layers.{layer}.{_READS_NORM[sub]}.weight").float()
            w = self.q.right(w * gamma)
            if sub == "self_attn.v_proj":
                w = _per_head_left_t(w, self.h, self.head_dim)
            return w
        if sub == "self_attn.o_proj":
            w = _per_head_right(w, self.h, self.head_dim)
        if sub in ("self_attn.o_proj", "mlp.down_proj"):
            return self.q.right(w.T).T          # Qᵀ W = (Wᵀ Q)ᵀ
        return w

    def rotate_model(self, model) -> "torch.nn.Module":
        """Rotate a transformers LlamaForCausalLM in place (untying a tied head) and return it."""
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            head = self.tensor("lm_head.weight", lambda k: model.get_parameter(k), tied=tied)
            if tied:
                model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight),
                                                          requires_grad=model.lm_head.weight.requires_grad)
                model.config.tie_word_embeddings = False
            model.lm_head.weight.copy_(head)
            del head
            # One tensor at a time (a float32 copy of one, not of the model); the norm scales last, since the
            # linears that read them fold them in first.
            names = [n for n, _ in model.named_parameters() if n.endswith(".weight") and n != "lm_head.weight"]
            names.sort(key=lambda n: n.endswith("norm.weight"))
            for n in names:
                p = model.get_parameter(n)
                p.copy_(self.tensor(n, lambda k: model.get_parameter(k)).to(p.dtype))
        return model


class ResidualRotatedCheckpoint(CheckpointView):
    """A checkpoint read through `ResidualRotation`: every tensor (embeddings, norms, linears, head) comes out
    rotated, and models load rotated, so planning, fitting and the writers see a plain (rotated) LLaMA. A tied head
    is reported untied (spec.tie_word_embeddings False, a tensor `lm_head.weight`). Its fingerprint is the
    source's, as wqedge.rotation.RotatedCheckpoint's: a plan made on it is a plan for the source checkpoint (its
    "rotation" config says how to read it)."""

    def __init__(self, ckpt, seed: int = 0):
        import dataclasses
        super().__init__(ckpt)
        self.rotation = ResidualRotation(ckpt.spec.hidden_size, ckpt.spec.head_dim, seed)
        self._tied = ckpt.spec.tie_word_embeddings
        self.spec = dataclasses.replace(ckpt.spec, tie_word_embeddings=False)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` rotated, float32 (the writers convert to their stored types)."""
        return self.rotation.tensor(name, self._ckpt.get, tied=self._tied)

    def linear_weight(self, linear) -> torch.Tensor:
        """float32 [out, in] rotated weight of one decoder linear (the source checks the stored shape)."""
        name = linear if isinstance(linear, str) else linear.hf_name
        w = self._ckpt.linear_weight(linear)   # read once, with the source's checks (shape against the spec)
        return self.rotation.tensor(name, lambda k: w if k == name else self._ckpt.get(k), tied=self._tied).contiguous()

    def tensor_names(self) -> list[str]:
        names = self._ckpt.tensor_names()
        return names if "lm_head.weight" in names else sorted(names + ["lm_head.weight"])

    def view_key(self) -> str:
        return f"residual-rotation:{self.rotation.seed}"

    def transform_model(self, model):
        return self.rotation.rotate_model(model)

    @property
    def n_params(self) -> int:
        """The elements of the model as it loads: the source's, plus the head a tied source gets as its own
        tensor (vocab x hidden), so memory decisions (planning_placement, wqedge.stream.wants_streaming) count it."""
        return self._ckpt.n_params + (self.spec.vocab_size * self.spec.hidden_size if self._tied else 0)


# ---------------------------------------------------------------- the "hadamard" rotation method

HADAMARD_BLOCK = 128   # the online block Hadamard's width on the FFN down projection's input


def hadamard_config(seed: int = 0, block: int = HADAMARD_BLOCK) -> dict:
    """What a plan records under "rotation" for `--rotate hadamard` (docs/plan.md): data-free, so the seed and the
    block width rebuild the same transforms."""
    return {"method": "hadamard", "block": block, "seed": seed}


def _layer_seed(seed: int, layer: int) -> int:
    return seed * 1000003 + layer * 16 + 3


def block_hadamard(width: int, block: int, seed: int):
    """The down group's transform (wqedge.rotation.Transform): a randomized Hadamard matrix on every whole block of
    `block` channels (a seeded Haar-random orthogonal matrix on a ragged tail); no permutation, second stage or
    reflection (identities, which the runtime skips). Stored as int8 codes with row scales, as RUQuant's: a
    Hadamard matrix's entries ±1/√B are the codes ±127 exactly, and the runtime's int8 products run them at 4x
    the float products' rate."""
    from .rotation import BlockRotation, Transform
    full = Rotation(block, seed).matrix().T.contiguous()   # x -> x R is R1 x with R1 = Rᵀ
    t = width % block
    tail = Rotation(t, seed + 1).matrix().T.contiguous() if t else None
    return Transform(BlockRotation.quantized(width, full, tail), torch.arange(width), _int8_eye(width, block),
                     torch.zeros(width))


def _int8_eye(d: int, block: int):
    """The identity block matrix as int8 codes 127·I with scales 1/127 (wqedge.rotation.BlockRotation): every
    matrix of a group has one type, and the down group's R1 is int8."""
    from .rotation import BlockRotation
    t = d % block
    return BlockRotation.quantized(d, torch.eye(block), torch.eye(t) if t else None)


def _int8_identity(d: int, block: int):
    """The identity transform of a group the method leaves alone."""
    from .rotation import Transform
    return Transform(_int8_eye(d, block), torch.arange(d), _int8_eye(d, block), torch.zeros(d))


def hadamard_transforms(spec, config: dict, widths: dict[tuple[int, int], int] | None = None) -> dict:
    """{(layer, group): Transform} of the "hadamard" method: the block Hadamard on each layer's down_proj input
    (group 3), identities on the other groups (the residual and head rotations are folded into the weights,
    `ResidualRotatedCheckpoint`, and need nothing online). `widths`: {(layer, group): kept columns} where a
    pruning narrows a group (wqedge.rotation.pruned_columns); else the spec's widths."""
    block, seed = int(config["block"]), int(config["seed"])
    widths = widths or {}
    out = {}
    for li in range(spec.n_layers):
        full = (spec.hidden_size, spec.heads(li) * spec.head_dim, spec.hidden_size, spec.ff(li))
        for gi, d in enumerate(full):
            d = widths.get((li, gi), d)
            out[(li, gi)] = (block_hadamard(d, block, _layer_seed(seed, li)) if gi == 3
                             else _int8_identity(d, block))
    return out
