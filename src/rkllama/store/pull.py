"""Model pulls from Hugging Face.

Interface used by the dialect layers:
    parse_pull_spec("hf/user/repo/file.gguf[+mmproj.gguf]")   # in pull_spec.py -> PullSpec
    async for progress in pull_model(store, spec): ...        # PullProgress events
Failures raise PullError, whose message is shown as "Error during download: <message>".

Where a pulled model goes: a folder named after the file's stem (`file.gguf` -> `file/`) holding
the file and a Modelfile with FROM="<file>" and HUGGINGFACE_PATH="<user/repo>". A vision model's
projector (`MMPROJ`) or `.rknn` encoder (`VISION_ENCODER`) comes along (pull_companions.py says
which), and `.rkllm` models get the repo's tokenizer files too (best effort).

Nothing half-done is visible: bytes go to `<models>/.pulls/<name>.<etag>[.vision].part` (a dot-dir,
never listed), each file is checked against the hub's size and sha256, and only when all are the
finished folder is renamed into place in one step. A pull cut off by the network (or by the
client going away) keeps its `.part` files and resumes from them on the next try; any other
failure deletes them all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest
from .hub_files import RemoteFile, explain, fetch_metadata
from .inside import is_inside, write_text_inside
from .modelfile import MODELFILE_NAME, Modelfile, read_modelfile
from .models_dir import ModelStore
from .pull_companions import Companion, fetch_tokenizer_files, resolve_vision
from .pull_download import PullCancelled, Watch, download, matches, resumable, resume_size
from .pull_ref import PullError, PullRef
from .pull_spec import PullSpec

STAGING_DIR = ".pulls"
_POLL_SECONDS = 0.2
_VISION_PART = ".vision"


@dataclass
class PullProgress:
    status: str  # "pulling manifest" | "downloading" | "verifying sha256 digest" | "success"
    filename: str  # the file being downloaded (the model's on "pulling manifest" and "success")
    total: int = 0  # bytes of the whole pull: the model and its vision file
    completed: int = 0
    model_name: str | None = None  # set on "success": the name the model is listed under
    files: tuple[str, ...] = ()  # every file of the pull, the model first
    file_total: int = 0  # bytes of `filename` alone
    file_completed: int = 0


@dataclass
class _File:
    """One file of a pull: its bytes on the hub, its partial download, its name in the folder."""

    remote: RemoteFile
    name: str
    part: Path
    watch: Watch


@dataclass
class _Plan:
    """What one pull fetches, the model first; read by the event loop while a thread downloads."""

    ref: PullRef
    files: list[_File]
    vision_key: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return sum(f.remote.size for f in self.files)

    @property
    def completed(self) -> int:
        return sum(min(f.watch.completed, f.remote.size) for f in self.files)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.remote.filename for f in self.files)

    @property
    def vision(self) -> _File | None:
        return self.files[1] if self.vision_key else None

    def current(self) -> int:
        """The index of the file being downloaded or verified; len(files) once all are (installing)."""
        return next((i for i, f in enumerate(self.files) if f.watch.phase != "done"), len(self.files))

    def progress(self, status: str, model_name: str | None = None, index: int | None = None) -> PullProgress:
        if index is None:
            index = 0 if status in ("pulling manifest", "success") else min(self.current(), len(self.files) - 1)
        shown = self.files[index]
        return PullProgress(
            status,
            shown.remote.filename,
            total=self.total,
            completed=self.total if status == "success" else self.completed,
            model_name=model_name,
            files=self.names,
            file_total=shown.remote.size,
            file_completed=min(shown.watch.completed, shown.remote.size),
        )


def _make_plan(store: ModelStore, ref: PullRef, remote: RemoteFile, vision: Companion | None) -> _Plan:
    cancel = threading.Event()

    def planned(remote: RemoteFile, name: str, tail: str) -> _File:
        part = store.root / STAGING_DIR / f"{ref.model_name}.{_etag_key(remote.etag)}{tail}.part"
        watch = Watch(total=remote.size, completed=min(resume_size(part), remote.size), cancel=cancel)
        return _File(remote, name, part, watch)

    files = [planned(remote, ref.basename, "")]
    if vision is not None:
        files.append(planned(vision.remote, vision.name, _VISION_PART))
    return _Plan(ref, files, vision.key if vision else None, cancel)


# --- the folder -----------------------------------------------------------------------------


def _write_modelfile(folder: Path, plan: _Plan, root: Path) -> None:
    """FROM, HUGGINGFACE_PATH and the vision key record the origin; other keys a user set are kept."""
    existing = read_modelfile(folder / MODELFILE_NAME, root)
    values = {"FROM": plan.ref.basename, "HUGGINGFACE_PATH": plan.ref.repo_id}
    if plan.vision is not None and plan.vision_key is not None:
        values[plan.vision_key] = plan.vision.name
    values.update({k: v for k, v in existing.values.items() if k not in values})
    write_text_inside(folder / MODELFILE_NAME, Modelfile(values).render())


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


def _install(store: ModelStore, plan: _Plan, fetched: list[_File]) -> None:
    """Move the verified files into place: a new folder appears in one rename."""
    target = store.root / plan.ref.model_name
    if target.is_dir():
        # Both files were verified before either moves; each replaces its old copy in one rename.
        for f in fetched:
            f.part.replace(target / f.name)
        _write_modelfile(target, plan, store.root)
        return
    build = store.root / STAGING_DIR / f"{plan.ref.model_name}.build"
    _remove(build)
    build.mkdir()
    try:
        for f in fetched:
            f.part.replace(build / f.name)
        _write_modelfile(build, plan, store.root)
        if plan.ref.basename.lower().endswith(".rkllm"):
            fetch_tokenizer_files(plan.ref, build)
        build.rename(target)
    except BaseException:
        _remove(build)
        raise


def _remove(path: Path) -> None:
    """Whatever is at `path`: a folder with its contents, or a file or link (never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _installed(store: ModelStore, plan: _Plan, f: _File) -> bool:
    installed = store.root / plan.ref.model_name / f.name
    return is_inside(installed, store.root) and matches(installed, f.remote)


# --- the worker thread ----------------------------------------------------------------------


def _pull_blocking(store: ModelStore, plan: _Plan) -> None:
    ref = plan.ref
    registry = store.pulls
    check_staging(store)
    with registry.target_lock(ref.model_name), registry.staging(store.root / STAGING_DIR) as staging:
        check_target(store, ref)
        fetched = []
        for f in plan.files:
            if _installed(store, plan, f):
                f.watch.completed, f.watch.phase = f.remote.size, "done"
            else:
                fetched.append(f)
        if not fetched:
            if plan.vision is not None:  # e.g. a projector pulled before: name it in the Modelfile
                _write_modelfile(store.root / ref.model_name, plan, store.root)
            return
        _drop_stale_parts(staging, ref, keep={f.part for f in plan.files})
        try:
            check_disk_space(store, plan)
            for f in fetched:
                download(f.remote, f.part, f.watch)
            _install(store, plan, fetched)
        except BaseException as exc:
            if not resumable(exc):
                for f in fetched:
                    f.part.unlink(missing_ok=True)
            if isinstance(exc, PullError):
                raise
            if isinstance(exc, PullCancelled):
                raise PullError(f"The pull of {ref.basename} was cancelled; pull again to resume.") from None
            message = explain(exc, ref, store.root)
            if resumable(exc):
                message += " Pull again to resume the download."
            raise PullError(message) from None


def check_disk_space(store: ModelStore, plan: _Plan) -> None:
    missing = sum(f.remote.size - resume_size(f.part) for f in plan.files)
    free = shutil.disk_usage(store.root).free
    if missing > free:
        raise PullError(
            f"Not enough disk space for {' + '.join(f.name for f in plan.files)}: {missing / 1e6:.0f} MB needed, "
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


def _etag_key(etag: str) -> str:
    # The etag in the part's name: a file changed upstream never resumes onto old bytes.
    return etag[:16] if re.fullmatch(r"[0-9a-f]{16}", etag[:16]) else hashlib.sha256(etag.encode()).hexdigest()[:16]


def _drop_stale_parts(staging: Path, ref: PullRef, keep: set[Path]) -> None:
    """Partial downloads of an older version of this model's files can never be resumed."""
    stale = re.compile(re.escape(ref.model_name) + r"\.[0-9a-f]{16}(?:" + re.escape(_VISION_PART) + r")?\.part")
    for path in staging.iterdir():
        if path not in keep and stale.fullmatch(path.name):
            path.unlink(missing_ok=True)


# --- the async face -------------------------------------------------------------------------


async def pull_model(store: ModelStore, spec: PullSpec) -> AsyncIterator[PullProgress]:
    """Pull `spec` (the model and its vision file) into `store`, yielding progress while a
    worker thread downloads.

    Errors found before any byte is written (repo or file not found, gated, network down,
    name taken, disk too small) raise PullError before the first event. Closing the
    iterator early cancels the download and keeps its partial files for the next try."""
    ref = spec.ref
    store.ensure_exists()
    remote = await asyncio.to_thread(fetch_metadata, ref)
    vision = await asyncio.to_thread(resolve_vision, spec)
    check_staging(store)
    check_target(store, ref)
    plan = _make_plan(store, ref, remote, vision)
    check_disk_space(store, plan)
    # Only now: a caller awaiting the first event gets every early error as an exception.
    yield plan.progress("pulling manifest")
    # Said before the thread starts, so the first progress is where the download resumes.
    yield plan.progress("downloading")
    registry = store.pulls
    registry.begin(ref.model_name)
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(None, _pull_blocking, store, plan)
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
        last = ("downloading", plan.completed, plan.names[0])
        named = 0  # files[: named + 1] were named by a "downloading" event (the model by the first)
        while True:
            now = plan.current()
            for skipped in range(named + 1, now):  # done between two looks: each file is named once
                yield plan.progress("downloading", index=skipped)
            downloading = now < len(plan.files) and plan.files[now].watch.phase == "downloading"
            status = "downloading" if downloading else "verifying sha256 digest"
            named = max(named, now if downloading else now - 1)
            event = plan.progress(status)
            if (status, event.completed, event.filename) != last:
                last = (status, event.completed, event.filename)
                yield event
            if future.done():
                break
            await asyncio.wait({future}, timeout=_POLL_SECONDS)
        future.result()
        yield plan.progress("success", model_name=ref.model_name)
    finally:
        if not future.done():
            plan.cancel.set()
