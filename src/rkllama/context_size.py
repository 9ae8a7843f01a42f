"""How large a context a model is loaded with (see docs/modelfile.md, "Context length").

The default is the model's trained context (GGUF `<arch>.context_length`), as llama-server's
`-c 0` does, lowered only so that the KV cache of NUM_PARALLEL sequences fits the KV cache
budget (`--kv-cache-budget`, default a quarter of the machine's memory). An explicit size wins:
a request's `num_ctx`, else the Modelfile's NUM_CTX, else `--context-length`
(RKLLAMA_CONTEXT_LENGTH, like OLLAMA_CONTEXT_LENGTH). Explicit sizes above the trained context
are lowered to it; when NUM_PARALLEL sequences of an explicit size do not fit the budget, fewer
sequences run at once.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

log = logging.getLogger(__name__)

# llama.cpp keeps K and V in f16 by default: two bytes per element.
KV_BYTES_PER_ELEMENT = 2
# The default context is never lowered below this by the budget (nor above the trained one).
MIN_DEFAULT_CONTEXT = 2048
# Contexts are multiples of this (llama.cpp pads the KV cache to 256 cells anyway).
CONTEXT_STEP = 256
# Used when nothing says better (a GGUF without context_length).
FALLBACK_CONTEXT = 4096
DEFAULT_PARALLEL = 4
# The largest num_ctx accepted for a model whose trained context is unknown (rkllm).
MAX_UNKNOWN_CONTEXT = 131072

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "4GiB", "512M", "2g" or a plain number of MiB."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GiB, 512MiB, or a number of MiB)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def default_kv_budget() -> int:
    """A quarter of the machine's physical memory, in bytes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return total // 4


def kv_unified(modelfile: Mapping[str, str]) -> bool:
    """KV_UNIFIED from the Modelfile, else RKLLAMA_KV_UNIFIED; on unless set to a no (one KV
    pool for a model's sequences, as llama-server's default slots). Both the scheduler's memory
    estimate and the llama.cpp engine read it here, so they agree."""
    value = modelfile.get("KV_UNIFIED", os.environ.get("RKLLAMA_KV_UNIFIED")) or ""
    return value.strip().lower() not in {"0", "false", "off", "no"}


def parking_bytes(modelfile: Mapping[str, str], context: int, bytes_per_token: int | None) -> int:
    """Host RAM for the caches of idle sequences moved out of a shared pool: as much as one
    context of KV cache (what the memory estimate counts), less if CACHE_RAM in the Modelfile
    or RKLLAMA_CACHE_RAM says so (a size, e.g. 512MiB; 0 turns parking off)."""
    one_context = context * (bytes_per_token or 0)
    value = (modelfile.get("CACHE_RAM") or os.environ.get("RKLLAMA_CACHE_RAM") or "").strip()
    if not value:
        return one_context
    try:
        return min(parse_size(value), one_context)
    except ValueError as exc:
        raise ValueError(f"CACHE_RAM: {exc}") from None


def kv_contexts(parallel: int, unified: bool) -> int:
    """How many contexts of KV cache `parallel` sequences take: one each, or one shared pool
    plus at most as much again in host RAM for idle sequences' caches (see parking_bytes)."""
    if parallel == 1:
        return 1
    return 2 if unified else parallel


def trained_context(metadata: dict[str, Any]) -> int | None:
    value = metadata.get(f"{metadata.get('general.architecture', '')}.context_length")
    return value if isinstance(value, int) and value > 0 else None


