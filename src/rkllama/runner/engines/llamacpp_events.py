"""From sampled token ids to the engine's events: text pieces, then one DoneEvent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace

from ...types import DoneEvent, TokenEvent, Usage
from .textstream import TextAssembler


def no_tokens() -> Generator[int, None, str]:
    return "length"
    yield  # pragma: no cover - makes this a generator


def text_events(
    source: Generator[int, None, str],
    detokenize: Callable[[list[int]], bytes],
    stop: list[str] | None,
    cancel: threading.Event,
    usage: Usage,
    started: float,
) -> Iterator[TokenEvent | DoneEvent]:
    """Turn sampled tokens into text events, whichever path sampled them. The source
    returns its finish reason (and fills in `usage.cached_tokens`); a cancel or a stop string
    ends it early."""
    assembler = TextAssembler(stop)
    generated = 0
    first_token_at: float | None = None
    finish = "length"
    try:
        while True:
            try:
                token = next(source)
            except StopIteration as end:
                finish = end.value
                break
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if cancel.is_set():
                finish = "cancelled"
                break
            generated += 1
            piece = assembler.feed(detokenize([token]))
            if piece:
                yield TokenEvent(piece)
            if assembler.stopped:
                finish = "stop"
                break
    finally:
        source.close()
    yield from _finish(assembler, finish, usage, generated, started, first_token_at)


def _finish(
    assembler: TextAssembler,
    finish: str,
    usage: Usage,
    generated: int,
    started: float,
    first_token_at: float | None,
) -> Iterator[TokenEvent | DoneEvent]:
    """The held-back tail of the text, then the DoneEvent with the request's usage."""
    tail = assembler.flush()
    if tail:
        yield TokenEvent(tail)
    ended = time.perf_counter()
    first_token_at = first_token_at or ended
    usage = replace(
        usage,
        completion_tokens=generated,
        prompt_ms=(first_token_at - started) * 1000,
        generate_ms=(ended - first_token_at) * 1000,
    )
    yield DoneEvent(finish_reason=finish, usage=usage)  # type: ignore[arg-type]
