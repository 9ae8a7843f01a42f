"""New models made from existing ones: copy (same file, same Modelfile, new name) and
create (same file, Modelfile values changed), as Ollama's /api/copy and /api/create do.

The new model is a folder holding a hard link to the source's model file (a copy when
the filesystem cannot link) and its own Modelfile. It is built under a hidden temporary
name (`.derive.*.tmp`) and renamed into place, so a failure never leaves a half-made model listed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BadRequest, Conflict, ModelNotFound
from .inside import describe_os_error, resolve_inside
from .modelfile import MODELFILE_NAME, Modelfile
from .models_dir import ModelEntry, ModelStore
from .name_rules import shown
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
    staging = Path(tempfile.mkdtemp(prefix=".derive.", suffix=".tmp", dir=store.root))
    try:
        _link_or_copy(resolve_inside(source.path, store.root), staging / source.path.name)
        (staging / MODELFILE_NAME).write_text(Modelfile(values).render(), encoding="utf-8")
        if os.path.lexists(store.root / name):
            raise Conflict(f"A model named {shown(new_name)} appeared meanwhile; nothing was changed.")
        staging.rename(store.root / name)
    except FileNotFoundError:  # the source was deleted beside this copy
        raise ModelNotFound(source.name) from None
    except OSError as exc:
        raise BadRequest(f"Cannot make model {shown(name)}: {describe_os_error(exc, store.root)}.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return name
