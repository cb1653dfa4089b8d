"""A small, fast GGUF reader: header, key/values and tensor table; tensor data as zero-copy memmap slices.

Contract: ``GGUFFile(path)`` parses the file once (the ``gguf`` package's reader takes ~10 s on the 262k-token
vocabulary because it builds one numpy view per string; this one reads string arrays in a single pass and numeric
arrays with ``np.frombuffer``). ``.metadata`` is a dict of Python values (numeric arrays as lists), ``.tensors`` a
list of :class:`GGUFTensor`. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
# value type id -> (struct format, numpy dtype)
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
            4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
            10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the fastest-varying (row length)
    tensor_type: Any        # gguf.GGMLQuantizationType
    data: np.ndarray        # raw bytes (uint8 memmap slice)


class GGUFFile:
    """Parsed GGUF file. Example: ``f = GGUFFile(path); f.metadata["general.architecture"]; f.tensors[0].name``.

    ``source`` is a path or a byte buffer (e.g. ``gguf.GGUFReader(...).data``). Big-endian files are read for their
    metadata (tokenizers); their tensors are refused.
    """

    def __init__(self, source: str | os.PathLike | Any):
        self.path = Path(source) if isinstance(source, (str, os.PathLike)) else None
        name = str(self.path) if self.path else "GGUF buffer"
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path else np.frombuffer(
                memoryview(source).cast("B"), dtype=np.uint8)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"{name}: cannot open ({exc})") from exc
        self._buf = memoryview(self._mm)
        self._pos = 0
        self._bo = "<"
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
            raise ModelError(f"{name}: not a valid GGUF file ({exc})") from exc

    # ------------------------------------------------------------------------------------------ primitives
    def _read(self, fmt: str) -> Any:
        fmt = self._bo + fmt
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file (truncated?)")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._read("I"), self._read("Q")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype][1]).newbyteorder(self._bo)
                if self._pos + count * dt.itemsize > len(self._buf):
                    raise ValueError("array runs past the end of the file (truncated?)")
                arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._pos)
                self._pos += count * dt.itemsize
                return arr.tolist()
            return [self._value(itype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")

    # ------------------------------------------------------------------------------------------ layout
    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError("bad magic (not GGUF)")
        self._pos = 4
        self.version = self._read("I")
        if self.version & 0xFFFF == 0:  # a big-endian file stores its version byte-swapped (as gguf-py detects)
            self._bo = ">"
            self._pos = 4
            self.version = self._read("I")
        if self.version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._read("Q") for _ in range(self._read("I")))
            qtype = GGMLQuantizationType(self._read("I"))
            infos.append((name, dims, qtype, self._read("Q")))
        if infos and self._bo == ">":
            raise ValueError("big-endian GGUF tensors are not supported")
        align = int(self.metadata.get("general.alignment", 32))
        start = (self._pos + align - 1) // align * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims)) if dims else 1
            nbytes = n_elems // block * type_size
            begin = start + offset
            if begin + nbytes > len(self._mm):
                raise ValueError(f"tensor {name} extends past the end of the file (truncated?)")
            self.tensors.append(GGUFTensor(name=name, shape=dims, tensor_type=qtype,
                                           data=self._mm[begin:begin + nbytes]))
