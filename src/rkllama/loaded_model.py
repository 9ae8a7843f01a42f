"""A model the scheduler has loaded: its runner, what it reported, and when it may go."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .memory import MemoryNeed
from .runner.client import RunnerProcess
from .store.models_dir import ModelEntry
from .types import ModelInfo


@dataclass
class LoadedModel:
    entry: ModelEntry
    runner: RunnerProcess
    info: ModelInfo
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    # Seconds an idle model stays loaded after its last use; None keeps it loaded.
    keep_alive: float | None = None
    # A larger context a waiting request needs: the model is reloaded at it once idle.
    reload_context: int | None = None
    memory: MemoryNeed = field(default_factory=lambda: MemoryNeed(0, 0))

    @property
    def expires_at(self) -> float | None:
        """Monotonic time after which the model is unloaded once idle; None: never."""
        return None if self.keep_alive is None else self.last_used + self.keep_alive

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def busy(self) -> bool:
        return self.runner.pending > 0


async def first_idle(models: list[LoadedModel]) -> None:
    """Until one of `models` has no request queued or running."""
    waits = [asyncio.ensure_future(model.runner.wait_idle()) for model in models]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
