"""Stopping the server while it answers: SIGTERM ends every stream with a final chunk saying
so, and neither SIGTERM nor SIGKILL leaves a runner behind."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from faults_support import DIALECTS, process_gone, stream_then, wait_until

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
