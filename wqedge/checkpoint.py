"""Open a local Hugging Face LLaMA checkpoint: validate it up front, then stream tensors one by one.

`LlamaCheckpoint.open` reads only config.json, the shard index and the safetensors headers, and checks
every tensor's name, shape and dtype against the config, so a bad checkpoint fails in milliseconds with
a message that names the file and the problem, before any long quantization run starts. Weights are
then read one tensor at a time (`get`, `linear_weight`), so a model larger than memory can be converted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .spec import ModelSpec
from .units import Linear

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM

__all__ = ["CheckpointError", "LlamaCheckpoint", "TensorInfo", "parse_config", "read_safetensors_header"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> (bytes per element, torch dtype name or None)
_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
}
# Storage dtypes we accept for the model's tensors, as the names the rest of wqedge uses.
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

_LAYER_TENSORS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the safetensors header (no data read)."""
    file: Path
    shape: tuple[int, ...]
    dtype: str            # safetensors dtype string: F16, BF16, F32, ...
    offset: int = 0       # absolute byte offset of the tensor's data in the file
    nbytes: int = 0


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header, reading only the header bytes.

    Catches truncated and corrupt files here (instead of a crash deep inside a conversion): every
    tensor's byte range must match its shape and dtype and lie inside the file.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 512 * 1024 * 1024:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file (header length {n} "
                                      f"does not fit in {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors file (unreadable header: {e})") from e
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors file (bad header entry for tensor {name!r})") from e
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype]
        if dtype in ("F4", "F6_E2M3", "F6_E3M2"):
            nbytes = end - begin   # sub-byte types: not ours to size; rejected later as unsupported
        if not (0 <= begin <= end) or end - begin != nbytes:
            raise CheckpointError(f"{file}: corrupt safetensors file (tensor {name!r}: byte range "
                                  f"[{begin}, {end}) does not match shape {list(shape)} {dtype})")
        if end > data_len:
            raise CheckpointError(f"{file}: truncated safetensors file (tensor {name!r} ends at byte "
                                  f"{end} of the data section, which has only {data_len} bytes)")
        out[name] = TensorInfo(file, shape, dtype, 8 + n + begin, end - begin)
    return out


