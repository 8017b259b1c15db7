"""The shape of a LLaMA model, independent of where it was read from (HF folder or GGUF)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .units import Linear, decoder_linears


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or llama3-style {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; other types are rejected by the loader.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    name: str = "llama"
    # A pruned model's per-layer shapes (wqedge.pruning); None: every layer has the scalar above. When set,
    # the scalar is the largest value over the layers (what buffers are sized by).
    layer_ff: tuple[int, ...] | None = None
    layer_heads: tuple[int, ...] | None = None
    layer_kv_heads: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def ff(self, layer: int) -> int:
        return self.layer_ff[layer] if self.layer_ff else self.intermediate_size

    def heads(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.n_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.n_kv_heads

    @property
    def uneven(self) -> bool:
        """Layers differ in FFN length or head counts (the GGUF then stores per-layer arrays)."""
        return any(v is not None for v in (self.layer_ff, self.layer_heads, self.layer_kv_heads))

    def linears(self) -> list[Linear]:
        r = range(self.n_layers)
        return decoder_linears(self.n_layers, self.hidden_size, [self.ff(i) for i in r],
                               [self.heads(i) * self.head_dim for i in r], [self.kv_heads(i) * self.head_dim for i in r])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        for k in ("layer_ff", "layer_heads", "layer_kv_heads"):  # absent when even: fingerprints stay as before
            if d[k] is None:
                d.pop(k)
            else:
                d[k] = list(d[k])
        return d


def with_layer_shapes(spec: ModelSpec, ff, heads, kv_heads) -> ModelSpec:
    """`spec` with per-layer FFN lengths and head counts (sequences of n_layers ints); a uniform sequence
    becomes the scalar, so an evenly shaped model has the same spec however it was described."""
    import dataclasses

    def norm(v, name):
        v = tuple(int(x) for x in v)
        if len(v) != spec.n_layers or min(v) < 1:
            raise ValueError(f"{name}: expected {spec.n_layers} positive per-layer values, got {list(v)}")
        return (None, v[0]) if len(set(v)) == 1 else (v, max(v))
    (lf, f), (lh, h), (lk, k) = norm(ff, "feed_forward_length"), norm(heads, "head_count"), norm(kv_heads, "head_count_kv")
    for i in range(spec.n_layers):
        if (lh[i] if lh else h) % (lk[i] if lk else k):
            raise ValueError(f"layer {i}: {lh[i] if lh else h} query heads do not share {lk[i] if lk else k} "
                             "KV heads evenly")
    return dataclasses.replace(spec, intermediate_size=f, n_heads=h, n_kv_heads=k,
                               layer_ff=lf, layer_heads=lh, layer_kv_heads=lk)


def other_tensors(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(Hugging Face name, GGUF name, shape) of every tensor that is not a decoder linear."""
    h = spec.hidden_size
    out = [("model.embed_tokens.weight", "token_embd.weight", (spec.vocab_size, h))]
    for i in range(spec.n_layers):
        out.append((f"model.layers.{i}.input_layernorm.weight", f"blk.{i}.attn_norm.weight", (h,)))
        out.append((f"model.layers.{i}.post_attention_layernorm.weight", f"blk.{i}.ffn_norm.weight", (h,)))
    out.append(("model.norm.weight", "output_norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        out.append(("lm_head.weight", "output.weight", (spec.vocab_size, h)))
    return out


def rope_freq_factors(spec: ModelSpec):
    """Divisors of each RoPE inverse frequency for llama3-style scaling (as llama.cpp's rope_freqs), else None."""
    import math

    import numpy as np

    rs = spec.rope_scaling
    if not rs:
        return None
    factor = float(rs.get("factor", 8.0))
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    d = spec.head_dim
    freqs = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
