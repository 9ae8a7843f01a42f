"""Files of the models directory, opened only when they really are inside it.

A symlink in the models directory may point to another place inside it; one that leads
outside is refused, so a planted link never makes the server read, list, load, write or
delete anything elsewhere. The check resolves every link (realpath), then opens the
resolved path with O_NOFOLLOW, so a link swapped in after the check is refused too.
Messages name files relative to the models directory, never by absolute path.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from ..errors import BadRequest

# A Modelfile or digest cache is small; a bigger one is not ours to read whole.
MAX_TEXT_BYTES = 1024 * 1024


class OutsideModelsDir(BadRequest):
    """A name or link that leads outside the models directory."""


def relative(path: Path, root: Path) -> str:
    """`path` as messages show it: relative to the models directory when it is inside."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def is_inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def resolve_inside(path: Path, root: Path) -> Path:
    """`path` with its links resolved, or OutsideModelsDir when that is not inside `root`."""
    if not is_inside(path, root):
        raise OutsideModelsDir(
            f"{relative(path, root)} points outside the models directory; "
            "RKLLama only uses files inside it (remove the link, or move the file in)."
        )
    return Path(os.path.realpath(path))


def read_text_inside(path: Path, root: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The text of a regular file inside `root`; FileNotFoundError when there is none."""
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    real = resolve_inside(path, root)
    # O_NONBLOCK: a FIFO planted under a file's name must not hang the server.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(f"{relative(path, root)} is not a regular file.")
        if info.st_size > limit:
            raise BadRequest(f"{relative(path, root)} is larger than {limit // 1024} KiB; it cannot be a Modelfile.")
        data = handle.read(limit + 1)
    return data.decode("utf-8")


def write_text_inside(path: Path, text: str) -> None:
    """Replace `path` with `text` through a fresh temp file and a rename: never through a link."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def describe_os_error(exc: OSError, root: Path | None) -> str:
    """An OSError's message with its file named relative to the models directory."""
    reason = exc.strerror or type(exc).__name__
    if exc.filename is None:
        return reason
    name = Path(os.fsdecode(exc.filename))
    return f"{reason}: {relative(name, root) if root is not None else name.name}"
