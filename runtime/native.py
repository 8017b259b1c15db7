"""Python face of the C++ runtime (libwqedge): models, contexts, generation and logits for evaluation.

    from wqedge.runtime import native
    text = native.run("model.gguf", "Once upon a time", max_new_tokens=32)       # generate
    fn = native.logits_fn("model.gguf")      # int32[B, T] -> float32[B, T, vocab], for wqedge.perplexity

numpy only (no torch). The library is found as wqedge.runtime._native describes.
"""
from __future__ import annotations

import ctypes as C
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from wqedge.runtime import _native
from wqedge.runtime._native import NativeError, check

__all__ = ["NativeError", "Model", "Context", "run", "generate_tokens", "logits_fn", "NativeEvaluator", "system_info",
           "set_kernels", "get_kernels", "set_activations", "get_activations", "chunk_matvec", "chunk_dequant",
           "row_bytes", "available", "library_path", "read_bandwidth"]

available = _native.available
library_path = _native.library_path


def system_info() -> str:
    return _native.lib().wqe_system_info().decode()


def read_bandwidth(threads: int, mib: float = 512, reps: int = 3) -> float:
    """Memory read bandwidth (GB/s) of `threads` threads of the runtime's pool streaming `mib` MiB, best of `reps`:
    the bytes-per-second roof of a decode step, which reads every weight once (wqe_read_bandwidth)."""
    v = _native.lib().wqe_read_bandwidth(int(threads), int(mib * 2**20), int(reps))
    if v < 0:
        raise NativeError(1, "ERR_INVALID_ARGUMENT", _native.lib().wqe_last_error().decode("utf-8", "replace"))
    return float(v)


def set_kernels(kernels: str | int) -> None:
    """'auto', 'scalar', 'avx2' or 'neon' (or the WQE_KERNELS_* number), for the whole process."""
    k = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3}.get(kernels, kernels) if isinstance(kernels, str) else kernels
    if not isinstance(k, int):
        raise ValueError(f"unknown kernel set {kernels!r}")
    check(_native.lib().wqe_set_kernels(k))


def get_kernels() -> str:
    return {1: "scalar", 2: "avx2", 3: "neon"}.get(_native.lib().wqe_get_kernels(), "?")


_ACTS = {"f32": 0, "q8": 1}


def set_activations(act: str) -> None:
    """Activation precision of decode steps and prompt (prefill) steps, for the whole process: 'q8' (int8 per 32
    columns, integer dot products; the default) or 'f32' (float, the reference: logits within ~1e-5 of PyTorch's).
    WQEDGE_ACT=f32|q8 sets the default."""
    if act not in _ACTS:
        raise ValueError(f"unknown activation precision {act!r} (f32 or q8)")
    check(_native.lib().wqe_set_activations(_ACTS[act]))


def get_activations() -> str:
    return {0: "f32", 1: "q8"}.get(_native.lib().wqe_get_activations(), "?")


def _i32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=np.int32)


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(C.POINTER(ctype))


