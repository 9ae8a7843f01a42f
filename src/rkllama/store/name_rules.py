"""What a model name may be, checked before a name comes near the filesystem.

A store name (a file or folder name in the models directory) is one plain path component:
- at most 255 bytes of UTF-8, the file name limit of Linux file systems;
- no `/`, `\\`, or a character that looks like one (U+2215 DIVISION SLASH, U+FF0F ...);
- no control or invisible formatting characters (NUL, newlines, U+202E ...);
- not hidden: it never starts with `.` (`.digests.json`, the `.pulls` folder and the temporary
  folders of copies are dot-names), so `.` and `..` are refused too;
- its NFKC form obeys the same rules, so look-alikes such as U+2024 ONE DOT LEADER or U+FF0E
  FULLWIDTH FULL STOP cannot stand for `.` (names are checked in that form, never rewritten).
Percent-encoding means nothing here: `%2e%2e` is a name of six characters, never `..`.

Names in messages go through `shown`, so a huge name never floods a reply or the log.
See docs/modelfile.md ("Model names").
"""

from __future__ import annotations

import unicodedata

from ..errors import BadRequest

MAX_NAME_BYTES = 255
LATEST = ":latest"
# How much of a name messages repeat.
SHOWN_CHARS = 64
# Slash look-alikes that NFKC leaves alone.
SLASH_LOOKALIKES = frozenset("\u2215\u2044\u2216\u29f5\u29f8\u29f9\ufe68")
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}


def shown(name: str) -> str:
    """`name` quoted for a message, cut to SHOWN_CHARS characters."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name)} characters)"


def name_problem(name: str, allow_slash: bool = False) -> str | None:
    """Why `name` cannot name a model, or None if it can."""
    if not name.strip():
        return "it is empty"
    # The character count first: a 1 MB name is refused without encoding it.
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    for form in (name, unicodedata.normalize("NFKC", name)):
        if any(unicodedata.category(char) in _INVISIBLE for char in form):
            return "it contains a control or invisible character"
        separators = ("\\", *SLASH_LOOKALIKES) if allow_slash else ("/", "\\", *SLASH_LOOKALIKES)
        if any(sep in form for sep in separators):
            return "a model name is one file or folder name: no '/', '\\' or look-alikes of them"
        # A dialect name with a '/' never matches a listed name: not found, rather than "hidden".
        if form.startswith(".") and not (allow_slash and "/" in form):
            return "names starting with '.' are hidden files of the models directory, never models"
    return None


def check_store_name(name: object, what: str = "model name") -> str:
    """`name` if it can be a file or folder name in the models directory, else a 400."""
    if not isinstance(name, str):
        raise BadRequest(f"The {what} must be a string.")
    problem = name_problem(name)
    if problem is not None:
        raise BadRequest(f"Invalid {what} {shown(name)}: {problem}.")
    return name


def check_requested_name(name: str) -> str:
    """A dialect's model name (`family:tag`), refused only when it can never name a model.

    A `/` is let through: Ollama names like `library/x` or `hf.co/user/repo` are
    well-formed, and simply not found, since no listed name holds one."""
    base = name.removesuffix(LATEST)
    problem = name_problem(base or name, allow_slash=True)
    if problem is not None:
        raise BadRequest(f"Invalid model name {shown(name)}: {problem}.")
    return name
