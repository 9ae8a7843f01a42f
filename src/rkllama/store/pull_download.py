"""One file of a pull, downloaded in a worker thread: bytes appended to a `.part` file
(resuming from its size), counted for progress, then checked against the hub's size and
sha256 (the git blob sha1 for small non-LFS files)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get

from .hub_files import RemoteFile
from .pull_ref import PullError

# 1 MB reads instead of the library's 10 MB, so progress advances smoothly and memory stays low.
constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


class PullCancelled(Exception):
    """Raised in the download thread when the client went away."""


@dataclass
class Watch:
    """One file's progress, shared between the download thread (writer) and the event loop (reader)."""

    total: int
    completed: int = 0
    phase: str = "downloading"  # "downloading" | "verifying" | "done"
    cancel: threading.Event = field(default_factory=threading.Event)


class _ProgressSink:
    """Stands in for tqdm in `http_get`: counts bytes, and stops the download on cancel."""

    def __init__(self, watch: Watch, initial: int = 0, **_: object) -> None:
        self.watch = watch
        watch.completed = initial

    def __enter__(self) -> _ProgressSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        self.watch.completed += int(n)
        if self.watch.cancel.is_set():
            raise PullCancelled()


def file_digest(path: Path, etag: str) -> str | None:
    """The digest of `path` in the etag's kind (sha256, or git blob sha1), None if unknown."""
    if _SHA256.fullmatch(etag):
        digest = hashlib.sha256()
    elif _GIT_SHA1.fullmatch(etag):
        digest = hashlib.sha1()  # noqa: S324 - git's blob id, not a security check
        digest.update(f"blob {path.stat().st_size}\0".encode())
    else:
        return None
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, remote: RemoteFile) -> None:
    size = path.stat().st_size
    if size != remote.size:
        raise PullError(f"{remote.filename}: got {size} bytes, the hub says {remote.size}; pull again.")
    actual = file_digest(path, remote.etag)
    if actual is not None and actual != remote.etag:
        raise PullError(
            f"{remote.filename}: checksum mismatch (got {actual}, the hub says {remote.etag}); "
            "the download was discarded, pull again."
        )


def matches(path: Path, remote: RemoteFile) -> bool:
    """True if `path` is a plain file holding exactly the hub's bytes."""
    return (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size == remote.size
        and file_digest(path, remote.etag) in (remote.etag, None)
    )


def download(remote: RemoteFile, part: Path, watch: Watch) -> None:
    """Append the missing bytes of `remote` to `part` (resuming from its size), then verify."""
    if part.is_symlink():
        part.unlink()  # not ours: downloads are plain files
    resume = resume_size(part)
    if resume > remote.size:
        part.unlink()
        resume = 0
    watch.completed = resume
    if resume == 0 or resume < remote.size:  # else complete already: a pull cut off in a later file kept it
        try:
            _append(remote, part, resume, watch)
        except OSError as exc:
            # A bare OSError without errno is huggingface_hub's "consistency check" (more or fewer
            # bytes than the hub said), not the disk: said as the size mismatch it is.
            if type(exc) is OSError and exc.errno is None:
                verify(part, remote)
            raise
    watch.phase = "verifying"
    verify(part, remote)
    watch.phase = "done"


def _append(remote: RemoteFile, part: Path, resume: int, watch: Watch) -> None:
    # O_NOFOLLOW: the bytes go into this very file, never through a link planted in its place.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if resume else os.O_TRUNC)
    with os.fdopen(os.open(part, flags, 0o644), "wb") as handle:
        handle.seek(resume)
        http_get(
            remote.url,
            handle,
            resume_size=resume,
            headers=remote.headers,
            expected_size=remote.size,
            displayed_filename=remote.filename,
            tqdm_class=functools.partial(_ProgressSink, watch),  # type: ignore[arg-type]
        )


def resumable(exc: BaseException) -> bool:
    """Failures worth keeping the partial file for: the network, or the client leaving."""
    if isinstance(exc, PullCancelled | httpx2.TransportError | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code >= 500


def resume_size(part: Path) -> int:
    """Bytes already downloaded into `part`: 0 when there is no plain file there."""
    try:
        info = part.lstat()
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
