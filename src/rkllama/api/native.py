"""The RKLLama REST API of the user's specification (shared/spec/rkllama-rest-api.md).

Messages and status codes are the spec's, word for word; where the spec is silent, the
decision is written in docs/api.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import BadRequest, Conflict, ModelNotFound, NotFound, RkllamaError
from ..images import check_images_b64
from ..loaded_model import LoadedModel
from ..settings import RequestLimits
from ..store.pulls import is_being_pulled
from ..store.vision import check_vision
from ..types import ChatMessage, DoneEvent, GenerateRequest, SamplingOptions
from .common import AppState, app_state, json_object, optional, optional_stop
from .dialect import collect, truncation
from .limits import SAMPLING, check_generate, check_images
from .schemas import native as docs

router = APIRouter()

NO_MODEL = "No model is currently loaded."
GITHUB_URL = "https://github.com/notpunhnox/rkllama"


class NativeError(RkllamaError):
    """An error whose status differs from its class's default, as the spec wants it."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@router.get("/", **docs.HOME)
async def home() -> dict[str, str]:
    return {"message": "Welcome to RK-LLama!", "github": GITHUB_URL}


@router.get("/models", **docs.MODELS)
async def list_models(state: AppState = Depends(app_state)) -> JSONResponse:
    if not state.store.exists():
        raise NativeError(f"The directory {state.settings.display_models_dir} is not found.", 500)
    return JSONResponse({"models": state.store.names()})


@router.post("/load_model", **docs.LOAD)
async def load_model(request: Request, state: AppState = Depends(app_state)) -> dict[str, str]:
    data = await json_object(request)
    name = data.get("model_name")
    if name is None or name == "":
        raise BadRequest('Please enter the name of the model to be loaded: {"model_name": "<model>"}.')
    if not isinstance(name, str):
        raise BadRequest("'model_name' must be a string.")
    if state.scheduler.current_model is not None:
        raise BadRequest("A model is already loaded. Please unload it first.")
    try:
        state.store.resolve(name)
    except ModelNotFound:
        raise BadRequest(f"Model {name} not found in the /models directory.") from None
    await state.scheduler.load(name)
    return {"message": f"Model {name} loaded successfully."}


@router.post("/unload_model", **docs.UNLOAD)
async def unload_model(state: AppState = Depends(app_state)) -> dict[str, str]:
    current = state.scheduler.current_model
    if current is None:
        raise BadRequest(NO_MODEL)
    await state.scheduler.unload(current)
    return {"message": "Model unloaded successfully."}


@router.get("/current_model", **docs.CURRENT)
async def current_model(state: AppState = Depends(app_state)) -> dict[str, str]:
    current = state.scheduler.current_model
    if current is None:
        raise NotFound(NO_MODEL)
    return {"model_name": current}


