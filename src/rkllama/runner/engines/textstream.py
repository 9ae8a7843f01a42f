"""Turn a stream of token bytes into clean text: never split a UTF-8 character, and hold
back text that may be the start of a stop string until it is known not to be one.
Shared by the engines so that every engine stops and decodes the same way."""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: list[str] | None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in (stop or []) if s]
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes | str) -> str:
        """Add a piece; return the text that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        self._held += text
        for stop in self._stops:
            index = self._held.find(stop)
            if index != -1:
                out, self._held = self._held[:index], ""
                self.stopped = True
                return out
        keep = self._longest_stop_prefix_suffix()
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:length]):
                    best = length
                    break
        return best
