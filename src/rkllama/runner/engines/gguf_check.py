"""Check a GGUF file before llama.cpp loads it, so that an empty, foreign, truncated or
half-downloaded file gets an error naming the problem (llama.cpp only says "failed to load").

The layout (ggml's gguf.cpp): magic "GGUF", version, tensor count, key/value count, the
key/values, one record per tensor (name, dims, type, offset), padding to `general.alignment`,
then the tensor data; each tensor's bytes start at data start + its offset.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

# Value types: size of the fixed-size ones; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
DEFAULT_ALIGNMENT = 32
# ggml tensor types -> (elements per block, bytes per block), for the types models use most;
# the size of a tensor of another type is not checked, only where it starts.
_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2),
}  # fmt: skip
# Bounds against a corrupt header asking for absurd allocations.
_MAX_STRING = 1 << 24
_MAX_DIMS = 8


class GgufProblem(ValueError):
    """What is wrong with the file, in words for the user."""


class _Reader:
    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle

    def read(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise GgufProblem("is truncated: it ends inside its header")
        return data

    def number(self, fmt: str) -> int:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        length = self.number("<Q")
        if length > _MAX_STRING:
            raise GgufProblem("has a corrupt header (a string of impossible length)")
        return self.read(length)

    def skip_value(self, kind: int) -> int | None:
        """Skip one value; return it when it is an unsigned 32-bit number (alignment is one)."""
        if kind == _UINT32:
            return self.number("<I")
        if kind in _SCALAR_SIZES:
            self.read(_SCALAR_SIZES[kind])
        elif kind == _STRING:
            self.string()
        elif kind == _ARRAY:
            item_kind, count = self.number("<I"), self.number("<Q")
            if item_kind in _SCALAR_SIZES:
                self.handle.seek(count * _SCALAR_SIZES[item_kind], os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip_value(item_kind)
        else:
            raise GgufProblem(f"has a corrupt header (unknown value type {kind})")
        return None


def _layout(path: Path) -> tuple[int, int]:
    """(where the tensor data starts, the least size the file must have)."""
    with open(path, "rb") as handle:
        reader = _Reader(handle)
        magic = handle.read(4)
        if magic != b"GGUF":
            raise GgufProblem(f"is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version = reader.number("<I")
        if version < 2:
            raise GgufProblem(f"is GGUF version {version}, which llama.cpp no longer reads")
        tensor_count, kv_count = reader.number("<Q"), reader.number("<Q")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = reader.string()
            value = reader.skip_value(reader.number("<I"))
            if key == b"general.alignment" and value:
                alignment = value
        end = 0  # of the tensor data, relative to its start
        for _ in range(tensor_count):
            reader.string()
            n_dims = reader.number("<I")
            if n_dims > _MAX_DIMS:
                raise GgufProblem("has a corrupt header (a tensor with too many dimensions)")
            elements = 1
            for _ in range(n_dims):
                elements *= reader.number("<Q")
            kind, offset = reader.number("<I"), reader.number("<Q")
            block = _BLOCKS.get(kind)
            size = elements // block[0] * block[1] if block else 1
            end = max(end, offset + size)
        here = handle.tell()
        data_start = here + (-here % alignment)
        return data_start, data_start + end if tensor_count else here


def data_start(path: Path) -> int:
    return _layout(path)[0]


def check_gguf(path: Path) -> None:
    """Raise GgufProblem (its text follows the file's name) when the file cannot be a whole model."""
    size = path.stat().st_size
    if size == 0:
        raise GgufProblem("is empty (0 bytes)")
    try:
        _, needed = _layout(path)
    except struct.error:
        raise GgufProblem("is truncated: it ends inside its header") from None
    if size < needed:
        raise GgufProblem(f"is truncated: it has {size} bytes of the {needed} its header describes")
