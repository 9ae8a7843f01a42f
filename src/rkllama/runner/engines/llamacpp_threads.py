"""How many threads a generating step uses, chosen by measured speed.

Generating steps are small: a few hundred operations on a few tokens, each ended by a barrier
where llama.cpp's threads meet. Whether a second thread pays depends on the machine and on
what else runs, not on the model: on a quiet machine two spinning threads decode ~2x faster
than one; beside one or two busy processes a thread that waits at a barrier for a partner the
kernel has descheduled wastes its core, and one thread (no barriers) wins (measured here: 85
tok/s against 13-45 with two threads beside one busy process). So the decode thread measures:
it runs with the configured threads, now and then runs a few steps with the other count, and
keeps the faster.

Under contention two-thread steps are bimodal (most take 10-30 ms, some over a second), so one
lucky or unlucky step proves nothing. Steps are compared by their mean over a window, a probe
ends early when its steps so far are clearly slower than usual (a lost probe costs a few
steps), and probes that lose come ever more rarely (up to every 512 steps). A step far slower
than the recent mean, or a recent mean well off the one measured after the last probe (a busy
neighbour arrived or left), brings the next probe at once.

The first step after a prompt chunk or an idle spell is not timed: it is often several times
slower than the steps that follow (threads waking, the client and server busy with the previous
answer), and requests of a token or two would otherwise fill the window with such steps and make
one thread look faster (measured: after six two-token requests the next long answer ran on one
thread at 55 tok/s, against 94 with this rule).

Each number of sequences in a step has its own choice: beside a busy process one thread may
win for one sequence and lose by 2x for four (measured under open-loop load: four-sequence
steps on one thread took 116 ms against 51 on two, while the choice made for single-sequence
steps held them there for 15 s).

Prompt chunks use the count of the latest generating step. After an idle spell that count may
be stale: a prompt right after a busy neighbour started runs on two spinning threads (2.4-3.2 s
for a short one on the test VM). Asking the kernel first (/proc/loadavg) was tried and dropped:
the threads of another process that ran a moment before counted as busy, and quiet prompts then
ran on one thread (+80 ms to the first token; bench/RESULTS.md, 2026-12-07).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable

import llama_cpp

log = logging.getLogger(__name__)

FIRST_PROBE = 16  # steps before the first probe
LONGEST_INTERVAL = 512
# With fewer threads than configured, nothing in the steps' times shows that the neighbour has
# gone (one thread is as fast then as before), so probes keep coming at least this often.
LONGEST_INTERVAL_REDUCED = 128
PROBE_STEPS = 6  # timed probe steps, after one warm-up step (it may wake a sleeping thread)
WINDOW = 16  # recent steps of the current count whose mean is "usual"
SWITCH_GAIN = 0.9  # the probe's mean must be at most this share of the usual mean
# A probe loses at once when the mean of its steps so far (two or more) is this much slower
# than usual, or when one step is SLOWDOWN times slower: a lost probe costs a few steps.
ABORT_FACTOR = 1.5
# The warm-up step wakes threads that slept through the steps with fewer (measured: 3-10x a
# usual step on a quiet VM whose idle cores wake slowly); only a step slower still ends it.
WARM_UP_LIMIT = 20.0
SLOWDOWN = 3.0  # a step this much slower than usual probes the other count at once
# The recent mean this much slower or faster than when the count was last confirmed probes at
# once too: beside one busy process two-thread steps may be steadily 2x slower, never 3x.
DRIFT = 1.5
IDLE_SPELL = 0.05  # seconds without a step or chunk after which the next step is not timed


class StepThreads:
    """The threads of each generating step, chosen per number of sequences in the step."""

    def __init__(self, n_threads: int) -> None:
        self.configured = n_threads
        self._choices: dict[int, ThreadChoice] = {}  # sequences in a step -> its choice
        self._latest = 1  # sequences in the latest generating step
        self._last_end: float | None = None  # when the last step or chunk ended
        self._after_chunk = False

    @property
    def current(self) -> int:
        """Threads chosen for steps like the latest one (prompt chunks use them too)."""
        return self.choice(self._latest).current

    def choice(self, sequences: int) -> ThreadChoice:
        if sequences not in self._choices:
            self._choices[sequences] = ThreadChoice(self.configured, sequences)
        return self._choices[sequences]

    def run(self, ctx: llama_cpp.llama_context_p, sequences: int, step: Callable[[], None]) -> None:
        """Run a generating step of `sequences` tokens with the chosen threads, and time it
        unless it is the first after a prompt chunk or an idle spell."""
        choice = self.choice(sequences)
        threads = choice.for_step()
        started = time.perf_counter()
        self._with_threads(ctx, threads, step)
        ended = time.perf_counter()
        idle = self._last_end is None or started - self._last_end > IDLE_SPELL
        if not (idle or self._after_chunk):
            choice.record(threads, ended - started)
        self._last_end, self._after_chunk, self._latest = ended, False, sequences

    def run_chunk(self, ctx: llama_cpp.llama_context_p, chunk: Callable[[], None]) -> None:
        """Run a prompt chunk with the thread count of the latest generating step."""
        self._with_threads(ctx, self.current, chunk)
        self._last_end, self._after_chunk = time.perf_counter(), True

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


class ThreadChoice:
    """The thread count for generating steps of one number of sequences, kept by measuring."""

    def __init__(self, configured: int, sequences: int) -> None:
        self.configured = configured
        self.sequences = sequences
        self.current = configured
        self._other = 1 if configured > 1 else configured
        self._interval = FIRST_PROBE
        self._until_probe = FIRST_PROBE
        self._probe: list[float] | None = None  # ratios of probe steps to the usual mean
        self._warming_up = False
        self._recent: deque[float] = deque(maxlen=WINDOW)  # recent step times, current count
        self._baseline: float | None = None  # the recent mean when last compared
        self._changed = False  # the steps' times changed: compare soon

    def for_step(self) -> int:
        """Threads for the next step."""
        if self.configured == 1:
            return 1
        if self._probe is None and self._until_probe <= 0:
            self._probe, self._warming_up = [], True
        return self._other if self._probe is not None else self.current

    def usual(self) -> float | None:
        """Mean time of the current count's recent steps."""
        return statistics.fmean(self._recent) if self._recent else None

    def record(self, threads: int, seconds: float) -> None:
        """A step took `seconds` with `threads`."""
        if self.configured == 1:
            return
        usual = self.usual()
        if self._probe is not None and threads == self._other:
            self._record_probe(seconds, usual)
            return
        self._until_probe -= 1
        self._recent.append(seconds)
        if usual is not None and seconds > SLOWDOWN * usual:
            self._changed = True  # a busy neighbour may have arrived
        elif len(self._recent) == WINDOW:
            mean = statistics.fmean(self._recent)
            if self._baseline is None:
                self._baseline = mean
            if not self._baseline / DRIFT <= mean <= self._baseline * DRIFT:
                self._changed = True  # the machine changed (a neighbour came or went)
        # Compare now, though not right after a probe: that one has just compared.
        if self._changed and self._interval - self._until_probe >= FIRST_PROBE:
            self._changed = False
            self._until_probe = 0

    def _record_probe(self, seconds: float, usual: float | None) -> None:
        assert self._probe is not None
        warming_up, self._warming_up = self._warming_up, False
        if usual is None:  # nothing to compare with yet: not counted
            return
        ratio = seconds / usual
        if ratio > (WARM_UP_LIMIT if warming_up else SLOWDOWN):
            self._end_probe(switch=False)
            return
        if warming_up:
            return
        self._probe.append(ratio)
        if len(self._probe) >= 2 and statistics.fmean(self._probe) > ABORT_FACTOR:
            self._end_probe(switch=False)
        elif len(self._probe) == PROBE_STEPS:
            gain = statistics.fmean(self._probe)
            if gain < SWITCH_GAIN:
                log.info(
                    "Generating steps of %d sequences: %d threads took %.2fx the time of %d over %d steps; using %d",
                    self.sequences,
                    self._other,
                    gain,
                    self.current,
                    PROBE_STEPS,
                    self._other,
                )
            self._end_probe(switch=gain < SWITCH_GAIN)

    def _end_probe(self, switch: bool) -> None:
        log.debug("Probe of %d threads for %d sequences: %s", self._other, self.sequences, self._probe)
        self._probe = None
        self._changed = False
        if switch:
            self.current, self._other = self._other, self.current
            self._recent.clear()  # the old count's times say nothing about the new one
            self._baseline = None  # set again from the first full window
        else:  # the steps before the probe are what later steps are held against
            self._baseline = statistics.fmean(self._recent) if len(self._recent) == WINDOW else None
        longest = LONGEST_INTERVAL if self.current == self.configured else LONGEST_INTERVAL_REDUCED
        self._interval = min(self._interval * 2, longest) if not switch else min(self._interval, longest)
        self._until_probe = self._interval
