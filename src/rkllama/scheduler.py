"""The scheduler alone owns which models are loaded.

Each loaded model has one runner subprocess. Requests for a model queue on its runner.
The native API keeps RKLLama's single "current model" (the most recently loaded one);
the Ollama/OpenAI dialects may name any model, which is then loaded on demand, evicting
the least recently used idle model when `max_loaded_models` is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .context_size import ContextLimits, default_kv_budget
from .errors import ModelLoadError, RunnerError, ServerBusy, ServerShuttingDown
from .runner.client import RunnerLimits, RunnerProcess
from .runner.engines.base import LoadSpec
from .store.models_dir import ModelEntry, ModelStore
from .types import DoneEvent, EmbedRequest, EmbedResult, GenerateRequest, ModelInfo, TokenEvent

log = logging.getLogger(__name__)

RunnerFactory = Callable[[LoadSpec, Callable[[RunnerProcess], None]], RunnerProcess]


@dataclass
class LoadedModel:
    entry: ModelEntry
    runner: RunnerProcess
    info: ModelInfo
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    # Monotonic deadline after which an idle model is unloaded; None keeps it loaded.
    expires_at: float | None = None
    # A larger context a waiting request needs: the model is reloaded at it once idle.
    reload_context: int | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def busy(self) -> bool:
        return self.runner.pending > 0


class Scheduler:
    def __init__(
        self,
        store: ModelStore,
        max_loaded_models: int = 1,
        runner_factory: RunnerFactory | None = None,
        context_length: int | None = None,
        kv_budget: int | None = None,
        runner_limits: RunnerLimits | None = None,
        unload_grace: float = 30.0,
    ) -> None:
        self.store = store
        self.context_length = context_length
        self.kv_budget = kv_budget if kv_budget is not None else default_kv_budget()
        self.max_loaded_models = max(1, max_loaded_models)
        limits = runner_limits or RunnerLimits()
        self._runner_factory = runner_factory or (lambda spec, on_exit: RunnerProcess(spec, on_exit, limits))
        self.unload_grace = unload_grace
        self._loaded: dict[str, LoadedModel] = {}
        self._draining: dict[str, asyncio.Event] = {}  # models being unloaded -> set once gone
        self._load_lock = asyncio.Lock()
        self._current: str | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._shutting_down = False

    # --- what is loaded -------------------------------------------------------------
    @property
    def current_model(self) -> str | None:
        return self._current if self._current in self._loaded else None

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def get_loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    # --- load / unload --------------------------------------------------------------
    def context_limits(self, entry: ModelEntry) -> ContextLimits:
        """What sizes the context of `entry` (its GGUF header, Modelfile and the settings)."""
        metadata = self.store.file_facts.gguf(entry.path).metadata if entry.format == "gguf" else {}
        return ContextLimits.of(metadata, dict(entry.modelfile.values), self.context_length, self.kv_budget)

    def default_context(self, entry: ModelEntry) -> int | None:
        """The context a request without num_ctx gets: the loaded one, else what a load gives."""
        loaded = self._loaded.get(entry.name)
        if loaded is not None:
            return loaded.info.context_length
        return self.context_limits(entry).plan().context if entry.format == "gguf" else None

    async def load(self, name: str, overrides: dict | None = None) -> LoadedModel:
        """Load `name` (a model in the store) unless it is already loaded.

        A `num_ctx` override larger than the loaded context waits until the model is idle (its
        requests in flight done), then reloads it at that size; requests arriving meanwhile
        wait for the reload too, so the wait ends. A smaller or equal one uses the loaded model
        (its requests are trimmed to their own num_ctx by the engine)."""
        entry = self.store.resolve(name)
        overrides = dict(overrides or {})
        while True:
            async with self._load_lock:
                existing = self._loaded.get(entry.name)
                busy_model = None
                if existing is not None and existing.runner.alive:
                    needed = max(overrides.get("num_ctx") or 0, existing.reload_context or 0)
                    if needed <= existing.info.context_length:
                        self._current = entry.name
                        return existing
                    if existing.busy:
                        existing.reload_context = needed
                        busy_model = existing
                    else:
                        log.info(
                            "Reloading %s with a context of %d (loaded: %d)",
                            entry.name,
                            needed,
                            existing.info.context_length,
                        )
                        await self.unload(entry.name)
                        overrides["num_ctx"] = needed
                if busy_model is None:
                    return await self._start(entry, overrides)
            log.info("Waiting for %s to be idle to reload it with a context of %d", entry.name, needed)
            await busy_model.runner.wait_idle()

    async def _start(self, entry: ModelEntry, overrides: dict) -> LoadedModel:
        """Caller holds the load lock."""
        # A model being unloaded still holds its memory (and may be this one): wait.
        for drained in list(self._draining.values()):
            await drained.wait()
        if self._shutting_down:
            raise ServerShuttingDown()
        await self._make_room()
        if entry.format == "gguf":
            limits = self.context_limits(entry)
            plan = limits.plan(overrides.get("num_ctx"))
            overrides["num_ctx"] = plan.context
            if plan.parallel < limits.parallel:  # else the engine reads (and checks) NUM_PARALLEL itself
                overrides["num_parallel"] = plan.parallel
            log.info("Loading %s: context %d x %d sequences (%s)", entry.name, plan.context, plan.parallel, plan.reason)
        elif self.context_length and not overrides.get("num_ctx") and not entry.modelfile.get("NUM_CTX"):
            overrides["num_ctx"] = self.context_length  # rkllm: no trained context to read
        spec = LoadSpec(
            name=entry.name,
            path=str(entry.path),
            format=entry.format,
            modelfile=dict(entry.modelfile.values),
            overrides=overrides,
        )
        runner = self._runner_factory(spec, self._runner_exited)
        started = time.monotonic()
        info = await runner.start()
        model = LoadedModel(entry=entry, runner=runner, info=info, load_seconds=time.monotonic() - started)
        self._loaded[entry.name] = model
        self._current = entry.name
        log.info("Loaded %s (%s) in %.2fs", entry.name, info.engine, model.load_seconds)
        return model

    async def _make_room(self) -> None:
        while len(self._loaded) >= self.max_loaded_models:
            idle = sorted((m for m in self._loaded.values() if not m.busy), key=lambda m: m.last_used)
            if not idle:
                raise ServerBusy(
                    "Server busy: every loaded model is answering requests. Retry shortly, "
                    "or start the server with a higher --max-loaded-models."
                )
            await self.unload(idle[0].name)

    async def unload(self, name: str, grace: float | None = None) -> bool:
        """Unload `name` once its requests in flight finish (at most `grace` seconds, the
        scheduler's unload_grace by default). False when it was not loaded."""
        model = self._loaded.pop(name, None)
        if model is None:
            if drained := self._draining.get(name):
                await drained.wait()  # unloading already: done when that one is
            return False
        if self._current == name:
            self._current = None
        drained = self._draining[name] = asyncio.Event()
        try:
            grace = self.unload_grace if grace is None else grace
            if model.busy:
                log.info("Unloading %s: waiting up to %gs for %d request(s)", name, grace, model.runner.pending)
            if not await model.runner.drain(grace):
                log.warning("Unloading %s: requests still running after %gs are stopped", name, grace)
            await model.runner.close()
        finally:
            del self._draining[name]
            drained.set()
        log.info("Unloaded %s", name)
        return True

    async def unload_all(self, grace: float | None = None) -> None:
        for name in list(self._loaded):
            await self.unload(name, grace)

    def _runner_exited(self, runner: RunnerProcess) -> None:
        for name, model in list(self._loaded.items()):
            if model.runner is runner:
                del self._loaded[name]
                if self._current == name:
                    self._current = None
                log.warning("Model %s is no longer loaded: its runner exited", name)

    # --- keep-alive -----------------------------------------------------------------
    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        """None keeps the model loaded; a number unloads it that long after its last use."""
        model = self._loaded.get(name)
        if model is not None:
            model.expires_at = None if seconds is None else time.monotonic() + max(0.0, seconds)

    def start_sweeper(self, interval: float = 1.0) -> None:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(interval)
                now = time.monotonic()
                for model in list(self._loaded.values()):
                    if model.expires_at is not None and model.expires_at <= now and not model.busy:
                        try:
                            await self.unload(model.name)
                        except Exception:  # one model's failure must not end keep-alive for all
                            log.exception("Keep-alive could not unload %s; will retry", model.name)

        self._sweeper = asyncio.get_running_loop().create_task(sweep())

    async def begin_shutdown(self) -> None:
        """The server is stopping: refuse new loads and end every request in flight with a
        clear error, so each stream gets its final chunk before connections close."""
        self._shutting_down = True
        for model in list(self._loaded.values()):
            if model.busy:
                log.info("Shutting down: stopping %d request(s) to %s", model.runner.pending, model.name)
            await model.runner.interrupt(ServerShuttingDown())

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._shutting_down = True
        await self.unload_all(grace=0)

    # --- work -----------------------------------------------------------------------
    async def generate(self, model: LoadedModel, request: GenerateRequest) -> AsyncIterator[TokenEvent | DoneEvent]:
        model.last_used = time.monotonic()
        try:
            async with contextlib.aclosing(model.runner.generate(request)) as events:
                async for event in events:
                    if isinstance(event, DoneEvent) and event.usage.truncated:
                        log.warning(
                            "Prompt for %s trimmed to fit the context: %d oldest messages dropped, %d tokens cut; "
                            "%d tokens remain",
                            model.name,
                            event.usage.dropped_messages,
                            event.usage.truncated_tokens,
                            event.usage.prompt_tokens,
                        )
                    yield event
        finally:
            model.last_used = time.monotonic()

    async def embed(self, model: LoadedModel, request: EmbedRequest) -> EmbedResult:
        model.last_used = time.monotonic()
        return await model.runner.embed(request)


__all__ = ["LoadedModel", "ModelLoadError", "RunnerError", "Scheduler"]
