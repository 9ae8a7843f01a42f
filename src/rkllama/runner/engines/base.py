"""The narrow seam between a runner process and the engine that runs a model.

An engine is created in the runner subprocess from a `LoadSpec`, then serves one request
at a time, or up to `info.parallel` at once, each `generate` in its own thread (llama.cpp
decodes them together in one batch). `generate` yields text pieces and ends with exactly one `DoneEvent`; it checks
`cancel` between tokens (or aborts the native run) so a disconnected client stops work.
Anything else (llama.cpp's own llama-server, a remote runner) can sit behind this seam
without the API layer noticing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...types import DoneEvent, EmbedRequest, EmbedResult, GenerateRequest, ModelInfo, TokenEvent


@dataclass
class LoadSpec:
    """Everything a runner needs to load a model; sent to it as JSON."""

    name: str
    path: str
    format: str  # "gguf" or "rkllm"
    # Modelfile values (upper-case keys), for engine-specific settings such as NUM_CTX.
    modelfile: dict[str, str] = field(default_factory=dict)
    # Load-time overrides from the request (e.g. Ollama's num_ctx), by lower-case name.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The vision file (llama.cpp projector GGUF or rkllm .rknn encoder), checked to be inside
    # the model's folder by the store; None: the model takes no images.
    vision_path: str | None = None


class EngineError(Exception):
    """A clear, client-facing refusal of a request (prompt too long, bad schema): a 400."""

    client_error = True


class EngineRuntimeError(EngineError):
    """The engine failed while running a valid request (a native runtime error): a 502."""

    client_error = False


class Engine(Protocol):
    info: ModelInfo

    def generate(self, request: GenerateRequest, cancel: threading.Event) -> Iterator[TokenEvent | DoneEvent]: ...

    def embed(self, request: EmbedRequest) -> EmbedResult: ...

    def tokenize(self, text: str) -> list[int]: ...

    def close(self) -> None: ...
