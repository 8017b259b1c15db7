"""ctypes declarations of libwqedge's C API (cpp/include/wqedge.h) and where the library is found.

The library is looked up, first found wins:
  1. $WQEDGE_LIB (a path to libwqedge.so);
  2. a development build in the source tree: cpp/build/libwqedge.so next to this package's folder
     (so tests run against `cmake --build cpp/build` without reinstalling);
  3. the copy installed inside the package by `pip install .` (wqedge/runtime/libwqedge.so).
numpy and the standard library only; no torch.
"""
from __future__ import annotations

import ctypes as C
import os
import sys
from pathlib import Path

_LIBNAME = {"darwin": "libwqedge.dylib", "win32": "wqedge.dll"}.get(sys.platform, "libwqedge.so")

# Status codes (enum wqe_status).
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_IO = 2
ERR_FORMAT = 3
ERR_UNSUPPORTED = 4
ERR_OUT_OF_MEMORY = 5
ERR_CONTEXT_FULL = 6
ERR_BUFFER_TOO_SMALL = 7
ERR_NO_TOKENIZER = 8
ERR_INTERNAL = 9

KERNELS_AUTO, KERNELS_SCALAR, KERNELS_AVX2 = 0, 1, 2


class NativeError(RuntimeError):
    """A failed libwqedge call: .code is the WQE_ERR_* status, .status_name its name."""

    def __init__(self, code: int, status_name: str, message: str):
        super().__init__(f"{message} [{status_name}]" if message else status_name)
        self.code = code
        self.status_name = status_name
        self.message = message


class LibraryNotFound(ImportError):
    pass


class ModelInfo(C.Structure):
    _fields_ = [(n, C.c_int32) for n in (
        "n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx_train", "group_size",
        "format_version", "bos_token_id", "eos_token_id", "add_bos", "tied_embeddings", "has_tokenizer",
        "rope_scaled")] + [
        ("rope_freq_base", C.c_float), ("rms_eps", C.c_float), ("effective_bits", C.c_float),
        ("file_bytes", C.c_uint64), ("quantized_bytes", C.c_uint64)]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_}


class ContextParams(C.Structure):
    _fields_ = [("n_ctx", C.c_int32), ("n_threads", C.c_int32), ("kv_bits", C.c_int32), ("kv_rotation", C.c_int32)]


class SamplerParams(C.Structure):
    _fields_ = [("temperature", C.c_float), ("top_p", C.c_float), ("top_k", C.c_int32), ("seed", C.c_uint64)]


TOKEN_CALLBACK = C.CFUNCTYPE(C.c_int, C.c_int32, C.c_void_p)

_i32p = C.POINTER(C.c_int32)
_f32p = C.POINTER(C.c_float)
_u8p = C.POINTER(C.c_uint8)
_vp = C.c_void_p

