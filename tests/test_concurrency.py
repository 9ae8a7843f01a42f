"""A bounded, seeded random mix of load, unload, generate, chat, pull, copy, delete and list
from 8 clients against one real server, for a fixed number of operations.

One run (module fixture) records every request; the tests below each check one claim on it:
no 5xx and no stream that ends in an error (those an unload causes are told apart while
unload draining is being built: issue 9 item 10), every request answered within REQUEST_BOUND
(a hang detector, not a speed test), and afterwards `/current_model`, `/api/ps` and the live
runner processes agree and the models dir holds no temporary leftovers.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import RkllamaServer, make_models_dir
from hub_emulator import HubEmulator
from rkllama.store.default_model import DEFAULT_MODEL_NAME
from rkllama.store.models_dir import PARTIAL_SUFFIXES

CLIENTS = 8
OPERATIONS_PER_CLIENT = int(os.environ.get("RKLLAMA_CONCURRENCY_OPS", "10"))
SEED = int(os.environ.get("RKLLAMA_CONCURRENCY_SEED", "9"))
REQUEST_BOUND = 120.0  # seconds: a request slower than this is taken as hung
MODEL = "smollm2:135m"
PULL_FILES = [f"tiny-{n}.gguf" for n in range(3)]  # pulled by several clients at once
PROMPTS = ["Say hi.", "Name a fruit.", "Count to three."]


@dataclass
class Outcome:
    client: int
    operation: str
    status: int | None  # None: no answer (timeout, connection error)
    seconds: float
    problem: str = ""  # what was wrong with a 2xx (an error inside a stream), or the exception


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def _stream_problem(response: httpx.Response) -> str:
    """An error line inside a 200 stream (NDJSON or the native plain-text chunks)."""
    for line in response.text.splitlines():
        if line.strip() and "error" in json.loads(line):
            return f"stream ended with {line.strip()}"
    return ""


class Client:
    """One of the clients: a seeded sequence of operations."""

    def __init__(self, number: int, base_url: str, run: Run) -> None:
        self.number = number
        self.rng = random.Random(SEED * 100 + number)
        self.http = httpx.Client(base_url=base_url, timeout=REQUEST_BOUND)
        self.run = run
        self.made: list[str] = []  # models this client copied or pulled (it deletes only these)
        self.counter = 0

    def _request(self, operation: str, method: str, path: str, body: dict | None = None) -> None:
        started = time.monotonic()
        status, problem = None, ""
        try:
            response = self.http.request(method, path, json=body)
            status = response.status_code
            if status >= 500:
                problem = response.text[:300]
            elif status == 200 and response.headers.get("content-type", "").startswith(
                ("application/x-ndjson", "text/plain")
            ):
                problem = _stream_problem(response)
        except (httpx.HTTPError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self.run.add(Outcome(self.number, operation, status, time.monotonic() - started, problem))

    # --- the operations -------------------------------------------------------------------
    def load(self) -> None:
        self._request("load", "POST", "/load_model", {"model_name": DEFAULT_MODEL_NAME})

    def unload(self) -> None:
        self._request("unload", "POST", "/unload_model")

    def generate(self) -> None:
        body = {"messages": self.rng.choice(PROMPTS), "max_tokens": 4, "stream": self.rng.random() < 0.5}
        self._request("generate", "POST", "/generate", body)

    def chat(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
            "options": {"num_predict": 4},
            "stream": self.rng.random() < 0.5,
        }
        self._request("chat", "POST", "/api/chat", body)

    def pull(self) -> None:
        filename = self.rng.choice(PULL_FILES)
        self._request("pull", "POST", "/api/pull", {"model": f"hf/test-user/tiny/{filename}"})
        self.made.append(filename.removesuffix(".gguf"))

    def copy(self) -> None:
        self.counter += 1
        name = f"copy-{self.number}-{self.counter}"
        self._request("copy", "POST", "/api/copy", {"source": MODEL, "destination": name})
        self.made.append(name)

    def delete(self) -> None:
        if not self.made:
            return self.listing()
        name = self.made.pop(self.rng.randrange(len(self.made)))
        self._request("delete", "DELETE", "/api/delete", {"model": name})

    def listing(self) -> None:
        path = self.rng.choice(["/models", "/api/tags", "/api/ps", "/v1/models", "/current_model"])
        self._request(f"list {path}", "GET", path)

    def play(self) -> None:
        operations = [self.load, self.unload, self.generate, self.chat, self.pull, self.copy, self.delete, self.listing]
        weights = [2, 2, 3, 3, 1, 1, 1, 2]
        try:
            for _ in range(OPERATIONS_PER_CLIENT):
                self.rng.choices(operations, weights)[0]()
        finally:
            self.http.close()


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RkllamaServer, Run]]:
    with HubEmulator() as hub:
        rng = random.Random(SEED)
        for filename in PULL_FILES:  # no GGUF magic: a file the store lists as an unknown GGUF
            hub.add_file("test-user/tiny", filename, b"\0" + rng.randbytes(256 * 1024))
        root = tmp_path_factory.mktemp("concurrency")
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        srv = RkllamaServer(make_models_dir(root / "models"), root / "server.log", env=env).wait_ready()
        run = Run()
        clients = [Client(n, srv.base_url, run) for n in range(CLIENTS)]
        threads = [threading.Thread(target=c.play) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        yield srv, run
        srv.stop()


def _report(outcomes: list[Outcome]) -> str:
    return "\n".join(
        f"client {o.client} {o.operation}: {o.status} after {o.seconds:.1f}s {o.problem}".rstrip() for o in outcomes
    )


def test_the_mix_ran_every_operation(mix: tuple[RkllamaServer, Run]) -> None:
    _, run = mix
    kinds = {o.operation.split()[0] for o in run.outcomes}
    assert kinds == {"load", "unload", "generate", "chat", "pull", "copy", "delete", "list"}, kinds
    assert any(o.operation in ("generate", "chat") and o.status == 200 for o in run.outcomes)


# How a request dies when another client's unload (or a load that evicts) stops its runner.
UNLOADED = ("unloaded while answering", "exited with code 0 during the request", "killed by SIGKILL during the request")


def _broken(run: Run) -> list[Outcome]:
    return [o for o in run.outcomes if o.status is not None and (o.status >= 500 or o.problem)]


def test_no_request_gets_a_5xx_or_a_broken_stream_except_from_an_unload(mix: tuple[RkllamaServer, Run]) -> None:
    _, run = mix
    bad = [o for o in _broken(run) if not any(marker in o.problem for marker in UNLOADED)]
    assert not bad, _report(bad)


def test_no_request_is_broken_by_another_clients_unload(mix: tuple[RkllamaServer, Run]) -> None:
    _, run = mix
    broken = _broken(run)
    assert not broken, _report(broken)


def test_every_request_is_answered_within_the_bound(mix: tuple[RkllamaServer, Run]) -> None:
    _, run = mix
    hung = [o for o in run.outcomes if o.status is None or o.seconds > REQUEST_BOUND]
    assert not hung, _report(hung)


def _state(srv: RkllamaServer) -> tuple[str | None, list[str], list[int]]:
    with srv.client() as client:
        current = client.get("/current_model")
        ps = client.get("/api/ps").json()["models"]
    name = current.json()["model_name"] if current.status_code == 200 else None
    return name, [m["name"] for m in ps], srv.runner_pids()


def test_current_model_ps_and_runner_processes_agree_afterwards(mix: tuple[RkllamaServer, Run]) -> None:
    srv, _ = mix
    # A runner told to stop may take a moment to exit: wait for agreement, then say what differs.
    deadline = time.monotonic() + 30
    while True:
        current, running, pids = _state(srv)
        expected = [] if current is None else [f"{current}:latest"]
        if running == expected and len(pids) == len(running):
            break
        assert time.monotonic() < deadline, f"current_model={current}, /api/ps={running}, runner pids={pids}"
        time.sleep(0.5)


def test_the_models_dir_holds_no_temporary_leftovers(mix: tuple[RkllamaServer, Run]) -> None:
    srv, _ = mix
    root: Path = srv.models_dir
    leftovers = [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.name.endswith(PARTIAL_SUFFIXES) or (path.name.startswith(".") and path.name != ".digests.json")
        if not (path.is_dir() and path.name == ".pulls" and not any(path.iterdir()))
    ]
    assert not leftovers, leftovers
