"""Ollama's model management routes (`/api/tags`, `show`, `ps`, `delete`, `copy`, `create`,
`pull`), over the model store and the scheduler. Generation is in ollama.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import BadRequest, Conflict, RkllamaError
from ..store.derive import derive_model
from ..store.gguf_info import parameter_size
from ..store.models_dir import ModelEntry, ModelStore
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
from ..store.pull_spec import parse_pull_spec
from ..store.pulls import is_being_pulled
from ..store.vision import has_vision
from .common import AppState, app_state
from .dialect import parse_body
from .limits import check_parameters
from .ollama_wire import NDJSON, CopyBody, CreateBody, ModelBody, PullBody, ndjson
from .schemas import ollama as docs

router = APIRouter()
# What `ps` shows as the expiry of a model kept loaded without a deadline.
FOREVER = timedelta(days=365 * 100)


# --- models ------------------------------------------------------------------------------
def _details(store: ModelStore, entry: ModelEntry) -> dict[str, Any]:
    info = store.file_facts.gguf(entry.path)
    family = info.architecture
    return {
        "parent_model": "",
        "format": entry.format,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(info.parameter_count) if info.parameter_count else "",
        "quantization_level": info.quantization,
    }


async def _model_summary(store: ModelStore, entry: ModelEntry) -> dict[str, Any]:
    name = ollama_name(entry.name)
    return {
        "name": name,
        "model": name,
        "modified_at": entry.modified.isoformat(),
        "size": entry.size,
        "digest": await store.file_facts.digest(entry.path),
        "details": _details(store, entry),
    }


@router.get("/api/tags", **docs.TAGS)
async def tags(state: AppState = Depends(app_state)) -> dict[str, Any]:
    models = []
    for entry in state.store.list_models():
        try:
            models.append(await _model_summary(state.store, entry))
        except FileNotFoundError:
            continue  # deleted while we listed it
    return {"models": models}


@router.post("/api/show", **docs.SHOW)
async def show(request: Request, state: AppState = Depends(app_state)) -> dict[str, Any]:
    body = await parse_body(request, ModelBody)
    entry = resolve_model(state.store, body.target)
    info = state.store.file_facts.gguf(entry.path)
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
        "details": _details(state.store, entry),
        "model_info": model_info,
        "capabilities": ["completion", "tools", "embedding", *(["vision"] if has_vision(entry) else [])],
        # Not Ollama's: the context a request without num_ctx gets now (model_info holds the trained one).
        "context_length": state.scheduler.default_context(entry),
        "modified_at": entry.modified.isoformat(),
    }


@router.get("/api/ps", **docs.PS)
async def ps(state: AppState = Depends(app_state)) -> dict[str, Any]:
    models = []
    now_wall, now_mono = datetime.now(UTC), time.monotonic()
    for loaded in state.scheduler.loaded():
        summary = await _model_summary(state.store, loaded.entry)
        left = FOREVER if loaded.expires_at is None else timedelta(seconds=max(0.0, loaded.expires_at - now_mono))
        summary.update(expires_at=(now_wall + left).isoformat(), size_vram=0, context_length=loaded.info.context_length)
        summary["size"] = loaded.memory.total  # as Ollama: the memory it takes, weights and KV cache
        # Not in Ollama's reply: the CPU settings in force, so a NUM_THREAD can be checked.
        summary.update(num_thread=loaded.info.threads, num_parallel=loaded.info.parallel)
        summary["kv_unified"] = loaded.info.kv_unified
        summary.pop("modified_at")
        models.append(summary)
    return {"models": models}


@router.delete("/api/delete", **docs.DELETE)
async def delete(request: Request, state: AppState = Depends(app_state)) -> Response:
    body = await parse_body(request, ModelBody)
    entry = resolve_model(state.store, body.target)
    if is_being_pulled(state.store, entry.name):
        raise Conflict(f"The model {body.target} is being pulled; wait for the pull to finish, then delete it.")
    await state.scheduler.unload(entry.name)  # its runner lets go of the file first
    state.store.delete(entry.name)
    return Response(status_code=200)


@router.post("/api/copy", **docs.COPY)
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


@router.post("/api/create", **docs.CREATE)
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

    return StreamingResponse(ndjson(progress()), media_type=NDJSON)


# --- pull ----------------------------------------------------------------------------------
def _progress(event: PullProgress) -> dict[str, Any]:
    # Like Ollama's layers: one "pulling <file>" run per file (the model, then its vision file), each its own total.
    if event.status == "downloading":
        return {"status": f"pulling {event.filename}", "total": event.file_total, "completed": event.file_completed}
    return (
        {"status": event.status, "total": event.total, "completed": event.completed}
        if event.total
        else {"status": event.status}
    )


@router.post("/api/pull", **docs.PULL)
async def pull(request: Request, state: AppState = Depends(app_state)) -> Any:
    body = await parse_body(request, PullBody)
    spec = parse_pull_spec(body.model or body.name)
    events = pull_model(state.store, spec)
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

    return StreamingResponse(ndjson(progress()), media_type=NDJSON)
