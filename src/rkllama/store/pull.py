"""Model pulls from Hugging Face (issue #4 completes this module).

Interface used by the dialect layers:
    parse_pull_ref("hf/user/repo/file.gguf") -> PullRef(repo_id="user/repo", filename="file.gguf")
    async for progress in pull_model(store, ref): ...   # PullProgress events
Failures raise PullError, whose message is shown as "Error during download: <message>".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import BadRequest
from .models_dir import ModelStore


class PullError(BadRequest):
    pass


@dataclass
class PullRef:
    repo_id: str
    filename: str


@dataclass
class PullProgress:
    status: str  # "pulling manifest" | "downloading" | "verifying sha256 digest" | "success"
    filename: str
    total: int = 0
    completed: int = 0
    model_name: str | None = None  # set on "success": the name the model is listed under


def parse_pull_ref(ref: object) -> PullRef:
    if not isinstance(ref, str) or not ref.strip():
        raise PullError("'model' must be a Hugging Face path such as hf/username/repo/file.gguf.")
    parts = [p for p in ref.strip().split("/") if p]
    if parts and parts[0] == "hf":
        parts = parts[1:]
    if len(parts) < 3:
        raise PullError(f"Invalid model path {ref!r}: expected hf/username/repo/file (or username/repo/file).")
    return PullRef(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))


async def pull_model(store: ModelStore, ref: PullRef) -> AsyncIterator[PullProgress]:
    raise PullError("Pulling models is not available yet.")
    yield  # pragma: no cover
