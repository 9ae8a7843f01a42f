"""Ollama's API (`/api/*`), as its docs/api.md describes it, over the same scheduler and
GenerateRequest as the native API: generation, chat and embeddings here, model management in
ollama_models.py. See docs/ollama.md for what is supported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..errors import BadRequest, RkllamaError
from ..toolcalls import ToolCall, parse_tool_calls
from ..types import DoneEvent, EmbedRequest, GenerateRequest
from .common import AppState, app_state
from .dialect import (
    ReplyText,
    Target,
    ThinkingSplitter,
    apply_keep_alive,
    collect,
    load_target,
    parse_body,
    parse_keep_alive,
    started,
    truncation,
)
from .limits import check_inputs
from .ollama_wire import NDJSON, ChatBody, EmbedBody, EmbeddingsBody, GenerateBody, ndjson
from .schemas import ollama as docs

# `HEAD /` (Ollama's liveness probe) stays open like the rest of `/`; the API needs the key.
router = APIRouter()
api = APIRouter()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@api.get("/api/version", **docs.VERSION)
async def version(state: AppState = Depends(app_state)) -> dict[str, Any]:
    # Ollama's reply is {"version"}; the rest says what a support question needs (system_info.py).
    return {"version": __version__, **state.system}


# --- generate and chat -----------------------------------------------------------------------
def _timings(target: Target, done: DoneEvent | None) -> dict[str, Any]:
    usage = done.usage if done else None
    return {
        "done_reason": _done_reason(done),
        "total_duration": target.elapsed_ns(),
        "load_duration": int(target.load_seconds * 1e9),
        # As Ollama counts it: the prompt tokens evaluated, not those reused from the cache.
        "prompt_eval_count": usage.evaluated_tokens if usage else 0,
        "prompt_eval_duration": int(usage.prompt_ms * 1e6) if usage else 0,
        "eval_count": usage.completion_tokens if usage else 0,
        "eval_duration": int(usage.generate_ms * 1e6) if usage else 0,
        **(truncation(usage) if usage is not None and usage.truncated else {}),
    }


def _done_reason(done: DoneEvent | None) -> str:
    if done is None or done.finish_reason == "cancelled":
        return "stop"
    return "length" if done.finish_reason == "length" else "stop"


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class _Exchange:
    """One generate/chat request: loads the model, runs it, shapes Ollama's replies."""

    def __init__(self, state: AppState, body: GenerateBody | ChatBody, chat: bool) -> None:
        self.state = state
        self.body = body
        self.chat = chat
        self.keep_alive = parse_keep_alive(body.keep_alive)
        self.request = GenerateRequest()  # made in run(), off the event loop (images are decoded)
        self.target: Target | None = None

    def _empty(self) -> bool:
        if self.chat:
            return not self.request.messages
        return not (self.body.prompt or "")  # type: ignore[union-attr]

    def _piece(self, text: str, calls: list[ToolCall] | None = None, thinking: str = "") -> dict[str, Any]:
        head = {"model": self.body.model, "created_at": _now()}
        if not self.chat:
            return {**head, "response": text, **({"thinking": thinking} if thinking else {}), "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = _tool_calls(calls)
        return {**head, "message": message, "done": False}

    def _final(
        self, done: DoneEvent | None, text: str = "", calls: list[ToolCall] | None = None, thinking: str = ""
    ) -> dict[str, Any]:
        assert self.target is not None
        return {**self._piece(text, calls, thinking), "done": True, **_timings(self.target, done)}

    def _splitter(self) -> ThinkingSplitter | None:
        """With `think`, a reply opening with <think>...</think> has its reasoning split out."""
        return ThinkingSplitter() if self.body.think else None

    async def _load_only(self) -> dict[str, Any]:
        """An empty prompt only loads (or, with keep_alive 0, unloads) the model, as in Ollama."""
        assert self.target is not None
        await apply_keep_alive(self.state, self.target.name, self.keep_alive)
        unloaded = self.keep_alive == 0
        reply = self._final(None)
        reply["done_reason"] = "unload" if unloaded else "load"
        return reply

    async def run(self) -> Any:
        self.request = await anyio.to_thread.run_sync(self.body.to_request, self.state.settings.limits)
        self.target = await load_target(self.state, self.body.model, self.body.num_ctx, self.request.image_count)
        if self._empty():
            return await self._load_only()
        events = self.state.scheduler.generate(self.target.model, self.request)
        if not self.body.stream:
            return await self._collect(events)
        try:
            events = await started(events)
        except BaseException:
            await apply_keep_alive(self.state, self.target.name, self.keep_alive)
            raise
        return StreamingResponse(ndjson(self._stream(events)), media_type=NDJSON)

    async def _collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        assert self.target is not None
        try:
            text, done = await collect(events)
        finally:
            await apply_keep_alive(self.state, self.target.name, self.keep_alive)
        thinking = ""
        if splitter := self._splitter():
            (thinking, text), (thinking_rest, text_rest) = splitter.feed(text), splitter.finish()
            thinking, text = thinking + thinking_rest, text + text_rest
        text, calls = parse_tool_calls(text, self.request.tools) if self.chat else (text, [])
        return self._final(done, text, calls, thinking)

    async def _stream(self, events: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
        assert self.target is not None
        reply = ReplyText(self.request.tools if self.chat else None)
        splitter = self._splitter()
        try:
            async for event in events:
                done = isinstance(event, DoneEvent)
                thinking, text = "", ("" if done else event.text)
                if splitter is not None:
                    thinking, text = splitter.finish() if done else splitter.feed(event.text)
                if thinking:
                    yield self._piece("", thinking=thinking)
                if out := reply.feed(text):
                    yield self._piece(out)
                if done:
                    text, calls = reply.finish()
                    if text or calls:
                        yield self._piece(text, calls)
                    yield self._final(event)
        except RkllamaError as exc:
            # Headers are sent already: the error is the stream's last line.
            yield {"error": exc.message}
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await apply_keep_alive(self.state, self.target.name, self.keep_alive)


@api.post("/api/generate", **docs.GENERATE)
async def generate(request: Request, state: AppState = Depends(app_state)) -> Any:
    return await _Exchange(state, await parse_body(request, GenerateBody), chat=False).run()


@api.post("/api/chat", **docs.CHAT)
async def chat(request: Request, state: AppState = Depends(app_state)) -> Any:
    return await _Exchange(state, await parse_body(request, ChatBody), chat=True).run()


# --- embeddings ------------------------------------------------------------------------------
@api.post("/api/embed", **docs.EMBED)
async def embed(request: Request, state: AppState = Depends(app_state)) -> dict[str, Any]:
    body = await parse_body(request, EmbedBody)
    keep_alive = parse_keep_alive(body.keep_alive)
    inputs = body.inputs(state.settings.limits)
    target = await load_target(state, body.model, body.options.num_ctx if body.options else None)
    if body.dimensions is not None:
        raise BadRequest("'dimensions' is not supported: the model's embedding size is used.")
    try:
        result = await state.scheduler.embed(target.model, EmbedRequest(inputs=inputs, truncate=body.truncate))
    finally:
        await apply_keep_alive(state, target.name, keep_alive)
    return {
        "model": body.model,
        "embeddings": result.embeddings,
        "total_duration": target.elapsed_ns(),
        "load_duration": int(target.load_seconds * 1e9),
        "prompt_eval_count": result.prompt_tokens,
    }


@api.post("/api/embeddings", **docs.EMBEDDINGS)
async def embeddings(request: Request, state: AppState = Depends(app_state)) -> dict[str, Any]:
    """The older endpoint: one prompt, one vector."""
    body = await parse_body(request, EmbeddingsBody)
    keep_alive = parse_keep_alive(body.keep_alive)
    check_inputs([body.prompt], state.settings.limits, "prompt")
    target = await load_target(state, body.model, body.options.num_ctx if body.options else None)
    try:
        result = await state.scheduler.embed(target.model, EmbedRequest(inputs=[body.prompt]))
    finally:
        await apply_keep_alive(state, target.name, keep_alive)
    return {"embedding": result.embeddings[0]}


@router.head("/", include_in_schema=False)
async def alive() -> Response:
    return Response(status_code=200)


router.include_router(api)
