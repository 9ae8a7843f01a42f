"""How much memory a model needs once loaded, and how much the server may spend on models.

The scheduler keeps the estimates of the loaded models under the memory budget
(`--memory-budget`): before a load it evicts the least recently used idle models until the
new one fits, and refuses a model that could never fit before unloading anything.

Estimates are made before loading, from what is on disk: a GGUF model needs its file (mapped
into memory) plus its KV cache, context x sequences x the KV bytes per token read from the GGUF
header; an `.rkllm` model needs its file size x 1.2, as Rockchip's own tooling reckons it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .context_size import parse_size

# Rockchip's rule of thumb for the runtime's working memory beside the weights.
RKLLM_MEMORY_FACTOR = 1.2
# The default budget: this share of the memory available when the server starts.
DEFAULT_BUDGET_FRACTION = 0.8

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # bytes of the model file
    kv_cache: int  # bytes of the KV cache (0 when not known, or not ours to size: rkllm)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self) -> str:
        if not self.kv_cache:
            return f"about {mib(self.total)} MiB"
        return f"about {mib(self.total)} MiB (weights {mib(self.weights)} MiB + KV cache {mib(self.kv_cache)} MiB)"


def mib(size: int) -> int:
    return (size + (1 << 20) - 1) >> 20


def gguf_need(file_size: int, kv_bytes_per_token: int | None, context: int, sequences: int) -> MemoryNeed:
    return MemoryNeed(weights=file_size, kv_cache=(kv_bytes_per_token or 0) * context * sequences)


def rkllm_need(file_size: int) -> MemoryNeed:
    return MemoryNeed(weights=int(file_size * RKLLM_MEMORY_FACTOR), kv_cache=0)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping), else physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_memory_budget(text: str | None, available: int | None = None) -> int:
    """Bytes from a budget setting: a share of the available memory ("80%", "0.8") or a size
    ("6GiB", "512M", a plain number of MiB). None: the default share."""
    if available is None:
        available = available_memory()
    if text is None or not text.strip():
        return int(available * DEFAULT_BUDGET_FRACTION)
    match = _FRACTION.match(text)
    if match:
        number, percent = float(match.group(1)), match.group(2)
        share = number / 100 if percent else number
        if percent or share <= 1:
            if not 0 < share <= 1:
                raise ValueError(f"a share of memory must be above 0 and at most 100%, got {text!r}")
            return int(available * share)
    return parse_size(text)
