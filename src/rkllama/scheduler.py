"""The scheduler alone owns which models are loaded.

Each loaded model has one runner subprocess. Requests for a model queue on its runner, in
arrival order; requests to different models run side by side. The native API keeps RKLLama's
single "current model" (the most recently loaded one); the Ollama/OpenAI dialects may name any
model, which is then loaded on demand.

A load first makes room: the least recently used idle models are unloaded (when every loaded
model is busy, the load waits for one to be idle, as Ollama does) until both
`max_loaded_models` and the memory budget (memory.py) allow the new one; a model that could
never fit is refused before anything is unloaded. Each model has its own load lock, so a slow
load of one never delays requests to another that is loaded. Requests waiting for a model
(queued behind its running ones, or for its load) are bounded by `max_queue` server-wide; past
it a request gets a 503 with Retry-After, as Ollama's OLLAMA_MAX_QUEUE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from .context_size import ContextLimits, default_kv_budget, kv_contexts
from .errors import ModelLoadError, ModelTooLarge, RunnerError, ServerBusy, ServerShuttingDown
from .loaded_model import LoadedModel, first_idle
from .memory import MemoryNeed, gguf_need, mib, rkllm_need
from .metrics import Metrics
from .runner.client import RunnerLimits, RunnerProcess
from .runner.engines.base import LoadSpec
from .store.models_dir import ModelEntry, ModelStore
from .store.vision import vision_file_size, vision_path
from .types import DoneEvent, EmbedRequest, EmbedResult, GenerateRequest, TokenEvent

log = logging.getLogger(__name__)

RunnerFactory = Callable[[LoadSpec, Callable[[RunnerProcess], None]], RunnerProcess]


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
        memory_budget: int | None = None,
        max_queue: int = 512,
        keep_alive: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.context_length = context_length
        self.kv_budget = kv_budget if kv_budget is not None else default_kv_budget()
        self.max_loaded_models = max(1, max_loaded_models)
        limits = runner_limits or RunnerLimits()
        self._runner_factory = runner_factory or (lambda spec, on_exit: RunnerProcess(spec, on_exit, limits))
        self.unload_grace = unload_grace
        self.memory_budget = memory_budget  # None: unbounded
        self.max_queue = max(0, max_queue)
        # How long a model loaded for a dialect request stays loaded when idle (None: for good).
        self.default_keep_alive = keep_alive
        self.metrics = metrics or Metrics()
        self._loaded: dict[str, LoadedModel] = {}
        self._draining: dict[str, asyncio.Event] = {}  # models being unloaded -> set once gone
        self._starting: dict[str, MemoryNeed] = {}  # models being loaded -> what they will take
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._room_lock = asyncio.Lock()  # one decision at a time about what to evict
        self._waiting_for_load = 0
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

    def memory_need(self, entry: ModelEntry, context: int | None, parallel: int) -> MemoryNeed:
        """What `entry` takes once loaded with this context and number of sequences (its
        vision projector or encoder, if any, counts with the weights)."""
        size = entry.size + vision_file_size(entry)
        if entry.format == "gguf":
            facts = self.context_limits(entry)
            contexts = kv_contexts(parallel, facts.unified)
            return gguf_need(size, facts.bytes_per_token, context or facts.plan().context, contexts)
        return rkllm_need(size)

    def memory_in_use(self) -> int:
        return sum(m.memory.total for m in self._loaded.values()) + sum(n.total for n in self._starting.values())

    def queue_depth(self, name: str | None = None) -> int:
        """Requests waiting (not yet running) for `name`, or for any model."""
        models = [self._loaded[name]] if name in self._loaded else [] if name else list(self._loaded.values())
        waiting = sum(max(0, m.runner.pending - m.info.parallel) for m in models)
        return waiting + (self._waiting_for_load if name is None else 0)

    def admit(self) -> None:
        """Refuse a new request when `max_queue` requests wait already: a 503 the client may retry."""
        if self.queue_depth() >= self.max_queue:
            self.metrics.rejected.inc()
            raise ServerBusy(
                f"Server busy: {self.max_queue} requests are waiting already (RKLLAMA_MAX_QUEUE). Retry shortly.",
                retry_after=1,
            )

    def _lock_for(self, name: str) -> asyncio.Lock:
        return self._model_locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, overrides: dict | None = None, *, for_dialect: bool = False) -> LoadedModel:
        """Load `name` (a model in the store) unless it is already loaded.

        A `num_ctx` override larger than the loaded context waits until the model is idle (its
        requests in flight done), then reloads it at that size; requests arriving meanwhile
        wait for the reload too, so the wait ends. A smaller or equal one uses the loaded model
        (its requests are trimmed to their own num_ctx by the engine). A model loaded
        `for_dialect` gets the server's default keep-alive."""
        entry = self.store.resolve(name)
        overrides = dict(overrides or {})
        while True:
            lock = self._lock_for(entry.name)
            if lock.locked():
                self.admit()  # a request queued behind a load counts as waiting
            self._waiting_for_load += 1
            try:
                await lock.acquire()
            finally:
                self._waiting_for_load -= 1
            try:
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
                    model = await self._start(entry, overrides)
                    if for_dialect:
                        model.keep_alive = self.default_keep_alive
                    return model
            finally:
                lock.release()
            log.info("Waiting for %s to be idle to reload it with a context of %d", entry.name, needed)
            await busy_model.runner.wait_idle()

    async def _start(self, entry: ModelEntry, overrides: dict) -> LoadedModel:
        """Caller holds the model's load lock."""
        # A model being unloaded still holds its memory (and may be this one): wait.
        for drained in list(self._draining.values()):
            await drained.wait()
        if self._shutting_down:
            raise ServerShuttingDown()
        parallel = 1
        if entry.format == "gguf":
            limits = self.context_limits(entry)
            plan = limits.plan(overrides.get("num_ctx"))
            overrides["num_ctx"] = plan.context
            parallel = plan.parallel
            if plan.parallel < limits.parallel:  # else the engine reads (and checks) NUM_PARALLEL itself
                overrides["num_parallel"] = plan.parallel
            log.info("Loading %s: context %d x %d sequences (%s)", entry.name, plan.context, plan.parallel, plan.reason)
        elif self.context_length and not overrides.get("num_ctx") and not entry.modelfile.get("NUM_CTX"):
            overrides["num_ctx"] = self.context_length  # rkllm: no trained context to read
        need = self.memory_need(entry, overrides.get("num_ctx"), parallel)
        async with self._room_lock:
            await self._make_room(entry.name, need)
            self._starting[entry.name] = need
        spec = LoadSpec(
            name=entry.name,
            path=str(entry.path),
            format=entry.format,
            modelfile=dict(entry.modelfile.values),
            overrides=overrides,
            vision_path=str(path) if (path := vision_path(entry)) else None,
        )
        started = time.monotonic()
        try:
            runner = self._runner_factory(spec, self._runner_exited)
            info = await runner.start()
        finally:
            del self._starting[entry.name]
        model = LoadedModel(entry=entry, runner=runner, info=info, load_seconds=time.monotonic() - started, memory=need)
        self._loaded[entry.name] = model
        self._current = entry.name
        self.metrics.load_seconds.labels(model=entry.name).observe(model.load_seconds)
        log.info("Loaded %s (%s) in %.2fs, %s", entry.name, info.engine, model.load_seconds, need.describe())
        return model

    def _fits(self, need: MemoryNeed) -> bool:
        slots_free = len(self._loaded) + len(self._starting) < self.max_loaded_models
        memory_free = self.memory_budget is None or self.memory_in_use() + need.total <= self.memory_budget
        return slots_free and memory_free

    async def _make_room(self, name: str, need: MemoryNeed) -> None:
        """Unload the least recently used idle models until `need` fits. Caller holds the room lock."""
        if self.memory_budget is not None and need.total > self.memory_budget:
            raise ModelTooLarge(
                f"Model {name} needs {need.describe()}, more than the memory budget of "
                f"{mib(self.memory_budget)} MiB (--memory-budget). Lower its context (num_ctx, NUM_CTX) or "
                "NUM_PARALLEL, or raise the budget."
            )
        while not self._fits(need):
            idle = sorted((m for m in self._loaded.values() if not m.busy), key=lambda m: m.last_used)
            if idle:
                log.info("Unloading %s (least recently used) to make room for %s", idle[0].name, name)
                await self.unload(idle[0].name)
                continue
            if not self._loaded:  # the room is held by other loads still starting
                raise ServerBusy(
                    f"Server busy: other models are being loaded and there is no room for {name} yet. Retry "
                    "shortly, or raise --max-loaded-models or --memory-budget.",
                    retry_after=5,
                )
            # As Ollama: wait for a loaded model to finish its requests, then evict it.
            log.info("Waiting for a loaded model to be idle to make room for %s", name)
            self.admit()
            self._waiting_for_load += 1
            try:
                await first_idle(list(self._loaded.values()))
            finally:
                self._waiting_for_load -= 1

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
                self.metrics.runner_exits.labels(model=name).inc()
                log.warning("Model %s is no longer loaded: its runner exited", name)

    # --- keep-alive -----------------------------------------------------------------
    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        """None keeps the model loaded; a number unloads it that long after its last use."""
        model = self._loaded.get(name)
        if model is not None:
            model.keep_alive = None if seconds is None else max(0.0, seconds)
            model.last_used = time.monotonic()

    def start_sweeper(self, interval: float = 1.0) -> None:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(interval)
                now = time.monotonic()
                for model in list(self._loaded.values()):
                    expires_at = model.expires_at
                    if expires_at is not None and expires_at <= now and not model.busy:
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
        self.admit()
        model.last_used = time.monotonic()
        timing = self.metrics.timing(model.name)
        try:
            async with contextlib.aclosing(model.runner.generate(request)) as events:
                async for event in events:
                    if isinstance(event, DoneEvent):
                        timing.done(event.usage)
                        if event.usage.truncated:
                            log.warning(
                                "Prompt for %s trimmed to fit the context: %d oldest messages dropped, "
                                "%d tokens cut; %d tokens remain",
                                model.name,
                                event.usage.dropped_messages,
                                event.usage.truncated_tokens,
                                event.usage.prompt_tokens,
                            )
                    else:
                        timing.token(event.tokens)
                    yield event
        finally:
            model.last_used = time.monotonic()

    async def embed(self, model: LoadedModel, request: EmbedRequest) -> EmbedResult:
        self.admit()
        model.last_used = time.monotonic()
        try:
            result = await model.runner.embed(request)
        finally:
            model.last_used = time.monotonic()
        self.metrics.prompt_tokens.labels(model=model.name).inc(result.prompt_tokens)
        return result


__all__ = ["LoadedModel", "ModelLoadError", "RunnerError", "Scheduler"]
