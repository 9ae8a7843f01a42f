"""What `pull` is asked for: `hf/user/repo/file.gguf`, checked before anything reaches the
hub or the disk. Kept free of huggingface_hub, so the CLI can check a path without importing it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest
from .models_dir import MODEL_SUFFIXES, check_model_name
from .name_rules import name_problem, shown

# A Hugging Face path: user (96), repo (96) and a file path; more is no hub's.
MAX_REF_CHARS = 1024


class PullError(BadRequest):
    pass


@dataclass
class PullRef:
    repo_id: str
    filename: str

    @property
    def basename(self) -> str:
        return Path(self.filename).name

    @property
    def model_name(self) -> str:
        """The folder the model is installed in, and the name it is listed under."""
        return Path(self.filename).stem


def parse_pull_ref(ref: object) -> PullRef:
    if not isinstance(ref, str) or not ref.strip():
        raise PullError("'model' must be a Hugging Face path such as hf/username/repo/file.gguf.")
    if len(ref) > MAX_REF_CHARS:
        raise PullError(f"Invalid model path {shown(ref)}: longer than {MAX_REF_CHARS} characters.")
    parts = [p for p in ref.strip().split("/") if p]
    if parts and parts[0] == "hf":
        parts = parts[1:]
    if len(parts) < 3:
        raise PullError(f"Invalid model path {shown(ref)}: expected hf/username/repo/file (or username/repo/file).")
    if any(p in {".", ".."} for p in parts):
        raise PullError(f"Invalid model path {shown(ref)}: '.' and '..' are not allowed in a Hugging Face path.")
    for part in parts:
        if problem := name_problem(part):
            raise PullError(f"Invalid model path {shown(ref)}: in {shown(part)}, {problem}.")
    pull_ref = PullRef(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    if Path(pull_ref.filename).suffix.lower() not in MODEL_SUFFIXES:
        raise PullError(f"Cannot pull {shown(pull_ref.filename)}: only .gguf and .rkllm model files can be pulled.")
    check_model_name(pull_ref.model_name)
    return pull_ref
