"""POST /pull of the user's spec: download a model from Hugging Face, streaming plain text.

    Downloading <file> (<size> MB)...
    <progress>%            one line each time the whole percent changes, ending at 100%

A vision model's projector or encoder comes along: `Downloading <file> + <vision file> (<size> MB)...`,
the size and the percentages counting both files (docs/pull.md, "Vision models").

Errors found before the download starts (bad path, repo or file not found, gated repo,
network down, disk too small, name taken) are a 400 with
{"error": "Error during download: <error>"}. Once the 200 has started streaming, a failure
(connection lost, checksum mismatch, disk full) becomes the stream's last line,
`Error during download: <error>`, and no `100%` line is sent: a client knows the pull
succeeded only when it has read `100%`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import RkllamaError
from ..store.pull import PullProgress, pull_model
from ..store.pull_spec import parse_pull_spec
from .common import AppState, app_state, json_object
from .schemas import native as docs

router = APIRouter()

ERROR_PREFIX = "Error during download: "
_MB = 1024 * 1024


def _percent(event: PullProgress) -> int:
    # 100% is only said once the model is in place.
    if event.status == "success":
        return 100
    return min(99, event.completed * 100 // event.total) if event.total else 0


async def _start(events: AsyncIterator[PullProgress]) -> PullProgress:
    """Run the pull until its download starts, so early errors can still be a 400."""
    async for event in events:
        if event.status != "pulling manifest":
            return event
    raise RkllamaError("The pull ended before it started.")


async def _lines(events: AsyncIterator[PullProgress], first: PullProgress) -> AsyncIterator[str]:
    names = " + ".join(first.files or (first.filename,))
    yield f"Downloading {names} ({first.total / _MB:.2f} MB)...\n"
    last: int | None = None
    try:
        event = first
        while True:
            percent = _percent(event)
            if percent != last:
                last = percent
                yield f"{percent}%\n"
            event = await anext(events)
    except StopAsyncIteration:
        pass
    except RkllamaError as exc:
        yield f"{ERROR_PREFIX}{exc.message}\n"
    finally:
        # Closing early (client gone) cancels the download; its partial file is kept to resume.
        await events.aclose()  # type: ignore[attr-defined]


@router.post("/pull", **docs.PULL)
async def pull(request: Request, state: AppState = Depends(app_state)) -> StreamingResponse | JSONResponse:
    events: AsyncIterator[PullProgress] | None = None
    try:
        data = await json_object(request)
        spec = parse_pull_spec(data.get("model"))
        events = pull_model(state.store, spec)
        first = await _start(events)
    except RkllamaError as exc:
        if events is not None:
            await events.aclose()  # type: ignore[attr-defined]
        return JSONResponse({"error": f"{ERROR_PREFIX}{exc.message}"}, status_code=400)
    return StreamingResponse(_lines(events, first), media_type="text/plain")
