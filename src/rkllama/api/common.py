"""Small helpers shared by the dialect layers: reading JSON bodies and typed fields with
errors that say what was wrong, and the app-wide state the routes need."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..errors import BadRequest
from ..scheduler import Scheduler
from ..settings import Settings
from ..store.models_dir import ModelStore


@dataclass
class AppState:
    settings: Settings
    store: ModelStore
    scheduler: Scheduler
    # Version, engines and hardware (system_info.py), for /api/version.
    system: dict[str, Any] = field(default_factory=dict)


def app_state(request: Request) -> AppState:
    return request.app.state.rkllama


# Deeper JSON is refused before anything recursive (pydantic, the runner's JSON, grammars) sees it.
MAX_JSON_DEPTH = 100
# Longer integers mean nothing here, and Python refuses to convert over 4300 digits.
MAX_INT_DIGITS = 100
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise BadRequest(f"holds an integer of {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"holds the number {text[:40]}, too large for a 64-bit float")
    return value


def _constant(text: str) -> float:
    raise BadRequest(f"holds {text}, which is not a JSON number")


_VALID_UNICODE = "strings must be valid Unicode (a surrogate only as half of a pair)"


def _escaped(char: str) -> str:
    return f"\\u{ord(char):04x}"


def _check_tree(data: Any) -> None:
    """Depth and lone surrogates, without recursion (an iterative walk of the parsed value)."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(data, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if found := _SURROGATE.search(value):
                where = f" at '{'.'.join(path)}'" if path else ""
                raise BadRequest(f"holds a lone UTF-16 surrogate {_escaped(found[0])}{where}; {_VALID_UNICODE}")
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise BadRequest(f"is nested deeper than {MAX_JSON_DEPTH} levels")
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        for key, item in reversed(items):  # reversed: the first bad value in the text is the one named
            if isinstance(key, str) and (found := _SURROGATE.search(key)):
                raise BadRequest(f"holds a lone UTF-16 surrogate {_escaped(found[0])} in a key; {_VALID_UNICODE}")
            stack.append((item, depth + 1, (*path, str(key))))


def parse_json(text: str | bytes, what: str = "The request body") -> Any:
    """json.loads with bounds: nesting depth, integer length, finite numbers, valid Unicode.
    Each refusal is a 400 that starts with `what` and says what was wrong."""
    try:
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        _check_tree(data)
    except BadRequest as exc:
        raise BadRequest(f"{what} {exc.message}.") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}.") from None
    return data


async def json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("The request body is empty; send a JSON object.")
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def optional(data: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    """Return data[key] if present and of `kind` (ints accepted as floats), else raise 400."""
    value = data.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise BadRequest(f"'{where}{key}' must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {json.dumps(value)}.")
    return value


def optional_stop(data: dict[str, Any], key: str = "stop", where: str = "") -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest(f"'{where}{key}' must be a string or a list of strings.")
