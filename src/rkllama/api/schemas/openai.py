"""OpenAI's response shapes (chat completions, completions, embeddings, models), as this
server sends them. Requests are described by the models that parse them (api/openai_wire.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..openai_wire import ChatBody, CompletionBody, EmbeddingsBody
from . import ALWAYS, GENERATES, any_of, errors, json_body, ok, route
from .common import OpenAIErrorBody, Strict, Truncation

MODEL = "smollm2:135m"
FinishReason = Literal["stop", "length", "tool_calls"]


class Model(Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Strict):
    object: Literal["list"]
    data: list[Model]


class PromptTokensDetails(Strict):
    cached_tokens: int = Field(description="Prompt tokens reused from the cache.")


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Function(Strict):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: Function


class StreamedToolCall(ToolCall):
    index: int


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Strict):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletion(Truncation):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Strict):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[StreamedToolCall] | None = None


class ChunkChoice(Strict):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(Truncation):
    """One `data:` event; with stream_options.include_usage, a last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(Strict):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class Completion(Truncation):
    """The reply (stream false); streamed events have the same shape, without usage until the last."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class EmbeddingItem(Strict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 (encoding_format).")


class EmbeddingUsage(Strict):
    prompt_tokens: int
    total_tokens: int


class Embeddings(Strict):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


STREAM = (
    "With stream true: server-sent events, `data: <json>` then a blank line, each a chunk of the "
    "schema documented, ending with `data: [DONE]`. A failure after the 200 is an event "
    "holding OpenAI's error object, before [DONE]."
)


# --- the routes' documentation (keyword arguments of their decorators) ----------------------
MODELS = route(ok("Local models.", json=ModelList), errors(*ALWAYS, model=OpenAIErrorBody))
MODEL_BY_ID = route(ok("The model.", json=Model), errors(*ALWAYS, 404, model=OpenAIErrorBody))
CHAT = route(
    ok(f"The chat completion. {STREAM}", json=ChatCompletion, sse=any_of(ChatCompletionChunk, OpenAIErrorBody)),
    errors(*GENERATES, model=OpenAIErrorBody),
    body=json_body(
        ChatBody, example={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, required=("model",)
    ),
)
COMPLETIONS = route(
    ok(f"The completion. {STREAM}", json=Completion, sse=any_of(Completion, OpenAIErrorBody)),
    errors(*GENERATES, model=OpenAIErrorBody),
    body=json_body(CompletionBody, example={"model": MODEL, "prompt": "Once upon a time"}, required=("model",)),
)
EMBEDDINGS = route(
    ok("One embedding per input.", json=Embeddings),
    errors(*GENERATES, model=OpenAIErrorBody),
    body=json_body(
        EmbeddingsBody,
        example={"model": MODEL, "input": "Hello"},
        required=("model",),
        patch={"encoding_format": {"enum": ["float", "base64"]}},
    ),
)
