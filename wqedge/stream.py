"""Layer streaming (issue 13, "planning that scales with the model"): the planning model one decoder layer at a time.

`StreamedModel` stands in for the whole LlamaForCausalLM that calibration (wqedge.calib.layerwise_stats,
gradient_stats) and error feedback (wqedge.quant.feedback) otherwise hold: its `model.layers` reads layer l's
tensors from the safetensors files (LlamaCheckpoint.get: safetensors' lazy safe_open, one tensor at a time) when its
turn comes, in float32 on the planning device, and nothing keeps it afterwards. Peak memory is then one decoder layer,
the embeddings (and the output head while gradients run) and the calibration windows' hidden states, instead of the
whole model: a model larger than the device's memory can be planned. The arithmetic is the in-memory path's (same
float32 layer modules, same attention implementation), so plans and files are the same (tests/test_stream.py).

`ChunkSpill` keeps error feedback's fitted chunks in a temporary folder, one file per linear, so that they are not
all held until the writer reads them (a 1.1B model's codes alone are 1 GB as uint8); every error-feedback conversion
uses it, streamed or not.

`wants_streaming` is the rule that turns streaming on when nobody asked: the checkpoint's 16-bit copy would take
more than PLANNING_MEMORY_FRACTION of the planning device's memory (free GPU memory on CUDA, available host memory
on the CPU), i.e. exactly when the in-memory path could not hold it there.
"""
from __future__ import annotations

import pickle
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import torch

from .checkpoint import PLANNING_MEMORY_FRACTION, available_memory


def device_memory(device) -> int:
    """Bytes the planning device can give now: free GPU memory on CUDA, else available host memory."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    return available_memory()


def wants_streaming(ckpt, device, stream: bool | None = None, memory: int | None = None) -> bool:
    """Whether planning streams layers: `stream` when given (--stream-layers / --no-stream-layers), else when the
    checkpoint's 16-bit copy (2 bytes per parameter) exceeds PLANNING_MEMORY_FRACTION of `memory` (default:
    device_memory(device))."""
    if stream is not None:
        return bool(stream)
    mem = device_memory(device) if memory is None else memory
    return 2 * ckpt.n_params > PLANNING_MEMORY_FRACTION * mem


def hf_config(ckpt):
    """The transformers LlamaConfig of `ckpt`, with the attention implementation from_pretrained would pick (sdpa),
    so that streamed layers compute what the in-memory model's do."""
    cfg = ckpt.hf_config()
    cfg._attn_implementation = "sdpa"
    return cfg


class _Inner(torch.nn.Module):
    """What layerwise_stats reads as `model.model`: embed_tokens, rotary_emb, norm, layers."""

    def __init__(self, embed, rotary, layers):
        super().__init__()
        self.embed_tokens = embed
        self.rotary_emb = rotary
        self.layers = layers


class LazyLayers:
    """The decoder layers of a checkpoint as a sequence whose items are read from disk on access (a fresh float32
    module on the device each time; nothing is cached)."""

    def __init__(self, ckpt, config, device):
        self.ckpt, self.config, self.device = ckpt, config, torch.device(device)

    def __len__(self) -> int:
        return self.ckpt.spec.n_layers

    def __getitem__(self, li: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        if not 0 <= li < len(self):
            raise IndexError(li)
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, li)
        prefix = f"model.layers.{li}."
        sd = {k: self.ckpt.get(prefix + k).to(self.device, torch.float32) for k, _ in layer.named_parameters()}
        layer.load_state_dict(sd, assign=True)
        return layer.eval()

    def __iter__(self):
        for li in range(len(self)):
            yield self[li]


class StreamedModel:
    """A LlamaForCausalLM read layer by layer (see the module docstring). `model.embed_tokens` holds the embedding in
    its stored 16-bit type on `device` (the lookup is exact in float32 afterwards); `head()` and `final_norm()` read
    the output head and final norm when gradients need them."""

    def __init__(self, ckpt, device=None):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        self.ckpt = ckpt
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.config = hf_config(ckpt)
        emb = torch.nn.Embedding.from_pretrained(ckpt.get("model.embed_tokens.weight").to(self.device), freeze=True)
        self.model = _Inner(emb, LlamaRotaryEmbedding(self.config), LazyLayers(ckpt, self.config, self.device))

    def final_norm(self):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.ckpt.get("model.norm.weight").to(self.device, torch.float32)
        return norm.requires_grad_(False)

    def head_weight(self) -> torch.Tensor:
        """The output head [vocab, hidden] in float32 on the device (the embedding when tied)."""
        name = "model.embed_tokens.weight" if self.ckpt.spec.tie_word_embeddings else "lm_head.weight"
        return self.ckpt.get(name).to(self.device, torch.float32)


def planning_model(ckpt, device, stream: bool | None = None):
    """The model calibration and error feedback run on: a StreamedModel when `wants_streaming`, else the whole
    model (LlamaCheckpoint.load_planning_model)."""
    from .checkpoint import LlamaCheckpoint
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if wants_streaming(ckpt, dev, stream):
        if type(ckpt) is not LlamaCheckpoint:    # e.g. a RotatedCheckpoint: its models are transformed in memory
            if stream:
                raise ValueError(f"layer streaming reads a plain checkpoint's files; {type(ckpt).__name__} "
                                 f"(--rotate) is planned in memory")
            return ckpt.load_planning_model(dev)
        return StreamedModel(ckpt, dev)
    return ckpt.load_planning_model(dev)


class ChunkSpill(MutableMapping):
    """{hf_name: [ChunkData]} kept on disk, one pickle per linear in a temporary folder removed with the object:
    error feedback stores each linear's chunks when they are fitted, the writer reads them back one at a time."""

    def __init__(self, where: str | Path | None = None):
        self._dir = Path(tempfile.mkdtemp(prefix="wqedge-chunks-", dir=where))
        self._files: dict[str, Path] = {}

    def __setitem__(self, name: str, chunks) -> None:
        f = self._dir / f"{len(self._files)}.pkl" if name not in self._files else self._files[name]
        with open(f, "wb") as fh:
            pickle.dump(chunks, fh, protocol=pickle.HIGHEST_PROTOCOL)
        self._files[name] = f

    def __getitem__(self, name: str):
        with open(self._files[name], "rb") as fh:
            return pickle.load(fh)

    def __delitem__(self, name: str) -> None:
        self._files.pop(name).unlink()

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        self._files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
