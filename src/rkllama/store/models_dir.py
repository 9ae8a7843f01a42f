"""The models directory: listing, name resolution, deletion.

A model is either a flat file (`name.gguf`, `name.rkllm`) or a folder holding one model
file and an optional Modelfile. A model's name is the file name or the folder name. A name
is one path component and never resolves outside the directory, symlinks included.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import BadRequest, ModelNotFound
from .modelfile import MODELFILE_NAME, Modelfile, read_modelfile

MODEL_SUFFIXES = {".gguf": "gguf", ".rkllm": "rkllm"}
# Files a pull is still writing; never listed.
PARTIAL_SUFFIXES = (".part", ".incomplete", ".tmp")


@dataclass
class ModelEntry:
    name: str
    path: Path  # the model file itself
    format: str  # "gguf" or "rkllm": picks the engine
    modelfile: Modelfile
    folder: Path | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def modified(self) -> datetime:
        return datetime.fromtimestamp(self.path.stat().st_mtime, tz=UTC)


def model_format(path: Path) -> str | None:
    return MODEL_SUFFIXES.get(path.suffix.lower())


def check_model_name(name: object) -> str:
    """Refuse names that are not a single, plain path component."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("The model name must be a non-empty string.")
    if name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise BadRequest(
            f"Invalid model name {name!r}: a model name is a file or folder name inside "
            "the models directory, without '/', '\\' or '..'."
        )
    return name


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()

    def ensure_exists(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.root.is_dir()

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return True

    def _guarded(self, path: Path, name: str) -> Path:
        if not self._inside(path):
            raise BadRequest(f"Invalid model name {name!r}: it points outside the models directory.")
        return path

    def list_models(self) -> list[ModelEntry]:
        if not self.exists():
            return []
        entries = []
        for child in sorted(self.root.iterdir(), key=lambda p: p.name.lower()):
            if not self._inside(child) or child.name.startswith("."):
                continue
            try:
                entries.append(self._entry(child, child.name))
            except (ModelNotFound, BadRequest):
                continue
        return entries

    def names(self) -> list[str]:
        return [entry.name for entry in self.list_models()]

    def resolve(self, name: object) -> ModelEntry:
        checked = check_model_name(name)
        candidate = self.root / checked
        if not candidate.exists() and not candidate.is_symlink():
            raise ModelNotFound(checked)
        self._guarded(candidate, checked)
        return self._entry(candidate, checked)

    def _entry(self, candidate: Path, name: str) -> ModelEntry:
        if candidate.is_file():
            fmt = model_format(candidate)
            if fmt is None or candidate.name.endswith(PARTIAL_SUFFIXES):
                raise ModelNotFound(name)
            return ModelEntry(name=name, path=candidate, format=fmt, modelfile=Modelfile())
        if candidate.is_dir():
            modelfile = read_modelfile(candidate / MODELFILE_NAME)
            model_file = self._model_file_in(candidate, modelfile, name)
            return ModelEntry(
                name=name,
                path=model_file,
                format=model_format(model_file) or "gguf",
                modelfile=modelfile,
                folder=candidate,
            )
        raise ModelNotFound(name)

    def _model_file_in(self, folder: Path, modelfile: Modelfile, name: str) -> Path:
        wanted = modelfile.get("FROM")
        if wanted:
            check_model_name(Path(wanted).name)
            path = folder / Path(wanted).name
            if path.is_file() and model_format(path):
                return self._guarded(path, name)
        found = [
            p
            for p in sorted(folder.iterdir())
            if p.is_file() and model_format(p) and not p.name.endswith(PARTIAL_SUFFIXES)
        ]
        if not found:
            raise ModelNotFound(name, f"Model {name} has no .gguf or .rkllm file in its folder.")
        return self._guarded(found[0], name)

    def delete(self, name: object) -> ModelEntry:
        entry = self.resolve(name)
        target = entry.folder or entry.path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        return entry
