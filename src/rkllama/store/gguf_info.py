"""What /api/tags and /api/show tell about a model file: family, parameter count,
quantization (read from the GGUF header without loading the model) and a sha256 digest.

Both are cached per file (path, size, mtime) by ModelFileFacts, since clients poll the tag list. The
digest hashes the whole file once, in a worker thread, and is remembered across restarts in
`<models dir>/.digests.json` (a dot-file: never listed), as hashing gigabytes on a small
board takes a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BadRequest
from .inside import read_text_inside

# llama.cpp's `general.file_type` (enum llama_ftype) -> the quantization name Ollama shows.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip

# GGUF value types: struct format of the fixed-size ones; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (token lists) are skipped, not kept.
_MAX_KEPT_ARRAY = 64


@dataclass
class GgufInfo:
    metadata: dict[str, Any] = field(default_factory=dict)
    parameter_count: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        return FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else None

    @property
    def chat_template(self) -> str:
        return str(self.metadata.get("tokenizer.chat_template", ""))


def parameter_size(count: int) -> str:
    """Ollama's human form: 134.52M, 1.5B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


# No real key or value (chat templates included) comes near this.
_MAX_STRING_BYTES = 64 * 2**20


class _Reader:
    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > _MAX_STRING_BYTES:  # a damaged header; reading it would exhaust memory
            raise ValueError(f"GGUF string of {length} bytes")
        data = self.handle.read(length)
        if len(data) != length:
            raise ValueError("truncated GGUF header")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if count > _MAX_KEPT_ARRAY and item_kind in _SCALARS:
                self.handle.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
                return None
            items = [self.value(item_kind) for _ in range(count)]
            return items if count <= _MAX_KEPT_ARRAY else None
        raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf(path: Path) -> GgufInfo:
    """Metadata and parameter count; an unreadable header gives an empty GgufInfo."""
    info = GgufInfo()
    try:
        with open(path, "rb") as handle:
            reader = _Reader(handle)
            if handle.read(4) != b"GGUF" or reader.unpack("<I") < 2:
                return info
            tensor_count, kv_count = reader.unpack("<Q"), reader.unpack("<Q")
            for _ in range(kv_count):
                key = reader.string()
                value = reader.value(reader.unpack("<I"))
                if value is not None:
                    info.metadata[key] = value
            for _ in range(tensor_count):
                reader.string()
                dims = [reader.unpack("<Q") for _ in range(reader.unpack("<I"))]
                reader.unpack("<I")  # tensor type
                reader.unpack("<Q")  # data offset
                count = 1
                for dim in dims:
                    count *= dim
                info.parameter_count += count
    except (OSError, ValueError, OverflowError, MemoryError, struct.error):
        return GgufInfo()
    return info


def _key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def gguf_info(path: Path) -> GgufInfo:
    """The header of a .gguf file, read now (ModelFileFacts.gguf caches it); empty otherwise."""
    return read_gguf(path) if path.suffix.lower() == ".gguf" else GgufInfo()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


DIGESTS_FILE = ".digests.json"
MAX_DIGESTS_BYTES = 16 * 1024 * 1024


def _load_digests(root: Path) -> dict[str, str]:
    try:
        data = json.loads(read_text_inside(root / DIGESTS_FILE, root, limit=MAX_DIGESTS_BYTES))
    except (OSError, ValueError, BadRequest):  # missing, unreadable or a link to elsewhere: start afresh
        return {}
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}
    )


def _save_digests(root: Path, digests: dict[str, str]) -> None:
    """Written whole to a temp file then renamed; a failure only costs a rehash later."""
    with contextlib.suppress(OSError):
        fd, temp = tempfile.mkstemp(prefix=".digests.", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(digests, handle)
        os.replace(temp, root / DIGESTS_FILE)


class ModelFileFacts:
    """GGUF headers and digests of one models dir's files, cached per file version (path,
    size, mtime): clients poll the tag list. Lives on the ModelStore."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._info: dict[tuple[str, int, int], GgufInfo] = {}
        self._digests: dict[tuple[str, int, int], str] = {}

    def gguf(self, path: Path) -> GgufInfo:
        if path.suffix.lower() != ".gguf":
            return GgufInfo()
        key = _key(path)
        if key not in self._info:
            self._info[key] = read_gguf(path)
        return self._info[key]

    async def digest(self, path: Path) -> str:
        """sha256 of the model file, hex; computed once per file version (remembered in the dir)."""
        key = _key(path)
        if key in self._digests:
            return self._digests[key]
        root = self.root
        record = f"{path.relative_to(root)}|{key[1]}|{key[2]}"
        digest = _load_digests(root).get(record)
        if digest is None:
            digest = await asyncio.to_thread(_sha256, path)
            persisted = {k: v for k, v in _load_digests(root).items() if (root / k.split("|")[0]).exists()}
            persisted[record] = digest
            _save_digests(root, persisted)
        self._digests[key] = digest
        return digest
