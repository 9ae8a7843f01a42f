"""Which models can see images: the vision file named in a model folder's Modelfile.

A llama.cpp model names its projector GGUF with `MMPROJ`, an rkllm model its `.rknn` vision
encoder with `VISION_ENCODER` (docs/vision.md). The file must sit inside the model's own
folder; the name never leads elsewhere."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadRequest
from .inside import is_inside
from .models_dir import ModelEntry
from .name_rules import name_problem, shown

VISION_KEYS = {"gguf": "MMPROJ", "rkllm": "VISION_ENCODER"}
VISION_SUFFIXES = {"gguf": ".gguf", "rkllm": ".rknn"}


def vision_key(entry: ModelEntry) -> str:
    return VISION_KEYS.get(entry.format, "MMPROJ")


def has_vision(entry: ModelEntry) -> bool:
    return entry.folder is not None and bool(entry.modelfile.get(vision_key(entry)))


def vision_path(entry: ModelEntry) -> Path | None:
    """The vision file of a model, checked: in the model's folder, present, of the right kind."""
    if not has_vision(entry):
        return None
    assert entry.folder is not None
    key = vision_key(entry)
    wanted = entry.modelfile.get(key) or ""
    where = f"{entry.name}/Modelfile: {key}={shown(wanted)}"
    if name_problem(wanted) is not None:
        raise BadRequest(f"{where} is not a file name in the model's folder.")
    path = entry.folder / wanted
    if not path.is_file():
        raise BadRequest(f"{where} names a file that is not in the model's folder; put it there or fix the name.")
    if not is_inside(path, entry.folder):
        raise BadRequest(f"{where} is a link to outside the model's folder; RKLLama only uses files inside it.")
    if path.suffix.lower() != VISION_SUFFIXES.get(entry.format, ".gguf"):
        raise BadRequest(f"{where} must be a {VISION_SUFFIXES.get(entry.format)} file.")
    return path.resolve()


def vision_file_size(entry: ModelEntry) -> int:
    """Bytes of the model's vision file (its weights load beside the model's); 0 if none or unusable."""
    try:
        path = vision_path(entry)
        return path.stat().st_size if path else 0
    except (BadRequest, OSError):
        return 0


def check_vision(entry: ModelEntry, images: int) -> None:
    """Refuse images for a model that cannot see them, or more of them than its Modelfile allows."""
    if images <= 0:
        return
    if not has_vision(entry):
        raise BadRequest(
            f"Model {entry.name} cannot read images: it has no vision encoder. Use a vision model, or put the "
            f"model's {'projector (mmproj GGUF)' if entry.format == 'gguf' else '.rknn vision encoder'} in its "
            f"folder and name it in its Modelfile with {vision_key(entry)}= (docs/vision.md)."
        )
    vision_path(entry)
    limit = entry.modelfile.get_int("MAX_IMAGES")
    if limit is not None and images > limit:
        raise BadRequest(
            f"The request holds {images} images; model {entry.name} takes at most {limit} "
            "(MAX_IMAGES in its Modelfile)."
        )
