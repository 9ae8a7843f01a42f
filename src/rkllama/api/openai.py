"""OpenAI's API (`/v1/*`) over the same scheduler and GenerateRequest as the native API.
Streams are server-sent events ending with `data: [DONE]`; errors have OpenAI's shape.
See docs/openai.md for what is supported."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import BadRequest, RkllamaError
from ..store.models_dir import ModelEntry
from ..store.names import openai_id, resolve_model
from ..toolcalls import ToolCall, parse_tool_calls
from ..types import DoneEvent, EmbedRequest, GenerateRequest, Usage
from .common import AppState, app_state
from .dialect import ReplyText, collect, load_target, parse_body, started, truncation
from .image_urls import fetch_remote_images
from .openai_wire import ChatBody, CompletionBody, EmbeddingsBody
from .schemas import openai as docs

router = APIRouter()
OWNER = "rkllama"

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}
_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def render_error(status: int, message: str) -> JSONResponse:
    """OpenAI's error shape; app.py uses it for every error under /v1/."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = _ERROR_CODES.get(status)
    if status == 404 and not message.startswith("model '"):
        code = None  # a route, not a model, was not found
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def _usage(usage: Usage | None) -> dict[str, Any]:
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    out["total_tokens"] = prompt + completion
    if usage is not None:
        # As OpenAI and llama-server report it: prompt tokens reused from the cache.
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return out


def _truncation(done: DoneEvent | None) -> dict[str, Any]:
    return truncation(done.usage) if done is not None and done.usage.truncated else {}


def _finish(done: DoneEvent | None, calls: list[ToolCall]) -> str:
    if calls:
        return "tool_calls"
    return "length" if done is not None and done.finish_reason == "length" else "stop"


def _tool_calls(calls: list[ToolCall], with_index: bool = False) -> list[dict[str, Any]]:
    out = []
    for index, call in enumerate(calls):
        item: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        out.append({"index": index, **item} if with_index else item)
    return out


def _sse(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for item in items:
            yield f"data: {json.dumps(item)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _error_event(exc: RkllamaError) -> dict[str, Any]:
    # The 200 is sent already: the error is the last event (the openai client raises it).
    return json.loads(render_error(exc.status_code, exc.message).body)


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    created = int(entry.modified.timestamp())
    return {"id": openai_id(entry.name), "object": "model", "created": created, "owned_by": OWNER}


@router.get("/v1/models", **docs.MODELS)
async def models(state: AppState = Depends(app_state)) -> dict[str, Any]:
    data = []
    for entry in state.store.list_models():
        try:
            data.append(_model_object(entry))
        except FileNotFoundError:
            continue  # deleted while we listed it
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}", **docs.MODEL_BY_ID)
async def model(model_id: str, state: AppState = Depends(app_state)) -> dict[str, Any]:
    return _model_object(resolve_model(state.store, model_id))


class _Completion:
    """One chat or text completion: shapes OpenAI's objects around the engine's events."""

    def __init__(self, body: ChatBody | CompletionBody, request: GenerateRequest, chat: bool) -> None:
        self.body = body
        self.request = request
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.body.model}  # fmt: skip

    def reply(self, text: str, done: DoneEvent | None) -> dict[str, Any]:
        calls: list[ToolCall] = []
        if self.chat:
            text, calls = parse_tool_calls(text, self.request.tools)
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = _tool_calls(calls)
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=_finish(done, calls), logprobs=None)
        usage = _usage(done.usage if done else None)
        return {**self._head(False), "choices": [choice], "usage": usage, **_truncation(done)}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        return {**self._head(True), "choices": [choice]}

    async def stream(self, events: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
        reply = ReplyText(self.request.tools if self.chat else None)
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            async for event in events:
                if not isinstance(event, DoneEvent):
                    if out := reply.feed(event.text):
                        yield self._chunk({"content": out})
                    continue
                text, calls = reply.finish()
                if text:
                    yield self._chunk({"content": text})
                if calls:
                    yield self._chunk({"tool_calls": _tool_calls(calls, with_index=True)})
                yield {**self._chunk({}, _finish(event, calls)), **_truncation(event)}
                if self.body.include_usage:
                    yield {**self._head(True), "choices": [], "usage": _usage(event.usage)}
        except RkllamaError as exc:
            yield _error_event(exc)
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def _complete(state: AppState, body: ChatBody | CompletionBody, chat: bool) -> Any:
    limits = state.settings.limits
    generate_request = await anyio.to_thread.run_sync(body.to_request, limits)  # images are decoded
    await fetch_remote_images(generate_request, limits)
    target = await load_target(state, body.model, images=generate_request.image_count)
    completion = _Completion(body, generate_request, chat)
    events = state.scheduler.generate(target.model, generate_request)
    if body.stream:
        return _sse(completion.stream(await started(events)))
    text, done = await collect(events)
    return completion.reply(text, done)


@router.post("/v1/chat/completions", **docs.CHAT)
async def chat_completions(request: Request, state: AppState = Depends(app_state)) -> Any:
    return await _complete(state, await parse_body(request, ChatBody), chat=True)


@router.post("/v1/completions", **docs.COMPLETIONS)
async def completions(request: Request, state: AppState = Depends(app_state)) -> Any:
    return await _complete(state, await parse_body(request, CompletionBody), chat=False)


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post("/v1/embeddings", **docs.EMBEDDINGS)
async def embeddings(request: Request, state: AppState = Depends(app_state)) -> dict[str, Any]:
    body = await parse_body(request, EmbeddingsBody)
    inputs = body.inputs(state.settings.limits)
    target = await load_target(state, body.model)
    result = await state.scheduler.embed(target.model, EmbedRequest(inputs=inputs))
    if body.dimensions is not None and body.dimensions != len(result.embeddings[0]):
        raise BadRequest(f"'dimensions' must be {len(result.embeddings[0])}, this model's embedding size.")
    encode = _base64 if body.encoding_format == "base64" else (lambda v: v)
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.embeddings)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}
