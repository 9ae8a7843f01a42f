"""Pulls in progress, per models dir: which model names are being pulled (so `rm` can refuse
them) and one lock per target, so two pulls of the same model never write the same files.

Pulls run in worker threads, hence threading locks. One server process per models dir is
assumed: the locks do not reach across processes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .models_dir import ModelStore


class PullRegistry:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._active: Counter[str] = Counter()
        self._target_locks: dict[str, threading.Lock] = {}
        self._staging_users = 0

    def begin(self, name: str) -> None:
        with self._guard:
            self._active[name] += 1

    def end(self, name: str) -> None:
        with self._guard:
            self._active[name] -= 1
            if self._active[name] <= 0:
                del self._active[name]

    def active(self, name: str) -> bool:
        with self._guard:
            return self._active[name] > 0

    def names(self) -> list[str]:
        with self._guard:
            return sorted(self._active)

    def target_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._target_locks.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def staging(self, folder: Path) -> Iterator[Path]:
        """The hidden folder pulls write into; removed when the last pull leaves it empty."""
        with self._guard:
            self._staging_users += 1
            folder.mkdir(exist_ok=True)
        try:
            yield folder
        finally:
            with self._guard:
                self._staging_users -= 1
                if self._staging_users == 0:
                    with contextlib.suppress(OSError):  # not empty: partial files wait to resume
                        folder.rmdir()


# Keyed by the models dir, so every app (and test) using a dir shares its registry.
_REGISTRIES: dict[str, PullRegistry] = {}
_REGISTRIES_GUARD = threading.Lock()


def registry_for(store: ModelStore) -> PullRegistry:
    key = str(store.root.resolve())
    with _REGISTRIES_GUARD:
        return _REGISTRIES.setdefault(key, PullRegistry())


def is_being_pulled(store: ModelStore, name: str) -> bool:
    """True while a pull is writing model `name` (a folder name in the models dir)."""
    return registry_for(store).active(name)
