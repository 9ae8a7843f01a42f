"""The one internal request/response vocabulary that every dialect translates to and from.

Dialect layers (api/native.py, api/ollama.py, api/openai.py) build a `GenerateRequest`,
the scheduler hands it to a runner, and the runner streams back `TokenEvent`s followed by
exactly one `DoneEvent`. These types cross the runner's process boundary as JSON, so they
are plain dataclasses with `to_dict`/`from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    # Assistant tool calls ({"name": ..., "arguments": {...}}) and tool results, as
    # chat templates expect them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # Base64 PNG or JPEG images (checked by images.py), placed before the message's text.
    images: list[str] | None = None


@dataclass
class SamplingOptions:
    """Per-request generation options. None means "use the model's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def merged_over(self, defaults: SamplingOptions) -> SamplingOptions:
        """Request values win; unset ones fall back to `defaults`."""
        mine = asdict(self)
        theirs = asdict(defaults)
        return SamplingOptions(**{k: mine[k] if mine[k] is not None else theirs[k] for k in mine})


@dataclass
class GenerateRequest:
    """Either `messages` (chat: the model's template is applied) or `prompt` (raw text)."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)
    # Constrained output: a JSON schema (dict) or the string "json" for any JSON object.
    response_format: dict[str, Any] | Literal["json"] | None = None
    tools: list[dict[str, Any]] | None = None
    # Name of a tool the model must call ("required" = any of them).
    tool_choice: str | None = None
    enable_thinking: bool | None = None
    # The context this request may use (its num_ctx); None: the loaded model's whole context.
    num_ctx: int | None = None
    # Fit a prompt longer than the context by dropping the oldest messages, then cutting the
    # front (Ollama's default); False: refuse it with a 400 instead.
    truncate: bool = True
    # Images of a raw prompt (Ollama's /api/generate with raw); chat images sit on their messages.
    images: list[str] | None = None

    @property
    def image_count(self) -> int:
        return len(self.images or []) + sum(len(m.images or []) for m in self.messages or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateRequest:
        data = dict(data)
        msgs = data.pop("messages", None)
        opts = data.pop("options", None) or {}
        return cls(
            messages=[ChatMessage(**m) for m in msgs] if msgs is not None else None,
            options=SamplingOptions(**opts),
            **data,
        )


@dataclass
class TokenEvent:
    text: str
    type: Literal["token"] = "token"
    # How many generated tokens the text holds (the runner sends tokens close in time together).
    tokens: int = 1


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Milliseconds spent evaluating the prompt and generating the reply.
    prompt_ms: float = 0.0
    generate_ms: float = 0.0
    # Prompt tokens whose KV was reused from an earlier request (not evaluated again).
    cached_tokens: int = 0
    # How the prompt was fitted into the context: messages dropped, then tokens cut.
    dropped_messages: int = 0
    truncated_tokens: int = 0

    @property
    def evaluated_tokens(self) -> int:
        """Prompt tokens evaluated by this request (Ollama's prompt_eval_count)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_messages or self.truncated_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_second(self) -> float:
        if self.generate_ms <= 0:
            return 0.0
        return self.completion_tokens / (self.generate_ms / 1000.0)


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass
class DoneEvent:
    finish_reason: FinishReason
    usage: Usage
    type: Literal["done"] = "done"


@dataclass
class EmbedRequest:
    inputs: list[str]
    truncate: bool = True


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int


@dataclass
class ModelInfo:
    """What the runner learned about a model when loading it."""

    engine: str
    context_length: int
    metadata: dict[str, str] = field(default_factory=dict)
    # How many requests the runner may run at once (llama.cpp's NUM_PARALLEL; rkllm: 1).
    parallel: int = 1
    # CPU threads the engine computes with (llama.cpp's NUM_THREAD; rkllm: CPUs in its mask).
    threads: int = 0
    # The sequences share one KV pool of context_length cells (llama.cpp's KV_UNIFIED).
    kv_unified: bool = False
