"""The files a pulled model needs beside it from its repository: its vision file (a llama.cpp
projector, `mmproj*.gguf`, or an rkllm `.rknn` vision encoder) and, for rkllm models, the
tokenizer files.

Which projector (docs/pull.md, "Vision models"), as llama.cpp's `-hf` picks one
(`find_best_mmproj` in its common/download.cpp): among the repo's `.gguf` files whose name
contains `mmproj`, in the model's folder or a folder above it,
1. the one in the deepest such folder (nearest the model),
2. then the one whose precision is nearest the model's: the bits of the last `-`/`.` tag of the
   file name (`Q4_K_M` -> 4, `Q8_0` -> 8, `F16`/`BF16` -> 16; no digits -> 0),
3. then the first by path.
Which `.rknn`: the only one nearest the model (same folders); several there is a 400 asking the
client to name one, since nothing says which resolution or chip each is for.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from .hub_files import RemoteFile, explain, fetch_metadata
from .name_rules import name_problem, shown
from .pull_download import Watch, download
from .pull_ref import PullError, PullRef
from .pull_spec import NO_VISION, PullSpec

log = logging.getLogger(__name__)

# Files the rkllm engine reads next to the model (tokenizer and chat template; see rkllm_prompt.py).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_SHOWN_CANDIDATES = 5


@dataclass(frozen=True)
class Companion:
    """A vision file to pull with the model, and the Modelfile key that names it."""

    remote: RemoteFile
    key: str

    @property
    def name(self) -> str:
        """Its file name in the model's folder."""
        return Path(self.remote.filename).name


def resolve_vision(spec: PullSpec) -> Companion | None:
    """The vision file of this pull, its metadata fetched; None for a model without one.

    Blocking (hub requests). Every failure is a PullError, raised before any byte is written."""
    if spec.no_vision:
        return None
    wanted = spec.vision or _discover(spec)
    if wanted is None:
        return None
    return Companion(fetch_metadata(spec.ref, wanted), spec.vision_key)


def _discover(spec: PullSpec) -> str | None:
    files = _repo_files(spec)
    if spec.suffix == ".gguf":
        return choose_mmproj(files, spec.ref.filename)
    return choose_encoder(files, spec)


def _repo_files(spec: PullSpec) -> list[str]:
    try:
        listed = HfApi().list_repo_files(spec.ref.repo_id)
    except Exception as exc:  # any hub failure: a message a person can act on
        raise PullError(
            f"Cannot list the files of {spec.ref.repo_id} to find the model's vision file: "
            f"{explain(exc, spec.ref)} Name it with +<file>, or pull the model alone with +{NO_VISION}."
        ) from None
    # Files whose names could never be stored (hidden, control characters) are no candidates.
    return sorted(f for f in listed if all(name_problem(part) is None for part in f.split("/")))


def quant_bits(path: str) -> int:
    """The precision in a GGUF file name, as llama.cpp reads it: `x-Q4_K_M.gguf` -> 4, `x-F16.gguf` -> 16."""
    stem = path.rsplit("/", 1)[-1]
    if not stem.lower().endswith(".gguf"):
        return 0
    stem = stem[: -len(".gguf")]
    if split := _SPLIT.match(stem):
        stem = split[1]
    tag = _TAG.search(stem)
    digits = re.search(r"\d+", tag[1]) if tag else None
    return int(digits[0]) if digits else 0


def _folders(path: str) -> list[str]:
    return path.split("/")[:-1]


def _nearby(files: list[str], model: str, suffix: str) -> list[tuple[int, str]]:
    """(depth, path) of the files of this kind in the model's folder or a folder above it."""
    here = _folders(model)
    found = []
    for path in files:
        folders = _folders(path)
        if path != model and path.lower().endswith(suffix) and folders == here[: len(folders)]:
            found.append((len(folders), path))
    return found


def choose_mmproj(files: list[str], model: str) -> str | None:
    """The projector llama.cpp's `-hf` would take for `model` (see the module's docstring)."""
    bits = quant_bits(model)
    candidates = [
        ((-depth, abs(quant_bits(path) - bits), path), path)
        for depth, path in _nearby(files, model, ".gguf")
        if "mmproj" in path.rsplit("/", 1)[-1].lower()
    ]
    return min(candidates)[1] if candidates else None


def choose_encoder(files: list[str], spec: PullSpec) -> str | None:
    """The one `.rknn` nearest the model; several there: the client must say which."""
    found = _nearby(files, spec.ref.filename, ".rknn")
    if not found:
        return None
    deepest = max(depth for depth, _ in found)
    nearest = sorted(path for depth, path in found if depth == deepest)
    if len(nearest) == 1:
        return nearest[0]
    listed = ", ".join(shown(p) for p in nearest[:_SHOWN_CANDIDATES]) + (
        ", ..." if len(nearest) > _SHOWN_CANDIDATES else ""
    )
    model = f"hf/{spec.ref.repo_id}/{spec.ref.filename}"
    raise PullError(
        f"{spec.ref.repo_id} holds several .rknn vision encoders ({listed}): "
        f"name one, e.g. {model}+{nearest[0]}, or pull the model alone with {model}+{NO_VISION}."
    )


def fetch_tokenizer_files(ref: PullRef, folder: Path) -> None:
    """Best effort: a repo without tokenizer files, or a failure here, only logs a warning."""
    try:
        infos = HfApi().get_paths_info(ref.repo_id, list(TOKENIZER_FILES))
    except Exception as exc:
        log.warning("No tokenizer files for %s: %s", ref.repo_id, explain(exc, ref))
        return
    for info in infos:
        if not isinstance(info, RepoFile):
            continue
        part = folder / f".{Path(info.path).name}.part"
        try:
            remote = fetch_metadata(ref, info.path)
            download(remote, part, Watch(total=remote.size))
            part.replace(folder / Path(info.path).name)
        except Exception as exc:
            log.warning("Could not fetch %s from %s: %s", info.path, ref.repo_id, exc)
            part.unlink(missing_ok=True)
