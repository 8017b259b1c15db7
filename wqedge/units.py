"""Units of allocation: column chunks of every decoder linear, in the one fixed order.

A unit is G consecutive input columns of one linear weight W[out, in], all output rows.
The order (layer by layer; q, k, v, o, gate, up, down; chunks left to right) is the order
plans list them, the RL allocator visits them and the file stores them.
"""
from __future__ import annotations

from dataclasses import dataclass

# Hugging Face projection name -> GGUF tensor stem, in unit order.
PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)
PROJ_TYPES = tuple(p.split(".")[-1] for p, _ in PROJECTIONS)  # q_proj, k_proj, ...


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"group size must be a positive multiple of 32, got {group_size!r}")
    return group_size


def chunk_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk along K; the last one is ragged when G does not divide K."""
    check_group_size(group_size)
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


@dataclass(frozen=True)
class Linear:
    """One decoder linear: its names and shape."""
    layer: int
    proj: str            # q_proj, k_proj, ...
    hf_name: str         # model.layers.3.self_attn.q_proj.weight
    gguf_name: str       # blk.3.attn_q.weight
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Unit:
    """One column chunk of one linear."""
    index: int           # position in the global unit order
    linear: Linear
    chunk: int           # chunk index within the linear
    start: int
    end: int

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def n_weights(self) -> int:
        return self.width * self.linear.out_features


def decoder_linears(n_layers: int, hidden: int, intermediate, q_out, kv_out) -> list[Linear]:
    """Every decoder linear in unit order, with its (out, in) shape. intermediate, q_out and kv_out are one
    int for every layer or one per layer (a pruned model)."""
    def at(v, layer):
        return v if isinstance(v, int) else v[layer]
    out = []
    for layer in range(n_layers):
        f, q, kv = at(intermediate, layer), at(q_out, layer), at(kv_out, layer)
        shapes = {
            "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (f, hidden), "up_proj": (f, hidden), "down_proj": (hidden, f),
        }
        for (hf, stem), proj in zip(PROJECTIONS, PROJ_TYPES):
            n, k = shapes[proj]
            out.append(Linear(layer, proj, f"model.layers.{layer}.{hf}.weight", f"blk.{layer}.{stem}.weight", n, k))
    return out


def parse_linear_name(hf_name: str) -> tuple[int, str]:
    """(layer, projection) of a decoder linear's Hugging Face name: model.layers.3.mlp.up_proj.weight -> (3, up_proj)."""
    parts = hf_name.split(".")
    if len(parts) != 6 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or parts[4] not in PROJ_TYPES:
        raise ValueError(f"{hf_name!r} is not a decoder linear's name (model.layers.N.<module>.<proj>.weight)")
    return int(parts[2]), parts[4]


def enumerate_units(linears: list[Linear], group_size: int) -> list[Unit]:
    units = []
    for lin in linears:
        for c, (s, e) in enumerate(chunk_bounds(lin.in_features, group_size)):
            units.append(Unit(len(units), lin, c, s, e))
    return units
