"""Ollama's request bodies (docs/api.md of ollama/ollama) and their translation to the
internal GenerateRequest. Unknown fields are ignored, as Ollama does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BadRequest
from ..images import check_images_b64
from ..settings import RequestLimits
from ..toolcalls import tool_names
from ..types import ChatMessage, GenerateRequest, SamplingOptions
from .limits import OLLAMA_FIELDS, bounded, check_generate, check_images, check_inputs


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Wire):
    """Ranges: limits.SAMPLING (Ollama validates none; these are what the engines can use)."""

    temperature: bounded(float, "temperature") = None
    top_p: bounded(float, "top_p") = None
    top_k: bounded(int, "top_k") = None
    min_p: bounded(float, "min_p") = None
    num_predict: bounded(int, "num_predict") = None
    num_ctx: int | None = None  # bounded by the model's trained context: context_size.py
    seed: bounded(int, "seed") = None
    stop: list[str] | str | None = None
    repeat_penalty: bounded(float, "repeat_penalty") = None
    presence_penalty: bounded(float, "presence_penalty") = None
    frequency_penalty: bounded(float, "frequency_penalty") = None

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            # -1 (forever) and -2 (fill the context) both mean "up to the context's end".
            max_tokens=None if self.num_predict is None or self.num_predict < 0 else self.num_predict,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class _FunctionCall(_Wire):
    name: str
    arguments: dict[str, Any] = {}


class _ToolCall(_Wire):
    function: _FunctionCall


class Message(_Wire):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_name: str | None = None


Format = Literal["", "json"] | dict[str, Any] | None


class _GenerateBase(_Wire):
    model: str = ""
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    # False: a prompt longer than the context is a 400 instead of being trimmed.
    truncate: bool = True

    @property
    def num_ctx(self) -> int | None:
        return self.options.num_ctx if self.options else None

    def _request(self, limits: RequestLimits, **fields: Any) -> GenerateRequest:
        request = GenerateRequest(
            options=self.options.sampling() if self.options else SamplingOptions(),
            response_format=self.format or None,
            enable_thinking=None if self.think is None else bool(self.think),
            num_ctx=self.num_ctx,
            truncate=self.truncate,
            **fields,
        )
        check_generate(request, limits, OLLAMA_FIELDS)
        return request


class GenerateBody(_GenerateBase):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[str] | None = None

    def to_request(self, limits: RequestLimits) -> GenerateRequest:
        check_images(len(self.images or []), limits)
        if self.suffix:
            raise BadRequest("'suffix' (fill-in-the-middle) is not supported.")
        if self.template:
            raise BadRequest("'template' is not supported: the chat template comes from the model file.")
        images = check_images_b64(self.images, "images", limits.image_rules())
        if self.raw:
            return self._request(limits, prompt=self.prompt or "", images=images)
        messages = [ChatMessage(role="system", content=self.system)] if self.system else []
        messages.append(ChatMessage(role="user", content=self.prompt or "", images=images))
        return self._request(limits, messages=messages)


class ChatBody(_GenerateBase):
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None

    def to_request(self, limits: RequestLimits) -> GenerateRequest:
        messages = []
        if images := sum(len(message.images or []) for message in self.messages or []):
            check_images(images, limits)
        for index, message in enumerate(self.messages or []):
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
            messages.append(
                ChatMessage(
                    role=message.role,
                    content=message.content or "",
                    tool_calls=calls or None,
                    name=message.tool_name,
                    images=check_images_b64(message.images, f"messages.{index}.images", limits.image_rules()),
                )
            )
        if self.tools and not tool_names(self.tools):
            raise BadRequest('\'tools\' must be a list of {"type": "function", "function": {"name", ...}}.')
        return self._request(limits, messages=messages, tools=self.tools or None)


class EmbedBody(_Wire):
    model: str = ""
    input: str | list[str] = ""
    truncate: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None
    dimensions: int | None = None

    def inputs(self, limits: RequestLimits) -> list[str]:
        return check_inputs([self.input] if isinstance(self.input, str) else self.input, limits)


class EmbeddingsBody(_Wire):
    model: str = ""
    prompt: str = ""
    options: Options | None = None
    keep_alive: float | str | None = None


class ModelBody(_Wire):
    """show, delete (and `name`, the older spelling)."""

    model: str | None = None
    name: str | None = None

    @property
    def target(self) -> str:
        return self.model or self.name or ""


class CopyBody(_Wire):
    source: str
    destination: str


class PullBody(_Wire):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None


class CreateBody(_Wire):
    model: str | None = None
    name: str | None = None
    stream: bool = True
    modelfile: str | None = None
    from_: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    template: str | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> CreateBody:  # type: ignore[override]
        # The wire name is `from`, a Python keyword.
        if isinstance(obj, dict) and "from" in obj:
            obj = {**obj, "from_": obj["from"]}
        return super().model_validate(obj, **kwargs)


NDJSON = "application/x-ndjson"


def ndjson(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Ollama's stream framing: one JSON object per line."""

    async def lines() -> AsyncIterator[str]:
        async for item in items:
            yield json.dumps(item) + "\n"

    return lines()
