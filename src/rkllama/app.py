"""Build the FastAPI app from settings: no module globals, so tests can make many apps."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .api import native, native_pull, ollama, ollama_models, openai
from .api.common import AppState
from .api.dialect import parse_keep_alive
from .api.guards import install_guards
from .api.observe import install_observability
from .errors import RkllamaError
from .runner.client import RunnerLimits
from .scheduler import Scheduler
from .settings import Settings, SettingsError
from .store.default_model import DEFAULT_MODEL_NAME, install_default_model
from .store.models_dir import ModelStore
from .system_info import system_info

log = logging.getLogger("rkllama")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


ErrorRenderer = Callable[[int, str], JSONResponse]
PathRenderer = Callable[[str, int, str], JSONResponse]


def path_renderer(renderers: Mapping[str, ErrorRenderer]) -> PathRenderer:
    """(path, status, message) -> the error in the shape of the path's dialect: the renderer
    of the first matching prefix, else RKLLama's own {"error": message}."""
    table = dict(renderers)

    def render(path: str, status: int, message: str) -> JSONResponse:
        for prefix, renderer in table.items():
            if path.startswith(prefix):
                return renderer(status, message)
        return error_response(status, message)

    return render


def install_error_handlers(app: FastAPI, render_for_path: PathRenderer) -> None:
    """Every failure becomes JSON with a message; dialects may override by path prefix."""

    def render_error(request: Request, status: int, message: str) -> JSONResponse:
        return render_for_path(request.url.path, status, message)

    @app.exception_handler(RkllamaError)
    async def on_rkllama_error(request: Request, exc: RkllamaError) -> JSONResponse:
        response = render_error(request, exc.status_code, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return render_error(request, 404, f"Not found: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return render_error(request, 405, f"Method {request.method} is not allowed on {request.url.path}.")
        return render_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return render_error(request, 400, f"Invalid request: {where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unexpected error on %s %s", request.method, request.url.path)
        return render_error(request, 500, f"Internal error ({type(exc).__name__}); see the server log for details.")


async def _load_startup_model(settings: Settings, store: ModelStore, scheduler: Scheduler) -> None:
    """--model NAME, else the built-in default (installed on first start into an empty dir)."""
    name = settings.model
    if name is None and not settings.no_default:
        if not store.names():
            install_default_model(store)
        name = DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in store.names() else None
    if name is None:
        return
    try:
        await scheduler.load(name)
    except RkllamaError as exc:
        # A failed load leaves the server serving.
        log.error("Could not load model %s at start: %s", name, exc.message)


def create_app(settings: Settings) -> FastAPI:
    store = ModelStore(settings.models_dir)
    limits = RunnerLimits(timeout=settings.runner_timeout, max_message_bytes=settings.runner_max_message_bytes)
    scheduler = Scheduler(
        store,
        max_loaded_models=settings.max_loaded_models,
        context_length=settings.context_length,
        kv_budget=settings.kv_budget_bytes(),
        runner_limits=limits,
        unload_grace=settings.unload_grace,
        memory_budget=settings.memory_budget_bytes(),
        max_queue=settings.max_queue,
        keep_alive=server_keep_alive(settings.keep_alive),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.ensure_exists()
        await _load_startup_model(settings, store, scheduler)
        scheduler.start_sweeper()
        yield
        await scheduler.shutdown()

    app = FastAPI(title="RKLLama", version=__version__, lifespan=lifespan)
    app.state.rkllama = AppState(settings=settings, store=store, scheduler=scheduler, system=system_info())
    # Dialects whose error shape differs have a renderer for their path prefix.
    render_for_path = path_renderer({"/v1/": openai.render_error})
    install_error_handlers(app, render_for_path)
    install_guards(app, settings, render_for_path)
    app.include_router(native.router)
    app.include_router(native_pull.router)
    app.include_router(ollama.router)
    app.include_router(ollama_models.router)
    app.include_router(openai.router)
    install_observability(app, scheduler)  # last: its request counter sees the guards' refusals too
    return app


def server_keep_alive(text: str) -> float | None:
    """--keep-alive in seconds; None (negative values) keeps dialect-loaded models for good."""
    try:
        seconds = parse_keep_alive(text)
    except RkllamaError as exc:
        raise SettingsError(f"--keep-alive (RKLLAMA_KEEP_ALIVE): {exc.message}") from None
    return None if seconds is None or seconds < 0 else seconds
