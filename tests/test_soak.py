"""The soak of bench/soak.py, one minute long: 4 clients of mixed traffic (native generate,
Ollama chat, OpenAI streaming chat, embeddings, listing) against a real server. Every request
must succeed, and once idle again the server and its runners hold no more file descriptors
or threads than before (a small slack: uvicorn and anyio grow their worker pools lazily).
RSS drift is printed, not asserted; the 30-minute run and its figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # noqa: E402

SECONDS = float(os.environ.get("RKLLAMA_SOAK_SECONDS", "60"))
FD_SLACK = 4
THREAD_SLACK = 4


def test_a_minute_of_mixed_traffic_has_no_errors_and_leaks_no_fds_or_threads(start_server) -> None:
    srv = start_server()
    report = soak.run_soak(srv.base_url, srv.process.pid, clients=4, duration=SECONDS, warmup=10, sample_every=5)
    print("\n" + report.table())
    assert report.total_errors == 0, report.first_errors
    assert report.total_served > 0
    for name, (before, after) in report.fds.items():
        assert after <= before + FD_SLACK, f"{name} open fds {before} -> {after}"
    for name, (before, after) in report.threads.items():
        assert after <= before + THREAD_SLACK, f"{name} threads {before} -> {after}"
    assert report.runner_pids[0] == report.runner_pids[1], "the runner was replaced during the soak"
