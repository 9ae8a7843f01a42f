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
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ScriptedClock:
    scripted = ScriptedClock()
    monkeypatch.setattr(llamacpp_threads, "time", scripted)
    monkeypatch.setattr(llamacpp_threads.llama_cpp, "llama_set_n_threads", lambda ctx, threads, batch: None)
    return scripted


def answer(
    choice: StepThreads,
    clock: ScriptedClock,
    tokens: int,
    first_step_ms: float | None = None,
    two_threads_ms: float = TWO_THREADS_MS,
) -> list[int]:
    """One request: its prompt, then `tokens` generating steps; the threads each step used."""
    choice.run_chunk(None, lambda: clock.advance(PROMPT_MS))
    used: list[int] = []
    for index in range(tokens):
        threads = choice.for_step()

        def step(threads: int = threads, index: int = index) -> None:
            if index == 0 and first_step_ms is not None:
                clock.advance(first_step_ms)
            else:
                clock.advance(two_threads_ms if threads == 2 else ONE_THREAD_MS)

        choice.run(None, 1, step)
        used.append(threads)
        clock.advance(0.5)  # sampling and sending the token
    return used


def test_slow_first_steps_of_short_requests_do_not_make_one_thread_look_faster(clock: ScriptedClock) -> None:
    choice = StepThreads(2)
    answer(choice, clock, 40)
    for _ in range(30):  # time-to-first-token requests: a prompt, then one slow step each
        answer(choice, clock, 1, first_step_ms=SLOW_FIRST_STEP_MS)
        clock.advance(200)
    used = answer(choice, clock, 128)
    assert choice.current == 2
    # Only probe steps ran on one thread: a probe ends after at most a warm-up and its steps.
    assert used.count(1) <= 1 + llamacpp_threads.PROBE_STEPS


def test_a_steadily_faster_single_thread_is_chosen(clock: ScriptedClock) -> None:
    """The check above can fail: when one thread is really faster, the choice takes it."""
    choice = StepThreads(2)
    used = answer(choice, clock, 128, two_threads_ms=40.0)  # two threads beside a busy process
    assert choice.current == 1
    assert used[-1] == 1
