"""Pulls in progress, per models dir (its ModelStore holds the registry): which model names
are being pulled (so `rm` can refuse them) and one lock per target, so two pulls of the same
model never write the same files.

Pulls run in worker threads, hence threading locks. One server process per models dir is
assumed: the locks do not reach across processes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def is_being_pulled(store: ModelStore, name: str) -> bool:
    """True while a pull is writing model `name` (a folder name in the models dir)."""
    return store.pulls.active(name)
