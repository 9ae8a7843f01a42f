"""Stopping the server while it answers: SIGTERM ends every stream with a final chunk saying
so, and neither SIGTERM nor SIGKILL leaves a runner behind."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from faults_support import DIALECTS, process_gone, stream_then, wait_until
from rkllm_support import double_env, rkllm_doubles, rkllm_models_dir

__all__ = ["rkllm_doubles"]  # the fixture, imported for pytest

SHUTTING_DOWN = "The server is shutting down; this request was stopped. Retry once it is back."


def test_sigterm_ends_every_dialects_stream_with_a_final_error_chunk(start_server):
    srv = start_server()
    runners = srv.runner_pids()
    all_streaming = threading.Barrier(len(DIALECTS) + 1)
    with ThreadPoolExecutor(len(DIALECTS)) as pool:
        ends = [pool.submit(stream_then, srv, dialect, all_streaming.wait) for dialect in DIALECTS]
        all_streaming.wait(timeout=300)
        os.kill(srv.process.pid, signal.SIGTERM)
        results = dict(zip(DIALECTS, (end.result() for end in ends), strict=True))
    assert results == {dialect: ("error", SHUTTING_DOWN) for dialect in DIALECTS}
    srv.process.wait(timeout=60)
    assert wait_until(lambda: all(process_gone(pid) for pid in runners))
    assert "Traceback" not in srv.log()


def test_sigkill_during_generation_leaves_no_runner(start_server):
    srv = start_server()
    (runner,) = srv.runner_pids()
    end, _ = stream_then(srv, "native", lambda: os.kill(srv.process.pid, signal.SIGKILL))
    assert end == "cut"
    # The runner loses its socket (and its parent): it stops at the next token and exits,
    # instead of generating the 4000 tokens nobody will read.
    assert wait_until(lambda: process_gone(runner), seconds=30)


def test_sigkill_leaves_no_runner_even_when_the_answer_would_take_long(start_server, tmp_path, rkllm_doubles):
    """On the rkllm double at 25 ms a word this echo takes ~50 s, however fast the machine:
    a runner that went on answering a dead server would outlive the deadline. (Words come
    closer than the 40 ms stream batching, so they are sent by the runner's flusher thread.)"""
    models = rkllm_models_dir(tmp_path / "models", "slow.rkllm")
    env = double_env(rkllm_doubles["1.3"], RKLLM_DOUBLE_DELAY_MS="25")
    srv = start_server(models_dir=models, args=["--no-default", "--model", "slow.rkllm"], env=env)
    (runner,) = srv.runner_pids()
    body = {"messages": "word " * 2000, "stream": True, "max_tokens": 4000}
    with srv.client() as client, client.stream("POST", "/generate", json=body) as response:
        assert next(line for line in response.iter_lines() if line)
        os.kill(srv.process.pid, signal.SIGKILL)
    assert wait_until(lambda: process_gone(runner), seconds=30)