def _messages(value: Any, limits: RequestLimits) -> tuple[list[ChatMessage] | None, str | None]:
    """`messages` is a prompt string or a list of {role, content} chat messages. Where the
    spec is silent, a message may carry Ollama's `images` (base64), for a vision model."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)], None
    if isinstance(value, list) and value:
        # Counted before any image is decoded, as in the other dialects.
        check_images(sum(len(_image_list(item, index)) for index, item in enumerate(value)), limits)
        rules = limits.image_rules()
        messages = []
        for index, item in enumerate(value):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("role"), str)
                or not isinstance(item.get("content", ""), str)
            ):
                raise BadRequest(f"'messages[{index}]' must be an object with a string 'role' and a string 'content'.")
            images = check_images_b64(_image_list(item, index), f"messages.{index}.images", rules)
            messages.append(ChatMessage(role=item["role"], content=item.get("content", ""), images=images))
        return messages, None
    raise BadRequest('\'messages\' is required: a prompt string, or a non-empty list of {"role", "content"} objects.')


def _image_list(item: Any, index: int) -> list[Any]:
    """A message's `images` (Ollama's form, not in the spec): a list, or nothing."""
    images = item.get("images") if isinstance(item, dict) else None
    if images is None:
        return []
    if not isinstance(images, list):
        raise BadRequest(f"'messages[{index}].images' must be a list of base64 strings.")
    return images


def _sampling(data: dict[str, Any], key: str, kind: type) -> Any:
    """A typed sampling field within its range (limits.SAMPLING)."""
    value = optional(data, key, kind)
    SAMPLING[key].check(value, key)
    return value


def parse_generate(data: dict[str, Any], limits: RequestLimits) -> tuple[GenerateRequest, bool]:
    messages, prompt = _messages(data.get("messages"), limits)
    stream = optional(data, "stream", bool)
    options = SamplingOptions(
        temperature=_sampling(data, "temperature", float),
        top_p=_sampling(data, "top_p", float),
        top_k=_sampling(data, "top_k", int),
        max_tokens=_sampling(data, "max_tokens", int),
        seed=_sampling(data, "seed", int),
        stop=optional_stop(data),
    )
    truncate = optional(data, "truncate", bool)
    request = GenerateRequest(messages=messages, prompt=prompt, options=options, truncate=truncate is not False)
    check_generate(request, limits)
    return request, bool(stream)


def _usage(done: DoneEvent | None) -> dict[str, Any]:
    if done is None:
        return {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "tokens_per_second": None}
    usage = done.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "tokens_per_second": round(usage.tokens_per_second, 2),
    }


def _body(created: int, content: str, done: DoneEvent | None) -> dict[str, Any]:
    finish = None if done is None else ("length" if done.finish_reason == "length" else "stop")
    body = {
        "id": "rkllm_chat",
        "object": "rkllm_chat",
        "created": created,
        "choices": [{"role": "assistant", "content": content, "finish_reason": finish}],
        "usage": _usage(done),
    }
    if done is not None and done.usage.truncated:
        body.update(truncation(done.usage))
    return body


@router.post("/generate", **docs.GENERATE)
async def generate(request: Request, state: AppState = Depends(app_state)) -> Any:
    data = await json_object(request)
    current = state.scheduler.current_model
    if current is None:
        raise BadRequest(NO_MODEL)
    generate_request, stream = await anyio.to_thread.run_sync(parse_generate, data, state.settings.limits)
    model = state.scheduler.get_loaded(current)
    if model is None:
        raise BadRequest(NO_MODEL)
    check_vision(model.entry, generate_request.image_count)
    created = int(time.time())
    if stream:
        return StreamingResponse(_stream(state, model, generate_request, created), media_type="text/plain")
    text, done = await collect(state.scheduler.generate(model, generate_request))
    return _body(created, text, done)


async def _stream(state: AppState, model: LoadedModel, request: GenerateRequest, created: int) -> AsyncIterator[str]:
    """Each chunk: one JSON object of the documented shape, then a blank line."""
    try:
        async for event in state.scheduler.generate(model, request):
            if isinstance(event, DoneEvent):
                yield json.dumps(_body(created, "", event)) + "\n\n"
            else:
                yield json.dumps(_body(created, event.text, None)) + "\n\n"
    except RkllamaError as exc:
        # Headers are gone already: the error becomes the last chunk.
        yield json.dumps({"error": exc.message}) + "\n\n"


@router.post("/rm", **docs.REMOVE)
@router.delete("/rm", **docs.REMOVE)  # the spec documents both methods
async def remove_model(request: Request, state: AppState = Depends(app_state)) -> dict[str, str]:
    data = await json_object(request)
    name = data.get("model")
    if name is None or name == "":
        raise BadRequest('Please specify a model: {"model": "<model>"}.')
    if not isinstance(name, str):
        raise BadRequest("'model' must be a string.")
    if is_being_pulled(state.store, name):
        raise Conflict(f"The model {name} is being pulled; wait for the pull to finish, then delete it.")
    try:
        entry = state.store.resolve(name)
    except ModelNotFound:
        raise NotFound(f"The model: {name} cannot be found.") from None
    # A loaded model is unloaded first, so its runner lets go of the file.
    await state.scheduler.unload(entry.name)
    state.store.delete(entry.name)
    return {"message": "The model has been successfully deleted."}
