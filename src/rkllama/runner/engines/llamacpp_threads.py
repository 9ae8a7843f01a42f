"""How many threads a generating step uses, chosen by measured speed.

Generating steps are small: a few hundred operations on a few tokens, each ended by a barrier
where llama.cpp's threads meet. Whether a second thread pays depends on the machine, not on the
model: with the runner's brief OpenMP wait (docs/performance.md) a thread that reaches a barrier
first sleeps, and waking it is cheap on some machines and costly on others (measured on a 2-core
VM whose idle cores wake slowly: 16 tok/s with 2 threads, 48 with 1; on another VM 2 threads were
at par with llama-server). And beside a busy process two spinning threads lose to one, which
has no barriers (measured: 19-24 tok/s against 48-52). So the decode thread measures: it runs
with its configured threads, now and then times a step with the other count, and keeps the
faster. Probes that lose come ever more rarely (up to every 512 steps), so a wrong probe costs
little; a step far slower than usual (a busy neighbour arrived) brings the next probe at once.
Prompt chunks use the count generating steps use: one thread only when two were slower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import llama_cpp

log = logging.getLogger(__name__)

FIRST_PROBE = 16  # steps before the first probe, and after a switch
LONGEST_INTERVAL = 512
PROBE_STEPS = 2  # the probe's first step warms up; its last is the one timed
SWITCH_GAIN = 0.9  # the other count must take at most this share of the current one's time
SMOOTHING = 0.2
SLOWDOWN = 3.0  # a step this many times slower than usual probes the other count at once


class StepThreads:
    def __init__(self, n_threads: int) -> None:
        self.configured = n_threads
        self.current = n_threads
        self._other = 1 if n_threads > 1 else n_threads
        self._interval = FIRST_PROBE
        self._until_probe = FIRST_PROBE
        self._probe_left = 0
        self._seconds: dict[tuple[int, int], float] = {}  # (threads, sequences) -> smoothed step time

    def run(self, ctx: llama_cpp.llama_context_p, sequences: int, step: Callable[[], None]) -> None:
        """Run a generating step of `sequences` tokens with the chosen threads, and time it."""
        threads = self.for_step()
        started = time.perf_counter()
        self._with_threads(ctx, threads, step)
        self.record(threads, sequences, time.perf_counter() - started)

    def run_chunk(self, ctx: llama_cpp.llama_context_p, chunk: Callable[[], None]) -> None:
        """Run a prompt chunk with the thread count generating steps use."""
        self._with_threads(ctx, self.current, chunk)

    def _with_threads(self, ctx: llama_cpp.llama_context_p, threads: int, work: Callable[[], None]) -> None:
        """Run `work` with `threads`; the context keeps the configured count otherwise."""
        if threads == self.configured:
            work()
            return
        llama_cpp.llama_set_n_threads(ctx, threads, threads)
        try:
            work()
        finally:
            llama_cpp.llama_set_n_threads(ctx, self.configured, self.configured)

    def for_step(self) -> int:
        """Threads for the next generating step."""
        if self.configured == 1:
            return 1
        if self._probe_left == 0 and self._until_probe <= 0:
            self._probe_left = PROBE_STEPS
        return self._other if self._probe_left > 0 else self.current

    def record(self, threads: int, sequences: int, seconds: float) -> None:
        """A generating step of `sequences` tokens took `seconds` with `threads`."""
        if self.configured == 1:
            return
        if self._probe_left > 0 and threads == self._other:
            self._probe_left -= 1
            if self._probe_left == 0:
                self._decide(sequences, seconds)
            return
        self._until_probe -= 1
        key = (threads, sequences)
        before = self._seconds.get(key)
        if before is None or seconds > SLOWDOWN * before:
            # The machine changed (or this is the first such step): compare the probe with now.
            self._seconds[key] = seconds
            self._until_probe = 0 if before is not None else self._until_probe
            return
        self._seconds[key] = before + SMOOTHING * (seconds - before)

    def _decide(self, sequences: int, probe_seconds: float) -> None:
        usual = self._seconds.get((self.current, sequences))
        if usual is not None and probe_seconds < SWITCH_GAIN * usual:
            log.info(
                "Generating steps of %d sequences: %d threads took %.1f ms, %d took %.1f ms; using %d",
                sequences,
                self._other,
                probe_seconds * 1000,
                self.current,
                usual * 1000,
                self._other,
            )
            self.current, self._other = self._other, self.current
            self._seconds[(self.current, sequences)] = probe_seconds
            self._interval = FIRST_PROBE
        else:
            self._interval = min(self._interval * 2, LONGEST_INTERVAL)
        self._until_probe = self._interval