def _need(cfg: dict, key: str, file: Path, typ=int):
    if cfg.get(key) is None:
        raise CheckpointError(f"{file}: required key {key!r} is missing")
    try:
        v = typ(cfg[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {key!r} must be a {typ.__name__}, got {cfg[key]!r}") from e
    if typ is int and (v <= 0 or v != cfg[key]):
        raise CheckpointError(f"{file}: {key!r} must be a positive integer, got {cfg[key]!r}")
    return v


def _parse_rope(cfg: dict, file: Path) -> tuple[float, dict | None]:
    """RoPE base and llama3 scaling from either config form.

    transformers 5 writes `rope_parameters` {rope_theta, rope_type, ...}; transformers 4 writes a
    top-level `rope_theta` and an optional `rope_scaling` {rope_type|type, ...}. Both give one answer.
    """
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{file}: 'rope_parameters' must be an object, got {params!r}")
    if params and "rope_type" not in params and "rope_theta" not in params and any(
            isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{file}: per-layer-type 'rope_parameters' ({sorted(params)}) are not supported")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{file}: 'rope_scaling' must be an object or null, got {scaling!r}")

    theta = (params or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise CheckpointError(f"{file}: rope_theta must be a number, got {theta!r}") from None
    if not theta > 0:
        raise CheckpointError(f"{file}: rope_theta must be positive, got {theta}")

    if params and params.get("rope_type", params.get("type")) not in (None, "default"):
        src, where = params, "rope_parameters"
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        src, where = scaling, "rope_scaling"
    else:
        return theta, None
    kind = src.get("rope_type", src.get("type"))
    if kind != "llama3":
        raise CheckpointError(f"{file}: unsupported RoPE scaling type {kind!r} in {where!r} "
                              f"(only 'default' and 'llama3' are supported)")
    out: dict = {"rope_type": "llama3"}
    for key, typ in (("factor", float), ("low_freq_factor", float), ("high_freq_factor", float),
                     ("original_max_position_embeddings", int)):
        if src.get(key) is None:
            raise CheckpointError(f"{file}: llama3 RoPE scaling in {where!r} lacks {key!r}")
        try:
            out[key] = typ(src[key])
        except (TypeError, ValueError):
            raise CheckpointError(f"{file}: {where}.{key} must be a number, got {src[key]!r}") from None
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise CheckpointError(f"{file}: llama3 RoPE scaling needs high_freq_factor > low_freq_factor, "
                              f"got {out['high_freq_factor']} <= {out['low_freq_factor']}")
    return theta, out


# config.json model_type -> the architecture it must list: Mistral's checkpoints are the LLaMA decoder (RMSNorm,
# SwiGLU, RoPE, GQA, no biases) under another name, plus an optional sliding attention window (parse_config).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def parse_config(cfg: dict, file: Path, name: str = "llama") -> ModelSpec:
    """ModelSpec from a config.json dict (transformers 4 or 5 layout); raises CheckpointError. A Mistral
    checkpoint whose sliding_window is shorter than max_position_embeddings gets the window as its context length:
    up to that many tokens its attention is the full causal attention the runtimes compute (they have no sliding
    window), beyond it they would differ (spec.extra["sliding_window"] records it)."""
    file = Path(file)
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{file}: model_type is {model_type!r}; supported: "
                              f"{', '.join(repr(k) for k in ARCHITECTURES)} (the LLaMA decoder)")
    archs = cfg.get("architectures")
    if archs is not None and ARCHITECTURES[model_type] not in archs:
        raise CheckpointError(f"{file}: architectures {archs!r} do not include {ARCHITECTURES[model_type]!r}")
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{file}: checkpoint is already quantized "
                              f"({cfg['quantization_config'].get('quant_method', '?')}); need float weights")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{file}: {key} is true; biases in attention/MLP are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported (LLaMA uses 'silu')")

    hidden = _need(cfg, "hidden_size", file)
    n_layers = _need(cfg, "num_hidden_layers", file)
    n_heads = _need(cfg, "num_attention_heads", file)
    n_kv = _need(cfg, "num_key_value_heads", file) if cfg.get("num_key_value_heads") is not None else n_heads
    if n_heads % n_kv:
        raise CheckpointError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if cfg.get("head_dim") is not None:
        head_dim = _need(cfg, "head_dim", file)
    else:
        if hidden % n_heads:
            raise CheckpointError(f"{file}: head_dim is absent and hidden_size {hidden} is not a multiple "
                                  f"of num_attention_heads {n_heads}")
        head_dim = hidden // n_heads
    theta, scaling = _parse_rope(cfg, file)

    def tok_id(key: str, default: int | None):
        v = cfg.get(key, default)
        if isinstance(v, list):
            return v[0] if v else None
        return v

    extra = {}
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise CheckpointError(f"{file}: sliding_window must be a positive integer or null, got {window!r}")
        if window < max_pos:   # full causal attention equals the window's up to `window` tokens: the context stops there
            extra["sliding_window"] = window
            max_pos = window
    if isinstance(cfg.get("eos_token_id"), list):
        extra["eos_token_ids"] = list(cfg["eos_token_id"])
    if cfg.get("pad_token_id") is not None:
        extra["pad_token_id"] = cfg["pad_token_id"]
    return ModelSpec(
        hidden_size=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        intermediate_size=_need(cfg, "intermediate_size", file), vocab_size=_need(cfg, "vocab_size", file),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),   # LlamaConfig's default when absent
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=tok_id("bos_token_id", 1), eos_token_id=tok_id("eos_token_id", 2),
        name=name, extra=extra,
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM of this shape must have, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size),
        "model.norm.weight": (spec.hidden_size,),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    for lin in spec.linears():
        shapes[lin.hf_name] = (lin.out_features, lin.in_features)
    for i in range(spec.n_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (spec.hidden_size,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (spec.hidden_size,)
    return shapes


PLANNING_MEMORY_FRACTION = 0.4   # of available memory a float32 planning model may take


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LlamaCheckpoint:
    """A validated LLaMA checkpoint folder; tensors are read lazily, one at a time."""

    def __init__(self, path: Path, spec: ModelSpec, dtype: str, tensors: dict[str, TensorInfo], config: dict):
        self.path = path
        self.spec = spec
        self.dtype = dtype
        self.config = config
        self._tensors = tensors

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "LlamaCheckpoint":
        """Validate config.json and every safetensors header against each other (no weight data read)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder does not exist" if not path.exists()
                                  else f"{path}: not a folder (expected a Hugging Face model folder)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file}: missing; {path} is not a Hugging Face model folder")
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: cannot parse ({e})") from e
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_file}: not a JSON object")
        spec = parse_config(cfg, cfg_file, name=path.resolve().name)
        tensors = cls._read_headers(path)
        dtype = cls._validate_tensors(path, spec, tensors)
        return cls(path, spec, dtype, tensors, cfg)

    @staticmethod
    def _read_headers(path: Path) -> dict[str, TensorInfo]:
        single, index = path / SINGLE_FILE, path / INDEX_FILE
        if single.is_file():     # transformers prefers the single file too
            return read_safetensors_header(single)
        if not index.is_file():
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pth"))
            hint = f" (found {', '.join(others)}: only safetensors weights are supported)" if others else ""
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map is empty or not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot parse shard index ({e!r})") from e
        headers: dict[str, dict[str, TensorInfo]] = {}
        for shard in sorted(set(weight_map.values())):
            f = path / shard
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {shard!r}, which does not exist in {path}")
            headers[shard] = read_safetensors_header(f)
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{path / shard}: tensor {name!r} is not in this shard, "
                                      f"though {INDEX_FILE} says it is")
            tensors[name] = headers[shard][name]
        return tensors

    @staticmethod
    def _validate_tensors(path: Path, spec: ModelSpec, tensors: dict[str, TensorInfo]) -> str:
        """Check names/shapes/dtypes against the config; return the linears' storage dtype."""
        weights_desc = SINGLE_FILE if (path / SINGLE_FILE).is_file() else INDEX_FILE
        for name, info in tensors.items():
            if _IGNORED.search(name):
                continue
            m = _LAYER_RE.match(name)
            if name.endswith(".bias"):
                raise CheckpointError(f"{info.file}: tensor {name!r} is a bias; attention/MLP biases are "
                                      f"not supported")
            if m and int(m.group(1)) >= spec.n_layers:
                raise CheckpointError(f"{info.file}: tensor {name!r} belongs to layer {m.group(1)}, but "
                                      f"config.json says num_hidden_layers = {spec.n_layers}")
        shapes = expected_shapes(spec)
        for name, shape in shapes.items():
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"{path / weights_desc}: required tensor {name!r} is missing")
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"config.json implies {list(shape)}")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name!r} is stored as {info.dtype}; only F16, BF16 "
                                      f"and F32 are supported")
        if spec.tie_word_embeddings and "lm_head.weight" in tensors:
            info = tensors["lm_head.weight"]
            if info.shape != (spec.vocab_size, spec.hidden_size) or info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor 'lm_head.weight' is {list(info.shape)} {info.dtype}, "
                                      f"expected [{spec.vocab_size}, {spec.hidden_size}] float")
        unexpected = sorted(n for n in tensors if n not in shapes and n != "lm_head.weight"
                            and not _IGNORED.search(n))
        if unexpected:
            raise CheckpointError(f"{tensors[unexpected[0]].file}: unexpected tensor {unexpected[0]!r} "
                                  f"({len(unexpected)} unexpected in all) for a LlamaForCausalLM")
        lin_dtypes = {tensors[lin.hf_name].dtype for lin in spec.linears()}
        if len(lin_dtypes) != 1:
            raise CheckpointError(f"{path / weights_desc}: decoder linears are stored in mixed dtypes "
                                  f"{sorted(lin_dtypes)}")
        return FLOAT_DTYPES[lin_dtypes.pop()]

    # ---- reading -------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return sorted(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        """File, shape and stored dtype of one tensor, without reading it."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, read from its shard alone (memory stays O(one tensor))."""
        from safetensors import safe_open

        info = self.tensor_info(name)
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                t = f.get_tensor(name)
        except Exception as e:   # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from e
        if tuple(t.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} read back as {list(t.shape)}, "
                                  f"header says {list(info.shape)}")
        return t

    def linear_weight(self, linear: Linear | str) -> torch.Tensor:
        """float32 [out, in] weight of one decoder linear (a wqedge.units.Linear or its HF name)."""
        name = linear if isinstance(linear, str) else linear.hf_name
        w = self.get(name)
        if not isinstance(linear, str) and tuple(w.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{self.tensor_info(name).file}: tensor {name!r} is {list(w.shape)}, "
                                  f"expected [{linear.out_features}, {linear.in_features}]")
        return w.to(torch.float32).contiguous()

    def fingerprint(self) -> str:
        """sha256 of the spec (minus its display name), every tensor's name, shape and dtype, and samples of
        its bytes.

        Independent of folder name, sharding and config spelling (tf4/tf5). Three 64-byte samples per tensor
        (start, middle, end) tell apart checkpoints of the same architecture with different weights (a base
        model and its fine-tune) at the cost of a few reads, not a pass over the weights.
        """
        spec = self.spec.to_dict()
        spec.pop("name", None)
        canon = {"spec": spec,
                 "tensors": [[n, list(self._tensors[n].shape), self._tensors[n].dtype] for n in self.tensor_names()]}
        h = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode())
        for n in self.tensor_names():
            info = self._tensors[n]
            with open(info.file, "rb") as f:
                for at in sorted({0, max(0, info.nbytes // 2 - 32), max(0, info.nbytes - 64)}):
                    f.seek(info.offset + at)
                    h.update(f.read(min(64, info.nbytes - at)))
        return h.hexdigest()

    @property
    def n_params(self) -> int:
        """Elements over every tensor of the checkpoint (from the headers)."""
        return int(sum(math.prod(t.shape) for t in self._tensors.values()))

    def planning_dtype(self, available_bytes: int | None = None, n_params: int | None = None) -> torch.dtype:
        """The dtype to hold the whole model in CPU memory for calibration: float32 while that takes at
        most PLANNING_MEMORY_FRACTION of the available memory, else bfloat16 (a 7B model: 14 GB instead
        of 28). Statistics are still computed in float32, one layer at a time (wqedge.calib). n_params: the
        elements of the model as it will be held (default: this checkpoint's; a view that adds a tensor passes
        its own count)."""
        avail = available_memory() if available_bytes is None else available_bytes
        n = self.n_params if n_params is None else n_params
        return torch.float32 if 4 * n <= PLANNING_MEMORY_FRACTION * avail else torch.bfloat16

    def planning_placement(self, device=None, n_params: int | None = None) -> tuple[torch.dtype, torch.device]:
        """(dtype, device) of load_planning_model for a model of `n_params` elements (default: this
        checkpoint's). On a CUDA `device` whose free memory holds it: float32 while that takes at most
        PLANNING_MEMORY_FRACTION of it, else the checkpoint's own 16-bit type. Otherwise the CPU in
        planning_dtype()."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        n = self.n_params if n_params is None else n_params
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            if 2 * n <= PLANNING_MEMORY_FRACTION * free:
                return (torch.float32 if 4 * n <= PLANNING_MEMORY_FRACTION * free else self.float16_dtype), dev
        return self.planning_dtype(n_params=n), torch.device("cpu")

    def load_planning_model(self, device=None) -> "LlamaForCausalLM":
        """The whole model for calibration and error-feedback conversion, placed by planning_placement: on a
        CUDA `device` that holds it the statistics loops keep everything on the GPU and host memory stays at about
        one 16-bit copy while loading (issue 13: a 1.1B model plans in a few GB of CPU memory); otherwise on the
        CPU."""
        dtype, dev = self.planning_placement(device)
        return self.load_hf_model(dtype, device=dev)

    @property
    def float16_dtype(self) -> torch.dtype:
        """The checkpoint's own 16-bit float type (bfloat16 for bf16 checkpoints, else float16)."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float16

    def load_hf_model(self, dtype=torch.float32, device="cpu") -> "LlamaForCausalLM":
        """The whole transformers model in eval mode, for calibration and evaluation of small models. For a
        CUDA `device` the weights are read in their stored 16-bit type and converted on the GPU, so host memory
        holds at most that copy while loading."""
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        dev = torch.device(device)
        load_dtype = self.float16_dtype if dev.type == "cuda" and self.dtype in ("float16", "bfloat16") else dtype
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = LlamaForCausalLM.from_pretrained(self.path, config=self.hf_config(), dtype=load_dtype,
                                                     local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return model.to(dev, dtype).eval()

    def hf_config(self):
        """config.json as a transformers LlamaConfig; a Mistral config as the LLaMA decoder it is (its model type,
        architecture and sliding window dropped, the context length the spec's: parse_config made a shorter window
        the context length)."""
        from transformers import LlamaConfig
        if self.config.get("model_type") == "llama":
            return LlamaConfig.from_pretrained(str(self.path), local_files_only=True)
        return LlamaConfig.from_dict({**{k: v for k, v in self.config.items()
                                         if k not in ("model_type", "architectures", "sliding_window")},
                                      "max_position_embeddings": self.spec.max_position_embeddings})

    def __repr__(self) -> str:
        s = self.spec
        return (f"LlamaCheckpoint({str(self.path)!r}, {s.n_layers} layers, hidden {s.hidden_size}, "
                f"heads {s.n_heads}/{s.n_kv_heads}, vocab {s.vocab_size}, {self.dtype})")


class CheckpointView:
    """A checkpoint read through a change of its tensors (a pruning's mask, a rotation) that the rest of the
    pipeline must not know about: subclasses override what they change (`get`, `linear_weight`, `view_key`,
    `transform_model`) and everything else is the source's, including its fingerprint, so a plan made on a view is a
    plan for the source checkpoint. Views stack (a rotation over a mask over a residual rotation); `stats_view`
    names the whole stack, for caches keyed by the unchanged fingerprint."""

    def __init__(self, ckpt):
        self._ckpt = ckpt

    def view_key(self) -> str:
        """What this view changes, as a short deterministic string (part of `stats_view`)."""
        raise NotImplementedError

    def stats_view(self) -> str:
        inner = self._ckpt.stats_view() if hasattr(self._ckpt, "stats_view") else ""
        return f"{self.view_key()}|{inner}"

    def transform_model(self, model):
        """Apply this view to a loaded transformers model of the source, in place; returns it."""
        return model

    def load_hf_model(self, *a, **k):
        return self.transform_model(self._ckpt.load_hf_model(*a, **k))

    # Memory decisions count the model as this view loads it (`n_params`: a view that adds a tensor says so), and
    # the source checkpoint decides them (LlamaCheckpoint.planning_placement).
    def planning_dtype(self, available_bytes=None, n_params=None):
        return self._ckpt.planning_dtype(available_bytes, n_params=self.n_params if n_params is None else n_params)

    def planning_placement(self, device=None, n_params=None):
        return self._ckpt.planning_placement(device, n_params=self.n_params if n_params is None else n_params)

    def load_planning_model(self, device=None):
        dtype, dev = self.planning_placement(device)
        return self.load_hf_model(dtype, device=dev)

    def __getattr__(self, attr):
        if attr == "_ckpt":   # not set yet (copy, unpickling): no recursion through __getattr__
            raise AttributeError(attr)
        return getattr(self._ckpt, attr)
