"""The step-thread choice (runner/engines/llamacpp_threads.py) decides from step times; here a
scripted clock gives it the times measured on the test VM, so its decisions are checked
without timing anything."""

from __future__ import annotations

import pytest

from rkllama.runner.engines import llamacpp_threads
from rkllama.runner.engines.llamacpp_threads import StepThreads

TWO_THREADS_MS = 10.0  # a quiet generating step on two spinning threads
ONE_THREAD_MS = 17.0  # the same step on one thread
SLOW_FIRST_STEP_MS = 60.0  # the step right after a prompt, while client and server still work
PROMPT_MS = 150.0


class ScriptedClock:
    """The time, and the threads llama.cpp was last told to use (llama_set_n_threads)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.threads = 2

    def perf_counter(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ScriptedClock:
    scripted = ScriptedClock()
    monkeypatch.setattr(llamacpp_threads, "time", scripted)

    def set_n_threads(ctx: object, threads: int, batch_threads: int) -> None:
        scripted.threads = threads

    monkeypatch.setattr(llamacpp_threads.llama_cpp, "llama_set_n_threads", set_n_threads)
    return scripted


def answer(
    chooser: StepThreads,
    clock: ScriptedClock,
    tokens: int,
    first_step_ms: float | None = None,
    two_threads_ms: float = TWO_THREADS_MS,
    one_thread_ms: float = ONE_THREAD_MS,
    sequences: int = 1,
) -> list[int]:
    """One request (or `sequences` decoding together): a prompt, then `tokens` generating
    steps; the threads each step used."""
    chooser.run_chunk(None, lambda: clock.advance(PROMPT_MS))
    used: list[int] = []
    for index in range(tokens):

        def step(index: int = index) -> None:
            used.append(clock.threads)
            if index == 0 and first_step_ms is not None:
                clock.advance(first_step_ms)
            else:
                clock.advance(two_threads_ms if clock.threads == 2 else one_thread_ms)

        chooser.run(None, sequences, step)
        clock.advance(0.5)  # sampling and sending the token
    return used


def test_slow_first_steps_of_short_requests_do_not_make_one_thread_look_faster(clock: ScriptedClock) -> None:
    chooser = StepThreads(2)
    answer(chooser, clock, 40)
    for _ in range(30):  # time-to-first-token requests: a prompt, then one slow step each
        answer(chooser, clock, 1, first_step_ms=SLOW_FIRST_STEP_MS)
        clock.advance(200)
    used = answer(chooser, clock, 128)
    assert chooser.current == 2
    # Only probe steps ran on one thread: a probe ends after at most a warm-up and its steps.
    assert used.count(1) <= 1 + llamacpp_threads.PROBE_STEPS


def test_a_steadily_faster_single_thread_is_chosen(clock: ScriptedClock) -> None:
    """The checks here can fail: when one thread is really faster, the choice takes it."""
    chooser = StepThreads(2)
    used = answer(chooser, clock, 128, two_threads_ms=40.0)  # two threads beside a busy process
    assert chooser.current == 1
    assert used[-1] == 1


def test_one_thread_chosen_for_single_sequences_leaves_four_sequence_steps_on_two(clock: ScriptedClock) -> None:
    """Times measured under open-loop load beside a busy client: one sequence 40 ms on two
    threads and 17 on one; four sequences 51 ms on two threads and 116 on one."""
    chooser = StepThreads(2)
    single = answer(chooser, clock, 128, two_threads_ms=40.0, one_thread_ms=17.0)
    assert single[-1] == 1
    four = answer(chooser, clock, 128, two_threads_ms=51.0, one_thread_ms=116.0, sequences=4)
    # One thread only in probes, each over after its warm-up and at most PROBE_STEPS steps.
    assert longest_run(four, threads=1) <= 1 + llamacpp_threads.PROBE_STEPS
    assert chooser.current == 2
    # ...and single-sequence steps keep their own choice.
    assert chooser.choice(1).current == 1


def longest_run(used: list[int], threads: int) -> int:
    longest = run = 0
    for count in used:
        run = run + 1 if count == threads else 0
        longest = max(longest, run)
    return longest
