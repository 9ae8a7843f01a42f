"""New models made from existing ones: copy (same file, same Modelfile, new name) and
create (same file, Modelfile values changed), as Ollama's /api/copy and /api/create do.

The new model is a folder holding a hard link to the source's model file (a copy when
the filesystem cannot link) and its own Modelfile. It is built under a hidden temporary
name and renamed into place, so a failure never leaves a half-made model listed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BadRequest
from .modelfile import MODELFILE_NAME, Modelfile
from .models_dir import ModelEntry, ModelStore
from .names import new_store_name


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def derive_model(store: ModelStore, source: ModelEntry, new_name: str, changes: dict[str, str] | None = None) -> str:
    """Make `new_name` from `source` with Modelfile `changes` applied; returns the store name."""
    name = new_store_name(store, new_name)
    values = {**source.modelfile.values, **(changes or {}), "FROM": source.path.name}
    store.ensure_exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=store.root))
    try:
        _link_or_copy(source.path, staging / source.path.name)
        (staging / MODELFILE_NAME).write_text(Modelfile(values).render(), encoding="utf-8")
        if (store.root / name).exists():
            raise BadRequest(f"A model named {new_name!r} appeared meanwhile; nothing was changed.")
        staging.rename(store.root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return name