class _Handle:
    """Owns one C handle: freed by close(), by `with`, or when garbage-collected. Subclasses name the free call."""
    _free_fn = ""

    def close(self) -> None:
        if getattr(self, "_h", None):
            getattr(self._lib, self._free_fn)(self._h)
            self._h = C.c_void_p()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Model(_Handle):
    """A model file, memory-mapped and validated (NativeError with code ERR_FORMAT etc. when not)."""
    _free_fn = "wqe_model_free"

    def __init__(self, path: str | os.PathLike):
        self._lib = _native.lib()
        self._h = C.c_void_p()
        self.path = os.fspath(path)
        check(self._lib.wqe_model_open(self.path.encode(), C.byref(self._h)))
        info = _native.ModelInfo()
        check(self._lib.wqe_model_get_info(self._h, C.byref(info)))
        self.info = info.as_dict()

    @property
    def handle(self):
        if not self._h:
            raise ValueError("model is closed")
        return self._h

    @property
    def n_vocab(self) -> int:
        return self.info["n_vocab"]

    @property
    def bos_id(self) -> int | None:
        return None if self.info["bos_token_id"] < 0 else self.info["bos_token_id"]

    @property
    def eos_id(self) -> int | None:
        return None if self.info["eos_token_id"] < 0 else self.info["eos_token_id"]

    @property
    def plan_json(self) -> str:
        return self._lib.wqe_model_plan(self.handle).decode()

    def chat_template(self) -> str | None:
        """The checkpoint's chat template (Jinja source, GGUF key tokenizer.chat_template), None if the file has none."""
        s = self._text_call(self._lib.wqe_model_chat_template, self.handle).decode("utf-8", "replace")
        return s or None

    def tokenize(self, text: str, add_bos: bool | None = None) -> np.ndarray:
        """int32 token ids; add_bos None follows the file's tokenizer.ggml.add_bos_token."""
        raw = text.encode("utf-8")
        flag = -1 if add_bos is None else int(bool(add_bos))
        n = C.c_int32()
        cap = len(raw) + 16
        for _ in range(2):
            out = np.empty(cap, np.int32)
            st = self._lib.wqe_tokenize(self.handle, raw, len(raw), flag, _ptr(out, C.c_int32), cap, C.byref(n))
            if st == _native.ERR_BUFFER_TOO_SMALL:
                cap = n.value
                continue
            check(st)
            return out[: n.value].copy()
        raise RuntimeError("tokenize: buffer size negotiation failed")

    def _text_call(self, fn, *args) -> bytes:
        length = C.c_size_t()
        cap = 256
        for _ in range(2):
            buf = C.create_string_buffer(cap)
            st = fn(*args, buf, cap, C.byref(length))
            if st == _native.ERR_BUFFER_TOO_SMALL:
                cap = length.value + 1
                continue
            check(st)
            return buf.raw[: length.value]
        raise RuntimeError("buffer size negotiation failed")

    def detokenize(self, tokens: Sequence[int]) -> str:
        t = _i32(tokens)
        return self._text_call(self._lib.wqe_detokenize, self.handle, _ptr(t, C.c_int32), len(t)).decode("utf-8", "replace")

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        return self._text_call(self._lib.wqe_token_to_piece, self.handle, int(token), int(special))


