"""What the Ollama and OpenAI dialect layers share: typed request bodies, finding and
loading the named model, keep-alive, and holding back streamed text that may be a tool call.

How this meets the native API's single "current model": a dialect request names its
model; if that model is not loaded it is loaded (evicting the least recently used idle
model when --max-loaded-models is reached, default 1), and like any load it becomes the
current model that the native /generate uses.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..errors import BadRequest
from ..loaded_model import LoadedModel
from ..store.names import resolve_model
from ..store.vision import check_vision
from ..toolcalls import ToolCall, may_become_tool_call, parse_tool_calls
from ..types import DoneEvent, TokenEvent, Usage
from .common import AppState, json_object
from .limits import KEEP_ALIVE_MAX_SECONDS, shown

Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`; whatever the Content-Type (curl -d sends a form type)."""
    data = await json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        if first["type"] == "range":  # limits.Range: the message names the range already
            raise BadRequest(f"Invalid request: '{'.'.join(loc)}' {first['msg']}.") from None
        union = next((i for i, part in enumerate(loc) if part in _TYPE_TAGS or "[" in part), None)
        if union is None:
            raise BadRequest(f"Invalid request: '{'.'.join(loc)}': {exc.errors()[0]['msg']}.") from None
        # A field of several accepted types: pydantic complains once per type; say it once.
        where = ".".join(loc[:union])
        raise BadRequest(f"Invalid request: '{where}' has the wrong type: {json.dumps(_value(data, where))}.") from None


def _value(data: Any, where: str) -> Any:
    for part in where.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
    return data


# How pydantic names the members of a union in an error's location (`input.str`, `stop.list[str]`).
_TYPE_TAGS = {"str", "int", "float", "bool"}


# --- loading -------------------------------------------------------------------------
@dataclass
class Target:
    model: LoadedModel
    name: str  # the store name
    load_seconds: float  # 0 when it was loaded already
    started: float  # perf_counter at the start of the request

    def elapsed_ns(self) -> int:
        return int((time.perf_counter() - self.started) * 1e9)


async def load_target(state: AppState, requested: object, num_ctx: int | None = None, images: int = 0) -> Target:
    """Resolve the requested name and make sure that model is loaded.

    A `num_ctx` (bounded by the model's trained context) larger than the loaded context
    reloads the model once its requests in flight are done; a smaller one runs in the loaded
    context, the request trimmed to its own num_ctx (see docs/ollama.md). A request with
    `images` is refused before anything loads if the model cannot see them."""
    started = time.perf_counter()
    entry = resolve_model(state.store, requested)
    check_vision(entry, images)
    scheduler = state.scheduler
    if num_ctx is not None:
        scheduler.context_limits(entry).check_request(num_ctx)
    loaded = scheduler.get_loaded(entry.name)
    model = await scheduler.load(entry.name, {"num_ctx": num_ctx} if num_ctx else None, for_dialect=True)
    fresh = loaded is None or model is not loaded
    return Target(model=model, name=entry.name, load_seconds=model.load_seconds if fresh else 0.0, started=started)


def truncation(usage: Usage) -> dict[str, Any]:
    """The fields a final response carries when the prompt was trimmed to fit (docs/ollama.md)."""
    return {
        "truncated": True,
        "truncated_messages": usage.dropped_messages,
        "truncated_tokens": usage.truncated_tokens,
    }


Event = TypeVar("Event")


async def started(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """Run a generation up to its first event before the response starts, so a failure
    there (a prompt longer than the context, a bad schema) keeps its HTTP status."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[Event]:
        try:
            if first is not None:
                yield first
                async for event in events:
                    yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return chained()


async def collect(events: AsyncIterator[TokenEvent | DoneEvent]) -> tuple[str, DoneEvent | None]:
    """A non-streamed answer: the whole text, and the final event (None if there was none)."""
    parts: list[str] = []
    done: DoneEvent | None = None
    async for event in events:
        if isinstance(event, DoneEvent):
            done = event
        else:
            parts.append(event.text)
    return "".join(parts), done


# --- keep_alive ----------------------------------------------------------------------
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep the model loaded after the request (negative: forever; 0: unload now).

    Ollama accepts a number of seconds or a Go duration ("5m", "1h30m", "-1"). None means
    the request did not say, and the model's current keep-alive is left alone. Over
    KEEP_ALIVE_MAX_SECONDS (ten years) is refused: no clock can show that expiry."""
    seconds = _keep_alive_seconds(value)
    if seconds is not None and not (math.isfinite(seconds) and seconds <= KEEP_ALIVE_MAX_SECONDS):
        if math.isnan(seconds) or seconds > 0:
            raise BadRequest(
                f"Invalid keep_alive {shown(value)}: at most {KEEP_ALIVE_MAX_SECONDS} seconds (10 years); "
                "use -1 to keep the model loaded until it is unloaded."
            )
    return seconds


def _keep_alive_seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        negative = text.startswith("-")
        body = text[1:] if negative else text
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
            return -seconds if negative else seconds
    raise BadRequest(f"Invalid keep_alive {shown(value)}: use seconds (300), a duration ('5m', '1h'), 0 or -1.")


async def apply_keep_alive(state: AppState, name: str, seconds: float | None) -> None:
    """Called once the request is done. Shielded: it also runs when the client went away."""
    if seconds is None:
        return
    with anyio.CancelScope(shield=True):
        if seconds < 0:
            state.scheduler.set_keep_alive(name, None)
        elif seconds == 0:
            model = state.scheduler.get_loaded(name)
            if model is not None and model.busy:
                state.scheduler.set_keep_alive(name, 0)  # as Ollama: unloaded once its requests end
            elif model is not None:
                await state.scheduler.unload(name)
        else:
            state.scheduler.set_keep_alive(name, seconds)


# --- tool calls while streaming ----------------------------------------------------------
class ReplyText:
    """Streams reply text, but holds it back while it may still be a tool call."""

    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self.tools = tools
        self._held = ""
        self._holding = bool(tools)

    def feed(self, text: str) -> str:
        """The text that can be sent now."""
        if not self._holding:
            return text
        self._held += text
        if may_become_tool_call(self._held):
            return ""
        self._holding = False
        out, self._held = self._held, ""
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Text still held back, and the tool calls it held."""
        held, self._held = self._held, ""
        return parse_tool_calls(held, self.tools) if held else ("", [])


# --- thinking ------------------------------------------------------------------------------
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkingSplitter:
    """Splits a reply that opens with `<think>...</think>` into (thinking, content), as text
    streams in. A partial tag at the end of a piece is held back until the next one."""

    def __init__(self) -> None:
        self._state = "start"  # then "thinking" or "content"
        self._held = ""
        self._after_thinking = False

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(THINK_OPEN):
                self._state, self._held = "thinking", head[len(THINK_OPEN) :].lstrip()
            elif not head or THINK_OPEN.startswith(head):
                return "", ""
            else:
                self._state = "content"
        if self._state == "content":
            out, self._held = self._held, ""
            if self._after_thinking:  # the blank lines after </think> are not part of the answer
                out = out.lstrip()
                self._after_thinking = not out
            return "", out
        end = self._held.find(THINK_CLOSE)
        if end >= 0:
            thinking, rest = self._held[:end], self._held[end + len(THINK_CLOSE) :].lstrip()
            self._state, self._held, self._after_thinking = "content", "", not rest
            return thinking, rest
        keep = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if self._held.endswith(THINK_CLOSE[:n])), 0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out, ""

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == "thinking":
            return held, ""
        return "", held.lstrip() if self._after_thinking else held
