"""The models directory: listing, name resolution, deletion.

A model is either a flat file (`name.gguf`, `name.rkllm`) or a folder holding one model
file and an optional Modelfile. A model's name is the file name or the folder name. A name
is one path component and never resolves outside the directory, symlinks included.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..errors import BadRequest, ModelNotFound
from .gguf_info import ModelFileFacts
from .inside import OutsideModelsDir, is_inside, relative
from .modelfile import MODELFILE_NAME, Modelfile, read_modelfile
from .name_rules import check_store_name, name_problem, shown
from .pulls import PullRegistry

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
    # Read once when the entry is made, so a listing never stats a file deleted meanwhile.
    size: int = 0
    modified: datetime = field(default_factory=lambda: datetime.fromtimestamp(0, tz=UTC))


def model_format(path: Path) -> str | None:
    return MODEL_SUFFIXES.get(path.suffix.lower())


def check_model_name(name: object) -> str:
    """Refuse names that are not a single, plain, visible path component (see name_rules)."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("The model name must be a non-empty string.")
    return check_store_name(name)


def _is_model_file(path: Path) -> bool:
    return (
        model_format(path) is not None
        and not path.name.startswith(".")
        and not path.name.endswith(PARTIAL_SUFFIXES)
        and path.is_file()
    )


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()
        self.file_facts = ModelFileFacts(self.root)  # GGUF headers and digests, cached
        self.pulls = PullRegistry()  # pulls in progress into this dir

    def ensure_exists(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.root.is_dir()

    def _guarded(self, path: Path, name: str) -> Path:
        if not is_inside(path, self.root):
            raise OutsideModelsDir(
                f"Model {shown(name)} points outside the models directory "
                f"({relative(path, self.root)} is a link to elsewhere); RKLLama only uses files inside it."
            )
        return path

    def list_models(self) -> list[ModelEntry]:
        """The models, sorted by name; hidden names, links to elsewhere and entries that
        vanish while being read (a delete beside the listing) are left out."""
        if not self.exists():
            return []
        entries = []
        for child in sorted(self.root.iterdir(), key=lambda p: p.name.lower()):
            if name_problem(child.name) is not None:
                continue
            try:
                entries.append(self._entry(child, child.name))
            except (ModelNotFound, BadRequest, OSError):
                continue
        return entries

    def names(self) -> list[str]:
        return [entry.name for entry in self.list_models()]

    def resolve(self, name: object) -> ModelEntry:
        checked = check_model_name(name)
        candidate = self.root / checked
        try:
            if not os.path.lexists(candidate):
                raise ModelNotFound(checked)
            return self._entry(candidate, checked)
        except FileNotFoundError:  # deleted while we looked
            raise ModelNotFound(checked) from None

    def _entry(self, candidate: Path, name: str) -> ModelEntry:
        self._guarded(candidate, name)
        if candidate.is_file():
            if not _is_model_file(candidate):
                raise ModelNotFound(name)
            return self._made(name, candidate, Modelfile(), None)
        if candidate.is_dir():
            modelfile = read_modelfile(candidate / MODELFILE_NAME, self.root)
            return self._made(name, self._model_file_in(candidate, modelfile, name), modelfile, candidate)
        raise ModelNotFound(name)

    def _made(self, name: str, path: Path, modelfile: Modelfile, folder: Path | None) -> ModelEntry:
        info = path.stat()
        return ModelEntry(
            name=name,
            path=path,
            format=model_format(path) or "gguf",
            modelfile=modelfile,
            folder=folder,
            size=info.st_size,
            modified=datetime.fromtimestamp(info.st_mtime, tz=UTC),
        )

    def _model_file_in(self, folder: Path, modelfile: Modelfile, name: str) -> Path:
        wanted = modelfile.get("FROM")
        if wanted:
            file_name = Path(wanted).name
            if name_problem(file_name) is not None:
                raise BadRequest(f"{name}/{MODELFILE_NAME}: FROM={shown(wanted)} is not a file name in the folder.")
            path = folder / file_name
            if _is_model_file(path):
                return self._guarded(path, name)
        # A vision model's projector is a GGUF too; it is never the model.
        projector = modelfile.get("MMPROJ")
        found = [
            p
            for p in sorted(folder.iterdir())
            if _is_model_file(p) and p.name != projector and not p.name.lower().startswith("mmproj")
        ]
        if not found:
            raise ModelNotFound(name, f"Model {name} has no .gguf or .rkllm file in its folder.")
        return self._guarded(found[0], name)

    def delete(self, name: object) -> ModelEntry:
        entry = self.resolve(name)
        target = entry.folder or entry.path
        try:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        except FileNotFoundError:  # a delete beside this one got there first
            raise ModelNotFound(entry.name) from None
        return entry