class Context(_Handle):
    """KV cache, scratch and threads for evaluating a Model; one thread at a time."""
    _free_fn = "wqe_context_free"

    def __init__(self, model: Model, n_ctx: int = 0, n_threads: int = 0, kv_bits: str | int | None = None,
                 kv_rotation: str | None = None):
        """kv_bits: None = the file's KV cache setting (wqedge.kv_cache.bits; float when absent), 'f32' / 32, 8
        or 4; kv_rotation: None = the file's, 'hadamard' or 'none' (docs/format.md "KV cache")."""
        self.model = model
        self._lib = model._lib
        self._h = C.c_void_p()
        params = _native.ContextParams(int(n_ctx), int(n_threads), _kv_bits_code(kv_bits),
                                       _kv_rotation_code(kv_rotation))
        check(self._lib.wqe_context_new(model.handle, C.byref(params), C.byref(self._h)))

    @property
    def kv_cache(self) -> dict:
        """{'bits': 32 (float32) | 8 | 4, 'rotated': bool, 'bytes': K and V cache bytes for n_ctx tokens}."""
        b, r, n = C.c_int32(), C.c_int32(), C.c_uint64()
        check(self._lib.wqe_context_kv_cache(self._h, C.byref(b), C.byref(r), C.byref(n)))
        return {"bits": b.value, "rotated": bool(r.value), "bytes": n.value}

    @property
    def n_ctx(self) -> int:
        return self._lib.wqe_context_size(self._h)

    @property
    def n_threads(self) -> int:
        return self._lib.wqe_get_threads(self._h)

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        check(self._lib.wqe_set_threads(self._h, int(n)))

    @property
    def position(self) -> int:
        return self._lib.wqe_get_position(self._h)

    def set_position(self, n_past: int) -> None:
        check(self._lib.wqe_set_position(self._h, int(n_past)))

    def reset(self) -> None:
        self.set_position(0)

    def eval(self, tokens: Sequence[int], all_logits: bool = False, want_logits: bool = True) -> np.ndarray | None:
        """Append tokens to the cache; float32 logits [n_vocab] (last token) or [n, n_vocab] (all_logits)."""
        t = _i32(tokens).reshape(-1)
        V = self.model.n_vocab
        out = None
        if want_logits:
            out = np.empty((len(t), V) if all_logits else (V,), np.float32)
        check(self._lib.wqe_eval(self._h, _ptr(t, C.c_int32), len(t),
                                 _ptr(out, C.c_float) if out is not None else None, int(all_logits)))
        return out

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_at_eos: bool = True,
                 callback: Callable[[int], bool | None] | None = None) -> list[int]:
        """Evaluate prompt at the current position and generate; callback(token) returning True stops.

        The prompt and max_new_tokens must fit in the context (ValueError otherwise, before any work).
        """
        p = _i32(prompt).reshape(-1)
        max_new_tokens = int(max_new_tokens)
        room = self.n_ctx - self.position - len(p)
        if room < 0:
            raise ValueError(f"the prompt ({len(p)} tokens) does not fit in the context ({self.n_ctx} tokens, "
                             f"{self.position} used)")
        if not 1 <= max_new_tokens <= room:
            raise ValueError(f"cannot generate {max_new_tokens} tokens: the context holds {self.n_ctx} tokens and "
                             f"the prompt uses {len(p) + self.position}, so 1 to {room} new tokens fit")
        out = np.zeros(max_new_tokens, np.int32)
        n = C.c_int32()
        sp = _native.SamplerParams(float(temperature), float(top_p), int(top_k), int(seed) & (2**64 - 1))
        errors = []

        def _cb(tok, _user):
            try:
                return 1 if callback(int(tok)) else 0
            except BaseException as e:  # don't let exceptions cross the C boundary
                errors.append(e)
                return 1

        cb = _native.TOKEN_CALLBACK(_cb) if callback else _native.TOKEN_CALLBACK()
        check(self._lib.wqe_generate(self._h, _ptr(p, C.c_int32), len(p), int(max_new_tokens), C.byref(sp),
                                     int(stop_at_eos), cb, None, _ptr(out, C.c_int32), C.byref(n)))
        if errors:
            raise errors[0]
        return [int(x) for x in out[: n.value]]


def _kv_bits_code(kv_bits) -> int:
    """wqe_context_params.kv_bits: 0 the file's (None), 32 float, 8, 4; parsed as `--kv-bits` is (kv_format)."""
    if kv_bits is None:
        return 0
    from wqedge.kv_format import parse_bits
    bits = parse_bits(kv_bits)
    return 32 if bits is None else bits


def _kv_rotation_code(rotation) -> int:
    if rotation is None:
        return 0
    code = {"hadamard": 1, "none": 2}.get(rotation)
    if code is None:
        raise ValueError(f"KV cache rotation must be 'hadamard' or 'none', got {rotation!r}")
    return code


def generate_tokens(model: Model, prompt: str | Sequence[int], max_new_tokens: int = 64, **kw) -> list[int]:
    ctx_kw = {k: kw.pop(k) for k in ("n_ctx", "n_threads", "kv_bits", "kv_rotation") if k in kw}
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else prompt
    with Context(model, **ctx_kw) as ctx:
        return ctx.generate(tokens, max_new_tokens, **kw)


