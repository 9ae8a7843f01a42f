"""Small helpers shared by the dialect layers: reading JSON bodies and typed fields with
errors that say what was wrong, and the app-wide state the routes need."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def app_state(request: Request) -> AppState:
    return request.app.state.rkllama


async def json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
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
