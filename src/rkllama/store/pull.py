"""Model pulls from Hugging Face.

Interface used by the dialect layers:
    parse_pull_ref("hf/user/repo/file.gguf")   # in pull_ref.py -> PullRef(repo_id="user/repo", filename="file.gguf")
    async for progress in pull_model(store, ref): ...   # PullProgress events
Failures raise PullError, whose message is shown as "Error during download: <message>".

Where a pulled model goes: a folder named after the file's stem (`file.gguf` -> `file/`) holding
the file and a Modelfile with FROM="<file>" and HUGGINGFACE_PATH="<user/repo>". For `.rkllm`
files the repo's tokenizer files are fetched into the folder too (best effort), so the rkllm
engine works offline.

Nothing half-done is visible: bytes go to `<models>/.pulls/<name>.<etag>.part` (a dot-dir, never
listed), are checked against the hub's size and sha256, and the finished folder is renamed into
place in one step. A pull cut off by the network (or by the client going away) keeps its `.part`
file and resumes from it on the next try; any other failure deletes it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile

from ..errors import BadRequest
from .hub_files import RemoteFile, explain, fetch_metadata
from .inside import is_inside, write_text_inside
from .modelfile import MODELFILE_NAME, Modelfile, read_modelfile
from .models_dir import ModelStore
from .pull_ref import PullError, PullRef

log = logging.getLogger(__name__)

STAGING_DIR = ".pulls"
# Files the rkllm engine reads next to the model (tokenizer and chat template; see rkllm_prompt.py).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
# 1 MB reads instead of the library's 10 MB, so progress advances smoothly and memory stays low.
constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024
_POLL_SECONDS = 0.2
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


class _PullCancelled(Exception):
    """Raised in the download thread when the client went away."""


@dataclass
class PullProgress:
    status: str  # "pulling manifest" | "downloading" | "verifying sha256 digest" | "success"
    filename: str
    total: int = 0
    completed: int = 0
    model_name: str | None = None  # set on "success": the name the model is listed under


# --- downloading in a worker thread ---------------------------------------------------------


@dataclass
class _Watch:
    """Shared between the download thread (writer) and the event loop (reader)."""

    total: int
    completed: int = 0
    phase: str = "downloading"
    cancel: threading.Event = field(default_factory=threading.Event)


class _ProgressSink:
    """Stands in for tqdm in `http_get`: counts bytes, and stops the download on cancel."""

    def __init__(self, watch: _Watch, initial: int = 0, **_: object) -> None:
        self.watch = watch
        watch.completed = initial

    def __enter__(self) -> _ProgressSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        self.watch.completed += int(n)
        if self.watch.cancel.is_set():
            raise _PullCancelled()


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


def _verify(path: Path, remote: RemoteFile) -> None:
    size = path.stat().st_size
    if size != remote.size:
        raise PullError(f"{remote.filename}: got {size} bytes, the hub says {remote.size}; pull again.")
    actual = file_digest(path, remote.etag)
    if actual is not None and actual != remote.etag:
        raise PullError(
            f"{remote.filename}: checksum mismatch (got {actual}, the hub says {remote.etag}); "
            "the download was discarded, pull again."
        )


def _download(remote: RemoteFile, part: Path, watch: _Watch) -> None:
    """Append the missing bytes of `remote` to `part` (resuming from its size), then verify."""
    if part.is_symlink():
        part.unlink()  # not ours: downloads are plain files
    resume = _resume_size(part)
    if resume > remote.size:
        part.unlink()
        resume = 0
    watch.completed = resume
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
    watch.phase = "verifying"
    _verify(part, remote)


def _resumable(exc: BaseException) -> bool:
    """Failures worth keeping the partial file for: the network, or the client leaving."""
    if isinstance(exc, _PullCancelled | httpx2.TransportError | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code >= 500


def _write_modelfile(folder: Path, ref: PullRef, root: Path) -> None:
    """FROM and HUGGINGFACE_PATH record the origin; other keys a user set are kept on update."""
    existing = read_modelfile(folder / MODELFILE_NAME, root)
    values = {"FROM": ref.basename, "HUGGINGFACE_PATH": ref.repo_id}
    values.update({k: v for k, v in existing.values.items() if k not in values})
    write_text_inside(folder / MODELFILE_NAME, Modelfile(values).render())


def _fetch_tokenizer_files(ref: PullRef, folder: Path) -> None:
    """Best effort: a repo without tokenizer files, or a failure here, only logs a warning."""
    try:
        infos = HfApi().get_paths_info(ref.repo_id, list(TOKENIZER_FILES))
    except Exception as exc:
        log.warning("No tokenizer files for %s: %s", ref.repo_id, explain(exc, ref))
        return
    for info in infos:
        if not isinstance(info, RepoFile):
            continue
        try:
            remote = fetch_metadata(ref, info.path)
            part = folder / f".{Path(info.path).name}.part"
            _download(remote, part, _Watch(total=remote.size))
            part.replace(folder / Path(info.path).name)
        except Exception as exc:
            log.warning("Could not fetch %s from %s: %s", info.path, ref.repo_id, exc)
            (folder / f".{Path(info.path).name}.part").unlink(missing_ok=True)


def _owned_by(folder: Path, ref: PullRef, root: Path) -> bool:
    try:
        modelfile = read_modelfile(folder / MODELFILE_NAME, root)
    except BadRequest:  # an unreadable Modelfile: not provably ours, so never overwritten
        return False
    return modelfile.get("HUGGINGFACE_PATH") == ref.repo_id and modelfile.get("FROM") in (None, "", ref.basename)


def check_target(store: ModelStore, ref: PullRef) -> None:
    """Refuse to overwrite a model of the same name that came from somewhere else."""
    target = store.root / ref.model_name
    if target.is_symlink() or target.is_file() or (target.is_dir() and not _owned_by(target, ref, store.root)):
        raise PullError(
            f"A model named {ref.model_name} already exists and did not come from {ref.repo_id}/{ref.basename}: "
            f"remove it first (rkllama rm {ref.model_name})."
        )


def _install(store: ModelStore, ref: PullRef, part: Path) -> None:
    """Move the verified file into place: a new folder appears in one rename."""
    target = store.root / ref.model_name
    if target.is_dir():
        part.replace(target / ref.basename)
        _write_modelfile(target, ref, store.root)
        return
    build = part.with_name(f"{ref.model_name}.build")
    _remove(build)
    build.mkdir()
    part.replace(build / ref.basename)
    _write_modelfile(build, ref, store.root)
    if ref.basename.lower().endswith(".rkllm"):
        _fetch_tokenizer_files(ref, build)
    build.rename(target)


def _remove(path: Path) -> None:
    """Whatever is at `path`: a folder with its contents, or a file or link (never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _up_to_date(store: ModelStore, ref: PullRef, remote: RemoteFile) -> bool:
    installed = store.root / ref.model_name / ref.basename
    return (
        is_inside(installed, store.root)
        and installed.is_file()
        and installed.stat().st_size == remote.size
        and file_digest(installed, remote.etag) in (remote.etag, None)
    )


def _pull_blocking(store: ModelStore, ref: PullRef, remote: RemoteFile, watch: _Watch) -> None:
    registry = store.pulls
    check_staging(store)
    with registry.target_lock(ref.model_name), registry.staging(store.root / STAGING_DIR) as staging:
        check_target(store, ref)
        if _up_to_date(store, ref, remote):
            watch.completed = remote.size
            return
        part = _part_path(store, ref, remote)
        _drop_stale_parts(staging, ref, keep=part)
        try:
            check_disk_space(store, ref, remote)
            _download(remote, part, watch)
            watch.phase = "installing"
            _install(store, ref, part)
        except BaseException as exc:
            if not _resumable(exc):
                part.unlink(missing_ok=True)
            if isinstance(exc, PullError):
                raise
            if isinstance(exc, _PullCancelled):
                raise PullError(f"The pull of {ref.basename} was cancelled; pull again to resume.") from None
            message = explain(exc, ref, store.root)
            if _resumable(exc):
                message += " Pull again to resume the download."
            raise PullError(message) from None


def check_disk_space(store: ModelStore, ref: PullRef, remote: RemoteFile) -> None:
    part = _part_path(store, ref, remote)
    missing = remote.size - _resume_size(part)
    free = shutil.disk_usage(store.root).free
    if missing > free:
        raise PullError(
            f"Not enough disk space for {ref.basename}: {missing / 1e6:.0f} MB needed, "
            f"{free / 1e6:.0f} MB free in the models directory. Free some space (e.g. rkllama rm <model>) "
            "and pull again."
        )


def check_staging(store: ModelStore) -> None:
    """Downloads go into <models>/.pulls: a folder of ours, never a link to elsewhere."""
    staging = store.root / STAGING_DIR
    if os.path.lexists(staging) and (staging.is_symlink() or not staging.is_dir()):
        raise PullError(
            f"{STAGING_DIR} in the models directory is not a folder (or is a link); "
            "RKLLama keeps its partial downloads there: remove it and pull again."
        )


def _part_path(store: ModelStore, ref: PullRef, remote: RemoteFile) -> Path:
    # The etag in the name: a file changed upstream never resumes onto old bytes.
    key = remote.etag[:16] if re.fullmatch(r"[0-9a-f]{16}", remote.etag[:16]) else _sha256_text(remote.etag)[:16]
    return store.root / STAGING_DIR / f"{ref.model_name}.{key}.part"


def _resume_size(part: Path) -> int:
    """Bytes already downloaded into `part`: 0 when there is no plain file there."""
    try:
        info = part.lstat()
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _drop_stale_parts(staging: Path, ref: PullRef, keep: Path) -> None:
    """Partial downloads of an older version of this file can never be resumed."""
    stale = re.compile(re.escape(ref.model_name) + r"\.[0-9a-f]{16}\.part")
    for path in staging.iterdir():
        if path != keep and stale.fullmatch(path.name):
            path.unlink(missing_ok=True)


# --- the async face -------------------------------------------------------------------------


async def pull_model(store: ModelStore, ref: PullRef) -> AsyncIterator[PullProgress]:
    """Pull `ref` into `store`, yielding progress while a worker thread downloads.

    Errors found before any byte is written (repo or file not found, gated, network down,
    name taken, disk too small) raise PullError before the first event. Closing the
    iterator early cancels the download and keeps its partial file for the next try."""
    store.ensure_exists()
    remote = await asyncio.to_thread(fetch_metadata, ref)
    check_staging(store)
    check_target(store, ref)
    check_disk_space(store, ref, remote)
    # Only now: a caller awaiting the first event gets every early error as an exception.
    yield PullProgress("pulling manifest", ref.filename, total=remote.size)
    part = _part_path(store, ref, remote)
    watch = _Watch(total=remote.size, completed=_resume_size(part))
    # Said before the thread starts, so the first progress is where the download resumes.
    yield PullProgress("downloading", ref.filename, total=remote.size, completed=min(watch.completed, remote.size))
    registry = store.pulls
    registry.begin(ref.model_name)
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(None, _pull_blocking, store, ref, remote, watch)
    except BaseException:
        registry.end(ref.model_name)
        raise

    def finished(done: asyncio.Future[None]) -> None:
        # The thread, not this generator, ends the "being pulled" mark: it may outlive a cancelled client.
        registry.end(ref.model_name)
        if not done.cancelled():
            done.exception()  # retrieved, so a pull whose client left ends without a warning

    future.add_done_callback(finished)
    try:
        last: tuple[str, int] | None = ("downloading", watch.completed)
        while True:
            status = "verifying sha256 digest" if watch.phase != "downloading" else "downloading"
            if (status, watch.completed) != last:
                last = (status, watch.completed)
                yield PullProgress(status, ref.filename, total=remote.size, completed=min(watch.completed, remote.size))
            if future.done():
                break
            await asyncio.wait({future}, timeout=_POLL_SECONDS)
        future.result()
        yield PullProgress("success", ref.filename, total=remote.size, completed=remote.size, model_name=ref.model_name)
    finally:
        if not future.done():
            watch.cancel.set()
