"""Safetensors files read and written tensor by tensor, with bounded host memory.

The format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw little-endian data. Reads copy
one tensor (or a row range of it) out of the file; nothing else of the file is kept in memory.
bfloat16 comes through ml_dtypes, which NumPy lacks.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed; the message names the file."""


def dtype_name(dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors") from None


class SafetensorsFile:
    """Header of one file; tensors are read on demand. ``info[name] = (dtype, shape, begin, end)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(
                        f"{self.path}: truncated or corrupt safetensors file (header claims {n} bytes, file has {size})")
                raw = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        data_len = size - self.data_start
        for name, e in header.items():
            try:
                dt, shape, (b, end) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor '{name}' has a malformed header entry {e!r}") from None
            if dt not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype {dt}")
            want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
            if end - b != want or b < 0:
                raise SafetensorsError(f"{self.path}: tensor '{name}' spans {end - b} bytes, but {dt}{list(shape)} "
                                       f"needs {want}")
            if end > data_len:
                raise SafetensorsError(f"{self.path}: truncated: tensor '{name}' ends at byte {end} of the data, "
                                       f"but the file holds only {data_len} data bytes")
            self.info[name] = (dt, shape, b, end)

    def names(self) -> list[str]:
        return list(self.info)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or rows [start, stop) of its leading axis) as a fresh NumPy array."""
        dt, shape, b, end = self.info[name]
        dtype = DTYPES[dt]
        if rows is not None and shape:
            start, stop = rows
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            b, shape = b + start * row, (stop - start, *shape[1:])
            end = b + (stop - start) * row
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != end - b:
            raise SafetensorsError(f"{self.path}: truncated while reading tensor '{name}'")
        return out


def write(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None, *, specs: list[tuple[str, str, tuple[int, ...]]] | None = None) -> int:
    """Write a safetensors file; returns bytes written.

    With ``specs`` ([(name, dtype, shape)]) the header is written first and ``tensors`` may be a
    generator yielding arrays one at a time in that order (streaming: one tensor in memory).
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    if specs is None:
        items = list(items)
        specs = [(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in items]
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dt, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    expected = {n: (dt, tuple(s)) for n, dt, s in specs}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        done = 0
        for name, a in items:
            a = np.asarray(a)
            got = (dtype_name(a.dtype), tuple(a.shape))
            if specs[done][0] != name or got != expected[name]:
                raise SafetensorsError(f"{path}: tensor '{name}' {got} does not match the header entry "
                                       f"{specs[done][0]} {expected.get(specs[done][0])}")
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            del a  # streaming: the next tensor may be produced while this one would still be referenced
            done += 1
        if done != len(specs):
            raise SafetensorsError(f"{path}: wrote {done} of {len(specs)} tensors")
    return 8 + len(raw) + offset