def run(model_path: str | os.PathLike, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
        top_p: float = 1.0, top_k: int = 0, seed: int = 0, n_threads: int = 0, n_ctx: int = 0,
        stream: Callable[[str], None] | None = None, stop_at_eos: bool = True, kv_bits: str | int | None = None,
        kv_rotation: str | None = None) -> str:
    """Generate a continuation of `prompt` with the C++ runtime and return it (the new text only, as it
    reads appended to the prompt).

    stream: called with each new piece of text as it is produced (e.g. print with end="", flush=True).
    kv_bits: the KV cache (None: the file's setting; 'f32', 8 or 4), kv_rotation (None: the file's; 'hadamard' or
    'none'), as Context's.
    """
    with Model(model_path) as model:
        tokens = model.tokenize(prompt)
        limit = model.info["n_ctx_train"]
        if max_new_tokens < 1 or len(tokens) + max_new_tokens > limit:
            raise ValueError(f"the prompt is {len(tokens)} tokens and the model's context is {limit}: "
                             f"ask for 1 to {max(limit - len(tokens), 0)} new tokens (got {max_new_tokens})")
        if n_ctx == 0:
            n_ctx = len(tokens) + max_new_tokens
        pending = bytearray()

        def cb(tok: int):
            if stream is not None:
                pending.extend(model.token_to_piece(tok))
                try:
                    text = pending.decode("utf-8")
                except UnicodeDecodeError:
                    if len(pending) < 4:  # an incomplete UTF-8 sequence: wait for the next piece
                        return False
                    text = pending.decode("utf-8", "replace")
                pending.clear()
                stream(text)
            return False

        with Context(model, n_ctx=n_ctx, n_threads=n_threads, kv_bits=kv_bits, kv_rotation=kv_rotation) as ctx:
            new = ctx.generate(tokens, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, cb)
        if stream is not None and pending:
            stream(pending.decode("utf-8", "replace"))
        # The continuation as it reads after the prompt (decoding the new ids alone would drop a leading space).
        prefix = model.detokenize(tokens)
        full = model.detokenize(list(tokens) + new)
        return full[len(prefix):] if full.startswith(prefix) else model.detokenize(new)


class NativeEvaluator:
    """Logits of token windows from the C++ runtime, in the shape wqedge.perplexity expects.

    evaluator(windows int32[B, T]) -> float32[B, T, n_vocab]; each window starts from an empty cache.
    """

    def __init__(self, model: Model | str | os.PathLike, n_ctx: int = 0, n_threads: int = 0,
                 kv_bits: str | int | None = None, kv_rotation: str | None = None):
        self.model = model if isinstance(model, Model) else Model(model)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.kv = dict(kv_bits=kv_bits, kv_rotation=kv_rotation)
        self._ctx: Context | None = None

    def _context(self, T: int) -> Context:
        if self._ctx is None or self._ctx.n_ctx < T:
            if self._ctx is not None:
                self._ctx.close()
            self._ctx = Context(self.model, n_ctx=max(T, self.n_ctx), n_threads=self.n_threads, **self.kv)
        return self._ctx

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        w = _i32(windows)
        if w.ndim == 1:
            w = w[None]
        B, T = w.shape
        ctx = self._context(T)
        out = np.empty((B, T, self.model.n_vocab), np.float32)
        for b in range(B):
            ctx.reset()
            out[b] = ctx.eval(w[b], all_logits=True)
        ctx.reset()
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None


def logits_fn(model: Model | str | os.PathLike, n_ctx: int = 0, n_threads: int = 0,
              kv_bits: str | int | None = None) -> NativeEvaluator:
    """The LogitsFn of wqedge.perplexity for the C++ runtime: int32[B, T] -> float32[B, T, vocab]."""
    return NativeEvaluator(model, n_ctx=n_ctx, n_threads=n_threads, kv_bits=kv_bits)


# ---------------------------------------------------------------- kernel test hooks
def kv_quantize(x: np.ndarray, bits: int, rotate: bool = True) -> np.ndarray:
    """uint8[n, row_bytes]: rows float32[n, head_dim] as the runtime stores them in a quantized KV cache."""
    xx = np.ascontiguousarray(x, dtype=np.float32)
    n, hd = xx.shape
    L = _native.lib()
    fn = L.wqe_test_kv_quantize
    fn.restype, fn.argtypes = C.c_int64, [C.c_int, C.c_int, C.c_int, C.c_void_p, C.c_int, C.c_void_p]
    rb = fn(int(bits), int(rotate), hd, None, 0, None)
    if rb < 0:
        raise ValueError(f"bad KV cache arguments (bits {bits}, head_dim {hd})")
    rows = np.zeros((n, rb), np.uint8)
    fn(int(bits), int(rotate), hd, xx.ctypes.data, n, rows.ctypes.data)
    return rows


