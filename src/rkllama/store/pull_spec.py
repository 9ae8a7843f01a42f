"""A pull request's model string, with its vision file: `hf/user/repo/file.gguf[+<vision>]`.

    hf/user/repo/model-Q4_K_M.gguf                     the model; its vision file found in the repo
    hf/user/repo/model-Q4_K_M.gguf+mmproj-F16.gguf     the model and this projector (a repo path)
    hf/user/repo/model.rkllm+vision/encoder.rknn       the model and this .rknn vision encoder
    hf/user/repo/model-Q4_K_M.gguf+none                the model alone

The vision file's path is a path in the same repository, like the model's (not relative to the
model's folder: projectors of split models usually sit at the repo's root). It lives in the
model string so every client can say it: the native /pull, Ollama's /api/pull (whose clients
send nothing but the name) and `rkllama pull`. Kept free of huggingface_hub, like pull_ref.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .name_rules import name_problem, shown
from .pull_ref import MAX_REF_CHARS, PullError, PullRef, parse_pull_ref

NO_VISION = "none"
# The Modelfile key and the file kind of each model format's vision file (see store/vision.py).
VISION_KEY = {".gguf": "MMPROJ", ".rkllm": "VISION_ENCODER"}
VISION_SUFFIX = {".gguf": ".gguf", ".rkllm": ".rknn"}
# Split only after a model file name: a `+` inside a file name stays part of it.
_WITH_VISION = re.compile(r"^(?P<model>.*\.(?:gguf|rkllm))\+(?P<vision>[^+]*)$", re.IGNORECASE)


@dataclass(frozen=True)
class PullSpec:
    ref: PullRef
    vision: str | None = None  # a repo path the request names; None: look for one in the repo
    no_vision: bool = False  # `+none`: the model alone

    @property
    def suffix(self) -> str:
        return Path(self.ref.filename).suffix.lower()

    @property
    def vision_key(self) -> str:
        return VISION_KEY[self.suffix]

    @property
    def vision_suffix(self) -> str:
        return VISION_SUFFIX[self.suffix]


def parse_pull_spec(text: object) -> PullSpec:
    """The model and its vision file, checked like the model path (see pull_ref)."""
    if not isinstance(text, str) or len(text) > MAX_REF_CHARS:
        return PullSpec(parse_pull_ref(text))  # its message says what is wrong
    match = _WITH_VISION.match(text.strip())
    if match is None:
        return PullSpec(parse_pull_ref(text))
    ref = parse_pull_ref(match["model"])
    vision = match["vision"].strip()
    if vision == NO_VISION:
        return PullSpec(ref, no_vision=True)
    spec = PullSpec(ref, vision=_checked_vision_path(text, vision))
    if Path(vision).suffix.lower() != spec.vision_suffix:
        kind = "a projector (.gguf)" if spec.suffix == ".gguf" else "a vision encoder (.rknn)"
        raise PullError(
            f"Invalid model path {shown(text)}: after '+' comes {kind} of the repository, or '{NO_VISION}'."
        )
    if Path(vision).name == ref.basename:
        raise PullError(f"Invalid model path {shown(text)}: the vision file must differ from the model file.")
    return spec


def _checked_vision_path(text: str, vision: str) -> str:
    parts = [p for p in vision.split("/") if p]
    if not parts:
        raise PullError(f"Invalid model path {shown(text)}: nothing after '+' (name a file, or '{NO_VISION}').")
    for part in parts:
        if part in {".", ".."}:
            raise PullError(f"Invalid model path {shown(text)}: '.' and '..' are not allowed in a Hugging Face path.")
        if problem := name_problem(part):
            raise PullError(f"Invalid model path {shown(text)}: in {shown(part)}, {problem}.")
    return "/".join(parts)
