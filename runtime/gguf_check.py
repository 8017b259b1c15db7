"""Structural check of a GGUF file before any parser trusts the lengths and counts written in it.

gguf.GGUFReader believes every count it reads: an array that claims 2**47 elements makes it loop and
allocate without bound (a 1 KB file grew to 4 GB in 23 s). `check_gguf` walks the same structure with
the bounds of the C++ loader (cpp/src/gguf.cpp): every string, array and tensor must fit in the bytes
that remain, counts are bounded by the file size, tensors have 1..4 dimensions of 1..2**40 elements, a
known ggml type, and data inside the file at an aligned offset. It reads only the header (no tensor data)
and needs nothing but the standard library and `gguf`'s type table, so every reader calls it first.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import gguf


class FormatError(ValueError):
    """The file is not a (wqedge) GGUF this version can read."""


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9
MAX_DIM = 1 << 40
MAX_ARRAY_DEPTH = 2


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.size, self.pos, self.path = buf, len(buf), 0, path
        self.what = "header"

    def error(self, msg: str):
        raise FormatError(f"{self.path}: {msg}")

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            self.error(f"truncated file: {self.what} needs {n} bytes at offset {self.pos} "
                       f"but the file has {self.size}")

    def u32(self) -> int:
        self.need(4)
        v = struct.unpack_from("<I", self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        v = struct.unpack_from("<Q", self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self) -> bytes:
        n = self.u64()
        if n > self.size - self.pos:
            self.error(f"{self.what}: string length {n} at offset {self.pos - 8} runs past the end of the file "
                       f"({self.size} bytes)")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s


def _value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    """Skip one value, bounding every count; return it when it is a scalar u32 (for general.alignment)."""
    if vtype == _STRING:
        c.string()
        return None
    if vtype == _ARRAY:
        if depth > MAX_ARRAY_DEPTH:
            c.error(f"key '{key}': arrays nested too deeply")
        etype, count = c.u32(), c.u64()
        remaining = c.size - c.pos
        if etype == _STRING:
            if count > remaining // 8:
                c.error(f"key '{key}': string array of {count} elements cannot fit in the file")
            for _ in range(count):
                c.string()
        elif etype == _ARRAY:
            if count > remaining // 12:
                c.error(f"key '{key}': nested array of {count} elements cannot fit in the file")
            for _ in range(count):
                _value(c, _ARRAY, key, depth + 1)
        else:
            es = _SCALAR.get(etype)
            if es is None:
                c.error(f"key '{key}': unknown array element type {etype}")
            if count > remaining // es:
                c.error(f"key '{key}': array of {count} elements of {es} bytes runs past the end of the file")
            c.pos += count * es
        return None
    es = _SCALAR.get(vtype)
    if es is None:
        c.error(f"key '{key}': unknown value type {vtype}")
    c.need(es)
    v = struct.unpack_from("<I", c.buf, c.pos)[0] if vtype == 4 else None
    c.pos += es
    return v


def check_gguf(path: str | os.PathLike) -> None:
    """Raise FormatError unless `path` is a structurally sound GGUF (v2/v3, little-endian) whose every
    length and count fits in the file; read the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise FormatError(f"{path}: not a regular file")
        if size < 24:
            raise FormatError(f"{path}: file too small to be GGUF ({size} bytes)")
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check(_Cursor(memoryview(buf), path))
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None


def _unique_name(c: _Cursor, seen: set, kind: str) -> str:
    """Read a key or tensor name; a repeated one is an error. Later messages name it."""
    c.what = f"a {kind}"
    name = c.string().decode("utf-8", "replace")
    if name in seen:
        c.error(f"duplicate {kind} '{name}'")
    seen.add(name)
    c.what = f"{kind} '{name}'"
    return name


def _check(c: _Cursor) -> None:
    try:
        if bytes(c.buf[:4]) != b"GGUF":
            c.error(f"bad magic {bytes(c.buf[:4])!r}: not a GGUF file")
        c.pos = 4
        version = c.u32()
        if version not in (2, 3):
            c.error(f"unsupported GGUF version {version} (expected 3, little-endian)")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_kv > c.size // 12:
            c.error(f"absurd key count {n_kv} for a {c.size}-byte file")
        if n_tensors > c.size // 24:
            c.error(f"absurd tensor count {n_tensors} for a {c.size}-byte file")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        keys = set()
        for _ in range(n_kv):
            key = _unique_name(c, keys, "key")
            vtype = c.u32()
            v = _value(c, vtype, key)
            if key == "general.alignment":
                if vtype != 4:
                    c.error("key 'general.alignment' must be a u32")
                if v == 0 or v % 8 or v & (v - 1) or v > 65536:
                    c.error(f"general.alignment = {v} is not a power of two from 8 to 65536 (GGUF requires a "
                            "multiple of 8)")
                alignment = v
        tensors = []
        names = set()
        for _ in range(n_tensors):
            name = _unique_name(c, names, "tensor")
            n_dims = c.u32()
            if not 1 <= n_dims <= 4:
                c.error(f"tensor '{name}': {n_dims} dimensions (1 to 4 allowed)")
            dims = [c.u64() for _ in range(n_dims)]
            if any(d == 0 or d > MAX_DIM for d in dims):
                c.error(f"tensor '{name}': absurd dimensions {dims}")
            ttype = c.u32()
            try:
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                c.error(f"tensor '{name}': unknown ggml type {ttype}")
            n_elems = 1
            for d in dims:
                n_elems *= d
            if dims[0] % block:
                c.error(f"tensor '{name}': row of {dims[0]} is not a multiple of the type's block of {block}")
            nbytes = n_elems // block * block_bytes
            offset = c.u64()
            tensors.append((name, offset, nbytes))
        start = c.pos + (-c.pos) % alignment
        if tensors and start > c.size:
            c.error(f"truncated file: tensor data would start at {start} but the file has {c.size} bytes")
        data = c.size - start
        for name, offset, nbytes in tensors:
            if offset % alignment:
                c.error(f"tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}")
            if offset > data or nbytes > data - offset:
                c.error(f"tensor '{name}': {nbytes} bytes at data offset {offset} run past the end of the file "
                        f"(data section {data} bytes): truncated file")
    finally:
        c.buf.release()


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """gguf.GGUFReader for `path`, after check_gguf; any failure is a FormatError that names the file."""
    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors of many kinds on garbage
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from None
