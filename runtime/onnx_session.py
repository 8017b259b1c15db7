"""Open an exported ONNX model (wqedge.converters.onnx_export) in onnxruntime.

The native variant's quantized linears are wqedge.ChunkLinear nodes (custom-op domain "wqedge"), which
only run with our custom-op library libwqedge_ort registered; make_session registers it when the model
imports that domain. The library is looked up, first found wins:
  1. $WQEDGE_ORT_LIB (a path to libwqedge_ort.so);
  2. next to every place libwqedge itself is looked for (runtime/_native.py: the folder of $WQEDGE_LIB,
     the source tree's cpp/build, the installed package's wqedge/runtime/), then other cpp/build*/ folders.
onnxruntime and the standard library only (no numpy needed, no torch).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from wqedge.runtime import _native

ORT_LIBNAME = {"darwin": "libwqedge_ort.dylib", "win32": "wqedge_ort.dll"}.get(sys.platform, "libwqedge_ort.so")
NATIVE_DOMAIN = "wqedge"
THREADS_KEY = "wqedge.num_threads"  # session config entry read by libwqedge_ort when it is registered


class CustomOpsLibraryNotFound(ImportError):
    """A native-variant model was opened but libwqedge_ort is not built or installed."""


def candidate_paths() -> list[Path]:
    out = []
    env = os.environ.get("WQEDGE_ORT_LIB")
    if env:
        out.append(Path(env))
    out += [p.with_name(ORT_LIBNAME) for p in _native.candidate_paths()]
    cpp = Path(__file__).resolve().parent.parent / "cpp"
    if cpp.is_dir():
        out += [d / ORT_LIBNAME for d in sorted(cpp.glob("build*")) if d.is_dir()]
    return list(dict.fromkeys(out))


def custom_ops_library() -> Path:
    """Path of libwqedge_ort; raises CustomOpsLibraryNotFound saying how to get it."""
    tried = []
    for p in candidate_paths():
        if p.is_file():
            return p
        tried.append(str(p))
    raise CustomOpsLibraryNotFound(
        "this ONNX model uses wqedge custom operators (the native variant, domain 'wqedge'), which need the "
        f"custom-op library {ORT_LIBNAME}: build it (cmake -S cpp -B cpp/build && cmake --build cpp/build; "
        "CMake option WQEDGE_BUILD_ORT_OPS, on by default), or pip install the package, or set WQEDGE_ORT_LIB "
        "to its path; or export the portable variant, which stock onnxruntime runs. Tried: " + "; ".join(tried))


def _varint(f) -> int | None:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7


def model_domains(onnx_path) -> set[str]:
    """The operator-set domains a model imports ("" for ONNX's own), read from the file's top level only.

    Parses ModelProto's opset_import fields and seeks past everything else (the graph and its inline
    weights), so checking a multi-GB model costs a few reads, not a protobuf load.
    """
    out = set()
    with open(onnx_path, "rb") as f:
        while (tag := _varint(f)) is not None:
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(f)
            elif wire == 1:
                f.seek(8, 1)
            elif wire == 5:
                f.seek(4, 1)
            elif wire == 2:
                n = _varint(f)
                if field == 8:  # opset_import: OperatorSetIdProto {1: domain, 2: version}
                    out.add(_opset_domain(f.read(n)))
                else:
                    f.seek(n, 1)
            else:
                raise ValueError(f"{onnx_path}: not an ONNX model file (protobuf wire type {wire})")
    return out


def _opset_domain(buf: bytes) -> str:
    import io
    f = io.BytesIO(buf)
    while (tag := _varint(f)) is not None:
        if tag == (1 << 3 | 2):
            return f.read(_varint(f)).decode("utf-8")
        if tag & 7 == 0:
            _varint(f)
        elif tag & 7 == 2:
            f.seek(_varint(f), 1)
        else:
            break
    return ""


def session_options(onnx_path, threads: int = 0):
    """onnxruntime.SessionOptions for a model: threads (0 = onnxruntime's and libwqedge_ort's defaults) and,
    when the model imports domain 'wqedge', libwqedge_ort registered."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if NATIVE_DOMAIN in model_domains(onnx_path):
        lib = custom_ops_library()
        so.add_session_config_entry(THREADS_KEY, str(int(threads)))  # read at registration: set it first
        # The linears run on libwqedge_ort's own threads; onnxruntime's intra-op threads spinning between
        # nodes would take their cores (measured: prefill ~1.5x faster without spinning on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.register_custom_ops_library(str(lib))
    return so


def make_session(onnx_path, threads: int = 0):
    """An onnxruntime.InferenceSession (CPU) for a portable or native wqedge ONNX model."""
    import onnxruntime as ort
    return ort.InferenceSession(str(onnx_path), session_options(onnx_path, threads), providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """An exported decoder (wqedge.converters.onnx_export I/O, GenAI-style) run with a KV cache: step()
    feeds tokens and a past, greedy() generates, and reset()/evaluate() keep the cache between calls like
    a runtime context. `model` is an onnxruntime session or a path (opened by make_session)."""

    def __init__(self, model, threads: int = 0):
        self.sess = make_session(model, threads) if isinstance(model, (str, os.PathLike)) else model
        ins = self.sess.get_inputs()
        self.past_names = [i.name for i in ins if i.name.startswith("past_key_values.")]
        # (KV heads, head dim) per cache input: a pruned model's layers differ in KV heads
        self.past_shapes = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in ins
                            if i.name.startswith("past_key_values.")}
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.reset()

    def empty_past(self, batch: int) -> dict:
        import numpy as np
        return {n: np.zeros((batch, kv, 0, d), np.float32) for n, (kv, d) in self.past_shapes.items()}

    def step(self, ids, past: dict, mask=None, positions=None):
        """ids int64[B, S]; past from empty_past or a previous step -> (logits [B, S, V], present)."""
        import numpy as np
        ids = np.asarray(ids, np.int64)
        b, s = ids.shape
        p = next(iter(past.values())).shape[2]
        mask = np.ones((b, p + s), np.int64) if mask is None else np.asarray(mask, np.int64)
        if positions is None:
            positions = np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1))
        outs = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(self.out_names[1:], outs[1:])}
        return outs[0], present

    def logits(self, windows):
        """Every position's logits of a batch of windows, each from an empty cache: [B, S, V]."""
        import numpy as np
        windows = np.asarray(windows, np.int64)
        return self.step(windows, self.empty_past(len(windows)))[0]

    def greedy(self, prompt, n_new: int) -> list[int]:
        import numpy as np
        logits, past = self.step(np.asarray([prompt]), self.empty_past(1))
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            logits, past = self.step(np.asarray([[tok]]), past)
        return out

    def reset(self) -> None:
        self.past = self.empty_past(1)

    def evaluate(self, ids):
        """Append tokens to the kept cache; the last position's logits [V]."""
        import numpy as np
        logits, self.past = self.step(np.asarray([ids], np.int64), self.past)
        return logits[0, -1]
