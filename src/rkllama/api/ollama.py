"""Ollama's API (`/api/*`), as its docs/api.md describes it, over the same scheduler and
GenerateRequest as the native API. See docs/ollama.md for what is supported."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from .. import __version__
from ..errors import BadRequest, Conflict, RkllamaError
from ..store.derive import derive_model
from ..store.gguf_info import file_digest, gguf_info, parameter_size
from ..store.models_dir import ModelEntry
from ..store.names import ollama_name, resolve_model
from ..store.ollama_modelfile import (
    KEYS_TO_PARAMETERS,
    ModelDefinition,
    parameters_to_values,
    parse_definition,
    render_ollama_modelfile,
    render_parameters,
)
from ..store.pull import PullProgress, pull_model
from ..store.pull_ref import parse_pull_ref
from ..store.pulls import is_being_pulled
from ..toolcalls import ToolCall, parse_tool_calls
from ..types import DoneEvent, EmbedRequest, GenerateRequest
from .common import AppState, app_state
from .dialect import (
    ReplyText,
    Target,
    ThinkingSplitter,
    apply_keep_alive,
    load_target,
    parse_body,
    parse_keep_alive,
    started,
    truncation,
)
from .limits import check_inputs, check_parameters
from .ollama_wire import (
    ChatBody,
    CopyBody,
    CreateBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    ModelBody,
    PullBody,
)
from .schemas import ollama as docs

# `HEAD /` (Ollama's liveness probe) stays open like the rest of `/`; the API needs the key.
router = APIRouter()
api = APIRouter()
NDJSON = "application/x-ndjson"
# What `ps` shows as the expiry of a model kept loaded without a deadline.
FOREVER = timedelta(days=365 * 100)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ndjson(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async def lines() -> AsyncIterator[str]:
        async for item in items:
            yield json.dumps(item) + "\n"

    return lines()


# --- models ------------------------------------------------------------------------------
def _details(entry: ModelEntry) -> dict[str, Any]:
    info = gguf_info(entry.path)
    family = info.architecture
    return {
        "parent_model": "",
        "format": entry.format,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(info.parameter_count) if info.parameter_count else "",
        "quantization_level": info.quantization,
    }


async def _model_summary(entry: ModelEntry, root: Path) -> dict[str, Any]:
    name = ollama_name(entry.name)
    return {
        "name": name,
        "model": name,
        "modified_at": entry.modified.isoformat(),
        "size": entry.size,
        "digest": await file_digest(entry.path, root),
        "details": _details(entry),
    }


@api.get("/api/version", **docs.VERSION)
async def version() -> dict[str, str]:
    return {"version": __version__}


@api.get("/api/tags", **docs.TAGS)
async def tags(state: AppState = Depends(app_state)) -> dict[str, Any]:
    models = []
    for entry in state.store.list_models():
        try:
            models.append(await _model_summary(entry, state.store.root))
        except FileNotFoundError:
            continue  # deleted while we listed it
    return {"models": models}


@api.post("/api/show", **docs.SHOW)
async def show(request: Request, state: AppState = Depends(app_state)) -> dict[str, Any]:
    body = await parse_body(request, ModelBody)
    entry = resolve_model(state.store, body.target)
    info = gguf_info(entry.path)
    model_info: dict[str, Any] = {
        key: value for key, value in info.metadata.items() if not key.startswith("tokenizer.")
    }
    model_info["general.parameter_count"] = info.parameter_count
    loaded = state.scheduler.get_loaded(entry.name)
    if loaded is not None:
        model_info.setdefault("general.architecture", loaded.info.metadata.get("general.architecture", ""))
    return {
        "modelfile": render_ollama_modelfile(ollama_name(entry.name), entry.path.name, entry.modelfile),
        "parameters": render_parameters(entry.modelfile),
        "template": info.chat_template,
        "system": entry.modelfile.get("SYSTEM") or "",
        "details": _details(entry),
        "model_info": model_info,
        "capabilities": ["completion", "tools", "embedding"],
        # Not Ollama's: the context a request without num_ctx gets now (model_info holds the trained one).
        "context_length": state.scheduler.default_context(entry),
        "modified_at": entry.modified.isoformat(),
    }


@api.get("/api/ps", **docs.PS)
async def ps(state: AppState = Depends(app_state)) -> dict[str, Any]:
    models = []
    now_wall, now_mono = datetime.now(UTC), time.monotonic()
    for loaded in state.scheduler.loaded():
        summary = await _model_summary(loaded.entry, state.store.root)
        left = FOREVER if loaded.expires_at is None else timedelta(seconds=max(0.0, loaded.expires_at - now_mono))
        summary.update(expires_at=(now_wall + left).isoformat(), size_vram=0, context_length=loaded.info.context_length)
        # Not in Ollama's reply: the CPU settings in force, so a NUM_THREAD can be checked.
        summary.update(num_thread=loaded.info.threads, num_parallel=loaded.info.parallel)
        summary.pop("modified_at")
        models.append(summary)
    return {"models": models}


@api.delete("/api/delete", **docs.DELETE)
async def delete(request: Request, state: AppState = Depends(app_state)) -> Response:
    body = await parse_body(request, ModelBody)
    entry = resolve_model(state.store, body.target)
    if is_being_pulled(state.store, entry.name):
        raise Conflict(f"The model {body.target} is being pulled; wait for the pull to finish, then delete it.")
    await state.scheduler.unload(entry.name)  # its runner lets go of the file first
    state.store.delete(entry.name)
    return Response(status_code=200)


@api.post("/api/copy", **docs.COPY)
async def copy(request: Request, state: AppState = Depends(app_state)) -> Response:
    body = await parse_body(request, CopyBody)
    derive_model(state.store, resolve_model(state.store, body.source), body.destination)
    return Response(status_code=200)


def _definition(body: CreateBody) -> ModelDefinition:
    if body.files or body.adapters:
        raise BadRequest("Creating a model from uploaded files is not supported; use 'from' with an existing model.")
    if body.quantize:
        raise BadRequest("Quantizing is not supported.")
    if body.template:
        raise BadRequest("'template' is not supported: the chat template comes from the model file.")
    if body.messages:
        raise BadRequest("'messages' is not supported in a created model.")
    definition = parse_definition(body.modelfile) if body.modelfile else ModelDefinition()
    if body.from_:
        definition.source = body.from_
    if body.system is not None:
        definition.values["SYSTEM"] = body.system
    definition.values.update(parameters_to_values(body.parameters or {}))
    check_parameters(definition.values, KEYS_TO_PARAMETERS)
    if not definition.source:
        raise BadRequest("Say which model to build on: 'from' (or FROM in 'modelfile') naming an existing model.")
    return definition


def _source_entry(state: AppState, source: str) -> ModelEntry:
    """FROM names a model, or (RKLLama Modelfiles) the model file of one."""
    try:
        return resolve_model(state.store, source)
    except RkllamaError:
        for entry in state.store.list_models():
            if entry.path.name == source:
                return entry
        raise


@api.post("/api/create", **docs.CREATE)
async def create(request: Request, state: AppState = Depends(app_state)) -> Any:
    body = await parse_body(request, CreateBody)
    name = body.model or body.name
    if not name:
        raise BadRequest("'model' is required: the name of the model to create.")
    definition = _definition(body)
    derive_model(state.store, _source_entry(state, definition.source or ""), name, definition.values)
    if not body.stream:
        return {"status": "success"}

    async def progress() -> AsyncIterator[dict[str, Any]]:
        for status in ("using existing layers", "writing manifest", "success"):
            yield {"status": status}

    return StreamingResponse(_ndjson(progress()), media_type=NDJSON)


# --- pull ----------------------------------------------------------------------------------
def _progress(event: PullProgress) -> dict[str, Any]:
    status = f"pulling {event.filename}" if event.status == "downloading" else event.status
    return {"status": status, "total": event.total, "completed": event.completed} if event.total else {"status": status}


@api.post("/api/pull", **docs.PULL)
async def pull(request: Request, state: AppState = Depends(app_state)) -> Any:
    body = await parse_body(request, PullBody)
    ref = parse_pull_ref(body.model or body.name)
    events = pull_model(state.store, ref)
    if not body.stream:
        last: dict[str, Any] = {}
        async for event in events:
            last = _progress(event)
        return last

    try:
        first = await anext(events)  # errors before any byte moved are still a 4xx
    except StopAsyncIteration:
        raise RkllamaError("The pull ended before it started.") from None

    async def progress() -> AsyncIterator[dict[str, Any]]:
        try:
            yield _progress(first)
            async for event in events:
                yield _progress(event)
        except RkllamaError as exc:
            yield {"error": exc.message}
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(_ndjson(progress()), media_type=NDJSON)


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
        self.request: GenerateRequest = body.to_request(state.settings.limits)
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
        self.target = await load_target(self.state, self.body.model, self.body.num_ctx)
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
        return StreamingResponse(_ndjson(self._stream(events)), media_type=NDJSON)

    async def _collect(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        assert self.target is not None
        parts: list[str] = []
        done: DoneEvent | None = None
        try:
            async for event in events:
                if isinstance(event, DoneEvent):
                    done = event
                else:
                    parts.append(event.text)
        finally:
            await apply_keep_alive(self.state, self.target.name, self.keep_alive)
        text, thinking = "".join(parts), ""
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