_SIGNATURES = {
    "wqe_last_error": (C.c_char_p, []),
    "wqe_status_name": (C.c_char_p, [C.c_int]),
    "wqe_version": (C.c_char_p, []),
    "wqe_system_info": (C.c_char_p, []),
    "wqe_read_bandwidth": (C.c_double, [C.c_int32, C.c_uint64, C.c_int32]),
    "wqe_set_kernels": (C.c_int, [C.c_int]),
    "wqe_get_kernels": (C.c_int, []),
    "wqe_set_activations": (C.c_int, [C.c_int]),
    "wqe_get_activations": (C.c_int, []),
    "wqe_model_open": (C.c_int, [C.c_char_p, C.POINTER(_vp)]),
    "wqe_model_free": (None, [_vp]),
    "wqe_model_get_info": (C.c_int, [_vp, C.POINTER(ModelInfo)]),
    "wqe_model_plan": (C.c_char_p, [_vp]),
    "wqe_model_chat_template": (C.c_int, [_vp, C.c_char_p, C.c_size_t, C.POINTER(C.c_size_t)]),
    "wqe_tokenize": (C.c_int, [_vp, C.c_char_p, C.c_size_t, C.c_int, _i32p, C.c_int32, _i32p]),
    "wqe_detokenize": (C.c_int, [_vp, _i32p, C.c_int32, C.c_char_p, C.c_size_t, C.POINTER(C.c_size_t)]),
    "wqe_token_to_piece": (C.c_int, [_vp, C.c_int32, C.c_int, C.c_char_p, C.c_size_t, C.POINTER(C.c_size_t)]),
    "wqe_context_default_params": (ContextParams, []),
    "wqe_context_new": (C.c_int, [_vp, C.POINTER(ContextParams), C.POINTER(_vp)]),
    "wqe_context_free": (None, [_vp]),
    "wqe_set_threads": (C.c_int, [_vp, C.c_int32]),
    "wqe_get_threads": (C.c_int32, [_vp]),
    "wqe_context_size": (C.c_int32, [_vp]),
    "wqe_context_kv_cache": (C.c_int, [_vp, _i32p, _i32p, C.POINTER(C.c_uint64)]),
    "wqe_get_position": (C.c_int32, [_vp]),
    "wqe_set_position": (C.c_int, [_vp, C.c_int32]),
    "wqe_eval": (C.c_int, [_vp, _i32p, C.c_int32, _f32p, C.c_int]),
    "wqe_sampler_default_params": (SamplerParams, []),
    "wqe_sampler_new": (C.c_int, [C.POINTER(SamplerParams), C.POINTER(_vp)]),
    "wqe_sampler_free": (None, [_vp]),
    "wqe_sample": (C.c_int, [_vp, _f32p, C.c_int32, _i32p]),
    "wqe_generate": (C.c_int, [_vp, _i32p, C.c_int32, C.c_int32, C.POINTER(SamplerParams), C.c_int, TOKEN_CALLBACK,
                               _vp, _i32p, _i32p]),
    "wqe_test_chunk_matvec": (C.c_int, [C.c_int, C.c_int32, C.c_int32, _i32p, _u8p, C.c_int32, C.c_size_t, _f32p,
                                        C.c_int, _f32p]),
    "wqe_test_chunk_matvec_act": (C.c_int, [C.c_int, C.c_int32, C.c_int32, _i32p, _u8p, C.c_int32, C.c_size_t,
                                            _f32p, C.c_int, C.c_int, _f32p]),
    "wqe_test_chunk_dequant": (C.c_int, [C.c_int, C.c_int32, C.c_int32, _i32p, _u8p, C.c_int32, C.c_size_t, C.c_int,
                                         _f32p]),
    "wqe_row_bytes": (C.c_int64, [C.c_int, C.c_int32, C.c_int32]),
    "wqe_test_compact_params": (C.c_int, [C.c_int, _u8p, C.c_int32, C.c_uint16, C.POINTER(C.c_uint16),
                                          C.POINTER(C.c_uint16)]),
}

# Symbols newer than the first release of the C API: a library without them still loads.
_OPTIONAL = {"wqe_set_activations", "wqe_get_activations", "wqe_test_chunk_matvec_act", "wqe_model_chat_template",
             "wqe_context_kv_cache", "wqe_read_bandwidth", "wqe_test_compact_params"}


def candidate_paths() -> list[Path]:
    here = Path(__file__).resolve().parent
    out = []
    env = os.environ.get("WQEDGE_LIB")
    if env:
        out.append(Path(env))
    out.append(here.parent / "cpp" / "build" / _LIBNAME)  # source checkout (editable install or PYTHONPATH)
    for d in dict.fromkeys([here, *(Path(p) for p in globals().get("__path__", []))]):
        out.append(d / _LIBNAME)
    try:  # installed package folders (editable installs may keep the built library elsewhere)
        import importlib.util
        spec = importlib.util.find_spec(__package__) if __package__ else None
        for p in (spec.submodule_search_locations or []) if spec else []:
            out.append(Path(p) / _LIBNAME)
    except Exception:
        pass
    return list(dict.fromkeys(out))


_lib = None
_lib_path: Path | None = None


def library_path() -> Path:
    """Path of the library in use (loading it if needed)."""
    lib()
    return _lib_path


def lib() -> C.CDLL:
    """The loaded library, declared; raises LibraryNotFound with the places searched."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    tried = []
    for p in candidate_paths():
        if not p.is_file():
            tried.append(f"{p} (absent)")
            continue
        try:
            handle = C.CDLL(str(p))
        except OSError as e:
            tried.append(f"{p} ({e})")
            continue
        for name, (res, args) in _SIGNATURES.items():
            if name in _OPTIONAL and not hasattr(handle, name):
                continue  # an older library: the Python call that needs it raises AttributeError
            f = getattr(handle, name)
            f.restype = res
            f.argtypes = args
        _lib, _lib_path = handle, p
        return _lib
    raise LibraryNotFound("libwqedge not found; build it (cmake -S cpp -B cpp/build && cmake --build cpp/build) or "
                          "pip install the package, or set WQEDGE_LIB. Tried: " + "; ".join(tried))


def check(status: int) -> None:
    """Raise NativeError for a non-zero status, with the library's message."""
    if status != OK:
        L = lib()
        raise NativeError(status, L.wqe_status_name(status).decode(), L.wqe_last_error().decode("utf-8", "replace"))


def available() -> bool:
    try:
        lib()
        return True
    except LibraryNotFound:
        return False
