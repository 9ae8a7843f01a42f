"""OpenAI's request bodies (chat completions, completions, embeddings) and their
translation to the internal GenerateRequest. Unknown fields are ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import BadRequest
from ..images import check_image_b64, data_url_payload
from ..settings import RequestLimits
from ..toolcalls import tool_names
from ..types import ChatMessage, GenerateRequest, SamplingOptions
from .common import parse_json
from .limits import OPENAI_SAMPLING, FieldNames, bounded, check_count, check_generate, check_images, check_inputs


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Wire):
    include_usage: bool = False


class _Sampling(_Wire):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Ranges: limits.OPENAI_SAMPLING (OpenAI's where it documents one).
    max_tokens: bounded(int, "max_tokens", OPENAI_SAMPLING) = None
    temperature: bounded(float, "temperature", OPENAI_SAMPLING) = None
    top_p: bounded(float, "top_p", OPENAI_SAMPLING) = None
    seed: bounded(int, "seed", OPENAI_SAMPLING) = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: bounded(float, "presence_penalty", OPENAI_SAMPLING) = None
    frequency_penalty: bounded(float, "frequency_penalty", OPENAI_SAMPLING) = None
    # Not OpenAI's, but llama.cpp servers take them and so do we.
    top_k: bounded(int, "top_k", OPENAI_SAMPLING) = None
    min_p: bounded(float, "min_p", OPENAI_SAMPLING) = None
    repeat_penalty: bounded(float, "repeat_penalty", OPENAI_SAMPLING) = None
    # Not OpenAI's: False refuses a prompt longer than the context instead of trimming it.
    truncate: bool = True

    def _options(self, max_tokens: int | None) -> SamplingOptions:
        if self.n is not None and self.n != 1:
            raise BadRequest("'n' must be 1: this server returns one choice per request.")
        return SamplingOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _content(content: Any, where: str, limits: RequestLimits | None) -> tuple[str, list[str]]:
    """Message content: a string, or a list of text and (with `limits`) image parts. The
    text parts are joined and the images, in order, go before the text (as Ollama does)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or a list of content parts.")
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in IMAGE_PARTS and limits is not None:
            images.append(_image_part(part, f"{where}.{index}", limits))
        else:
            allowed = "text and image_url" if limits is not None else "text"
            raise BadRequest(f"'{where}': content parts of type {kind!r} are not supported; only {allowed}.")
    return "".join(texts), images


IMAGE_PARTS = ("image_url", "input_image")


def _image_part(part: dict[str, Any], where: str, limits: RequestLimits) -> str:
    """The checked base64 image of an image part; an http(s) URL stays a URL, fetched later
    (api/image_urls.py) when RKLLAMA_IMAGE_URLS allows it."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise BadRequest(f"'{where}.image_url' must be {{'url': 'data:image/png;base64,...'}}.")
    if url.lower().startswith(("http://", "https://")):
        if not limits.image_urls:
            raise BadRequest(
                f"'{where}.image_url' is a remote URL; this server does not fetch URLs. Send the image as a "
                "data URL (data:image/png;base64,...), or start the server with RKLLAMA_IMAGE_URLS=1."
            )
        return url
    if not url.lower().startswith("data:"):
        raise BadRequest(f"'{where}.image_url.url' must be a data URL (data:image/png;base64,...) or an http(s) URL.")
    return check_image_b64(data_url_payload(url, f"{where}.image_url.url"), f"{where}.image_url", limits.image_rules())


def _call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"'{where}' must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}.")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        arguments = parse_json(arguments, f"'{where}.function.arguments'")
    return {"name": function["name"], "arguments": arguments}


class Message(_Wire):
    role: str
    content: Any = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatBody(_Sampling):
    messages: list[Message]
    max_completion_tokens: bounded(int, "max_tokens", OPENAI_SAMPLING) = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None

    def _messages(self, limits: RequestLimits) -> list[ChatMessage]:
        out = []
        for index, message in enumerate(self.messages):
            where = f"messages.{index}"
            calls = [_call(c, f"{where}.tool_calls.{i}") for i, c in enumerate(message.tool_calls or [])]
            text, images = _content(message.content, f"{where}.content", limits)
            out.append(
                ChatMessage(
                    role="system" if message.role == "developer" else message.role,
                    content=text,
                    images=images or None,
                    tool_calls=calls or None,
                    tool_call_id=message.tool_call_id,
                    name=message.name,
                )
            )
        if not out:
            raise BadRequest("'messages' must hold at least one message.")
        return out

    def _format(self) -> dict[str, Any] | str | None:
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json"
        if kind == "json_schema":
            schema = (self.response_format or {}).get("json_schema", {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object.")
            return schema
        raise BadRequest(f"'response_format.type' {kind!r} is not supported: use text, json_object or json_schema.")

    def _tool_choice(self) -> str | None:
        """None (model decides), "none", "required" or a tool name."""
        choice = self.tool_choice
        if choice is None or choice == "auto":
            return None
        if choice in ("none", "required"):
            return choice  # type: ignore[return-value]
        if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
            name = choice["function"]["name"]
            if name not in tool_names(self.tools):
                raise BadRequest(f"'tool_choice' names {name!r}, which is not among the tools.")
            return name
        raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {...}}.")

    def _image_count(self) -> int:
        return sum(
            1
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS
        )

    def to_request(self, limits: RequestLimits) -> GenerateRequest:
        check_images(self._image_count(), limits)
        check_count(self.tools, limits.max_tools, "tools", "tools", "MAX_TOOLS")
        if self.logprobs:
            raise BadRequest("'logprobs' is not supported.")
        if self.tools and len(tool_names(self.tools)) != len(self.tools):
            raise BadRequest("'tools' must be a list of {'type': 'function', 'function': {'name', ...}}.")
        choice = self._tool_choice()
        if choice is not None and not self.tools and choice != "none":
            raise BadRequest("'tool_choice' needs 'tools'.")
        tools = None if choice == "none" else (self.tools or None)
        max_field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        request = GenerateRequest(
            messages=self._messages(limits),
            options=self._options(self.max_completion_tokens or self.max_tokens),
            response_format=self._format(),
            tools=tools,
            tool_choice=None if choice == "none" else choice,
            truncate=self.truncate,
        )
        check_generate(request, limits, FieldNames(max_tokens=max_field))
        return request


class CompletionBody(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None

    def to_request(self, limits: RequestLimits) -> GenerateRequest:
        if self.suffix:
            raise BadRequest("'suffix' is not supported.")
        if self.echo:
            raise BadRequest("'echo' is not supported.")
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("'prompt' must be one string: batches are not supported.")
            prompt = prompt[0]
        # OpenAI's default for completions is 16 tokens.
        options = self._options(16 if self.max_tokens is None else self.max_tokens)
        request = GenerateRequest(prompt=prompt, options=options, truncate=self.truncate)
        check_generate(request, limits)
        return request


class EmbeddingsBody(_Wire):
    model: str = ""
    input: str | list[str]
    encoding_format: str = "float"
    dimensions: int | None = None

    def inputs(self, limits: RequestLimits) -> list[str]:
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if not inputs:
            raise BadRequest("'input' must not be empty.")
        if self.encoding_format not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.")
        return check_inputs(inputs, limits)
