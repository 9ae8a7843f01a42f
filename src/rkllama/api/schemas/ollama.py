"""Ollama's response shapes (docs/api.md of ollama/ollama), as this server sends them.

Requests are described by the models that parse them (api/ollama_wire.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..ollama_wire import (
    ChatBody,
    CopyBody,
    CreateBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    ModelBody,
    PullBody,
)
from . import ALWAYS, GENERATES, WITH_BODY, any_of, errors, inline_schema, json_body, ok, rename_property, route
from .common import Strict, Truncation

MODEL = "smollm2:135m"


class Version(Strict):
    version: str
    engines: dict[str, dict[str, Any]] = Field(
        description="llama.cpp (llama-cpp-python's version) and rkllm (library, runtime version, ABI, SoC)."
    )
    soc: str | None = Field(description="The Rockchip SoC, when this is a supported board.")
    machine: str
    python: str


class Details(Strict):
    parent_model: str
    format: str = Field(description="gguf or rkllm.")
    family: str | None
    families: list[str] | None
    parameter_size: str
    quantization_level: str | None


class ModelSummary(Strict):
    name: str = Field(description="name:tag")
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class Tags(Strict):
    models: list[ModelSummary]


class RunningModel(Strict):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str = Field(description="When the model will be unloaded (far in the future: kept loaded).")
    size_vram: int
    context_length: int
    num_thread: int | None = Field(None, description="CPU threads the model's runner uses (not Ollama's).")
    num_parallel: int | None = Field(None, description="Requests the model answers at once (not Ollama's).")
    kv_unified: bool | None = Field(
        None, description="Its sequences share one KV pool of context_length tokens (KV_UNIFIED; not Ollama's)."
    )


class Running(Strict):
    models: list[RunningModel]


class Show(Strict):
    modelfile: str
    parameters: str
    template: str | None
    system: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    context_length: int | None = Field(None, description="The context a load gets by default (num_ctx).")


class Status(Strict):
    """One progress line of pull and create (and their reply with stream false)."""

    status: str
    total: int | None = None
    completed: int | None = None


class StreamError(Strict):
    """The last line of a stream that failed after its 200."""

    error: str


class FunctionCall(Strict):
    name: str
    arguments: dict[str, Any]


class ToolCall(Strict):
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class _Final(Truncation):
    """Fields of the last object (`done` true): timings in nanoseconds, token counts."""

    done_reason: Literal["stop", "length", "load", "unload"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateChunk(_Final):
    """The reply (stream false), or one NDJSON line; the last has `done` true and the timings."""

    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool


class ChatChunk(_Final):
    """The reply (stream false), or one NDJSON line; the last has `done` true and the timings."""

    model: str
    created_at: str
    message: ChatMessage
    done: bool


class Embed(Strict):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class Embedding(Strict):
    embedding: list[float]


STREAM = "With stream true (the default): one JSON object per line; a failure after the 200 is a last line {'error'}."


# --- the routes' documentation (keyword arguments of their decorators) ----------------------
VERSION = route(ok("The server's version.", json=Version), errors(*ALWAYS))
TAGS = route(ok("Local models.", json=Tags), errors(*ALWAYS))
PS = route(ok("Loaded models.", json=Running), errors(*ALWAYS))
SHOW = route(
    ok("The model's details.", json=Show),
    errors(*WITH_BODY, 404),
    body=json_body(ModelBody, example={"model": MODEL}, required=("model",)),
)
DELETE = route(
    ok("Deleted (empty body)."),
    errors(*WITH_BODY, 404, 409),
    body=json_body(ModelBody, required=("model",)),
    empty=True,
)
COPY = route(
    ok("Copied (empty body)."),
    errors(*WITH_BODY, 404, 409),
    body=json_body(CopyBody, example={"source": MODEL, "destination": "smollm2-copy"}),
    empty=True,
)
CREATE = route(
    ok(f"Created: {{'status': 'success'}}. {STREAM}", json=Status, ndjson=any_of(Status, StreamError)),
    errors(*WITH_BODY, 404, 409),
    body=json_body(
        rename_property(inline_schema(CreateBody), "from_", "from"),
        required=("model",),
        example={"model": "smollm2-terse", "from": MODEL, "system": "Answer in one word.", "stream": False},
    ),
)
PULL = route(
    ok(f"The last progress status (stream false). {STREAM}", json=Status, ndjson=any_of(Status, StreamError)),
    errors(*WITH_BODY, 404, 409, 502),
    body=json_body(PullBody, example={"model": "hf/username/repo/file.gguf", "stream": False}, required=("model",)),
)
GENERATE = route(
    ok(f"The completion. {STREAM}", json=GenerateChunk, ndjson=any_of(GenerateChunk, StreamError)),
    errors(*GENERATES),
    body=json_body(
        GenerateBody, example={"model": MODEL, "prompt": "Why is the sky blue?", "stream": False}, required=("model",)
    ),
)
CHAT = route(
    ok(f"The chat reply. {STREAM}", json=ChatChunk, ndjson=any_of(ChatChunk, StreamError)),
    errors(*GENERATES),
    body=json_body(
        ChatBody,
        example={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False},
        required=("model",),
    ),
)
EMBED = route(
    ok("One embedding per input.", json=Embed),
    errors(*GENERATES),
    body=json_body(EmbedBody, example={"model": MODEL, "input": ["Why is the sky blue?"]}, required=("model",)),
)
EMBEDDINGS = route(
    ok("The prompt's embedding.", json=Embedding),
    errors(*GENERATES),
    body=json_body(EmbeddingsBody, example={"model": MODEL, "prompt": "Why is the sky blue?"}, required=("model",)),
)