def kv_attend(rows: np.ndarray, bits: int, head_dim: int, q: np.ndarray, p: np.ndarray,
              kernels: str = "scalar") -> tuple[np.ndarray, np.ndarray]:
    """(scores[n] = q . row_i, out[head_dim] = sum_i p_i row_i) over quantized KV rows with a kernel set."""
    L = _native.lib()
    fn = L.wqe_test_kv_attend
    fn.restype = C.c_int
    fn.argtypes = [C.c_int, C.c_int, C.c_void_p, C.c_int, C.c_void_p, C.c_void_p, C.c_int, C.c_void_p, C.c_void_p]
    r = np.ascontiguousarray(rows, dtype=np.uint8)
    qq, pp = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, p))
    s, o = np.zeros(r.shape[0], np.float32), np.zeros(head_dim, np.float32)
    k = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3}[kernels]
    if fn(int(bits), int(head_dim), r.ctypes.data, r.shape[0], qq.ctypes.data, pp.ctypes.data, k, s.ctypes.data,
          o.ctypes.data) != 0:
        raise ValueError(f"kernel set {kernels!r} not available here, or bad arguments")
    return s, o


def row_bytes(action: int, g: int, n_protected: int = 0) -> int:
    return int(_native.lib().wqe_row_bytes(int(action), int(g), int(n_protected)))


def _chunk_args(action, g, protected, rowblocks):
    rb = np.ascontiguousarray(rowblocks, dtype=np.uint8)
    if rb.ndim != 2:
        raise ValueError("rowblocks must be uint8[N, row_bytes]")
    prot = _i32([] if protected is None else protected)
    return rb, prot


def chunk_matvec(action: int, g: int, protected: Iterable[int] | None, rowblocks: np.ndarray, x: np.ndarray,
                 kernels: str = "auto", act: str = "f32") -> np.ndarray:
    """y = W x for one chunk's row-blocks uint8[N, row_bytes] (as in the file), x float32[g]; act='q8' runs the
    int8-activation kernels (fp16 chunks stay float)."""
    rb, prot = _chunk_args(action, g, protected, rowblocks)
    xx = np.ascontiguousarray(x, dtype=np.float32)
    if xx.shape != (g,):
        raise ValueError(f"x must have shape ({g},)")
    y = np.empty(rb.shape[0], np.float32)
    k = {"auto": 0, "scalar": 1, "avx2": 2}[kernels]
    check(_native.lib().wqe_test_chunk_matvec_act(int(action), int(g), len(prot), _ptr(prot, C.c_int32),
                                                  _ptr(rb, C.c_uint8), rb.shape[0], rb.shape[1], _ptr(xx, C.c_float), k,
                                                  _ACTS[act], _ptr(y, C.c_float)))
    return y


def chunk_dequant(action: int, g: int, protected: Iterable[int] | None, rowblocks: np.ndarray,
                  kernels: str = "auto") -> np.ndarray:
    """float32[N, g] weights of one chunk's row-blocks, dequantized by the C++ kernels."""
    rb, prot = _chunk_args(action, g, protected, rowblocks)
    w = np.empty((rb.shape[0], g), np.float32)
    k = {"auto": 0, "scalar": 1, "avx2": 2}[kernels]
    check(_native.lib().wqe_test_chunk_dequant(int(action), int(g), len(prot), _ptr(prot, C.c_int32),
                                               _ptr(rb, C.c_uint8), rb.shape[0], rb.shape[1], k, _ptr(w, C.c_float)))
    return w