def kv_bytes_per_token(metadata: dict[str, Any]) -> int | None:
    """Bytes of KV cache one token takes in one sequence, from the GGUF header; None when the
    header does not say (then the budget cannot lower the default)."""
    arch = metadata.get("general.architecture", "")

    def number(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values: the largest is the safe guess
            value = max((v for v in value if isinstance(v, int)), default=None)
        return value if isinstance(value, int) and value > 0 else None

    layers, heads = number("block_count"), number("attention.head_count")
    kv_heads = number("attention.head_count_kv") or heads
    embedding = number("embedding_length")
    head_dim = embedding // heads if embedding and heads else None
    key_dim = number("attention.key_length") or head_dim
    value_dim = number("attention.value_length") or head_dim
    if not (layers and kv_heads and key_dim and value_dim):
        return None
    return layers * kv_heads * (key_dim + value_dim) * KV_BYTES_PER_ELEMENT


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class ContextPlan:
    context: int
    parallel: int
    reason: str  # where the size came from, for the log


@dataclass(frozen=True)
class ContextLimits:
    """What the plan works with: read from the model file, the Modelfile and the settings."""

    trained: int | None
    bytes_per_token: int | None
    parallel: int
    modelfile_ctx: int | None
    setting_ctx: int | None
    budget: int
    # KV_UNIFIED: the sequences share one context's KV pool instead of one context each.
    unified: bool = False

    @classmethod
    def of(
        cls, metadata: dict[str, Any], modelfile: dict[str, str], setting_ctx: int | None, budget: int
    ) -> ContextLimits:
        parallel = _int(modelfile.get("NUM_PARALLEL")) or _int(os.environ.get("RKLLAMA_NUM_PARALLEL"))
        return cls(
            trained=trained_context(metadata),
            bytes_per_token=kv_bytes_per_token(metadata),
            parallel=max(1, parallel or DEFAULT_PARALLEL),
            modelfile_ctx=_int(modelfile.get("NUM_CTX")),
            setting_ctx=setting_ctx,
            budget=budget,
            unified=kv_unified(modelfile),
        )

    def check_request(self, num_ctx: int) -> None:
        """A request's num_ctx: between 1 and the trained context, and within the budget for
        one sequence. Anything else is a 400 naming the field and the limit."""
        limit = self.trained or MAX_UNKNOWN_CONTEXT
        what = "the model's trained context" if self.trained else "the largest context this server loads"
        if not 1 <= num_ctx <= limit:
            raise BadRequest(f"'num_ctx' must be between 1 and {limit} ({what}), got {num_ctx}.")
        if self.bytes_per_token and num_ctx * self.bytes_per_token > self.budget:
            need, have = num_ctx * self.bytes_per_token >> 20, self.budget >> 20
            raise BadRequest(
                f"'num_ctx' {num_ctx} needs {need} MiB of KV cache, more than the KV cache budget of {have} MiB "
                "(rkllama serve --kv-cache-budget)."
            )

    def plan(self, requested: int | None = None) -> ContextPlan:
        explicit = next(
            (
                (value, reason)
                for value, reason in (
                    (requested, "the request's num_ctx"),
                    (self.modelfile_ctx, "the Modelfile's NUM_CTX"),
                    (self.setting_ctx, "--context-length"),
                )
                if value
            ),
            None,
        )
        if explicit is None:
            return self._default()
        context, reason = explicit
        if self.trained and context > self.trained:
            log.warning("%s asks for a context of %d; the model was trained for %d", reason, context, self.trained)
            context, reason = self.trained, f"{reason}, lowered to the trained context"
        parallel = self.parallel
        if self.bytes_per_token and not self.unified:
            fits = self.budget // (context * self.bytes_per_token)
            if fits < parallel:
                parallel = max(1, fits)
                reason += f"; {parallel} sequence(s) at once to fit the KV cache budget"
        return ContextPlan(context, parallel, reason)

    def _default(self) -> ContextPlan:
        trained = self.trained or FALLBACK_CONTEXT
        reason = "the trained context" if self.trained else "the fallback context"
        if self.bytes_per_token is None:
            return ContextPlan(trained, self.parallel, reason)
        per_context = kv_contexts(self.parallel, self.unified) * self.bytes_per_token
        fits = self.budget // per_context // CONTEXT_STEP * CONTEXT_STEP
        if fits >= trained:
            return ContextPlan(trained, self.parallel, reason)
        context = max(fits, min(trained, MIN_DEFAULT_CONTEXT))
        return ContextPlan(context, self.parallel, f"{reason} ({trained}) lowered to fit the KV cache budget")
