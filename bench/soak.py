"""Soak: N clients of mixed traffic against one real server for a fixed duration, to find
what only shows over time: errors, memory that keeps growing, file descriptors or threads
that leak.

The mix: native /generate, Ollama /api/chat, OpenAI streaming chat, embeddings (Ollama and
OpenAI), and listing (/models, /api/tags, /api/ps, /v1/models). Every reply is checked (2xx,
a stream that ends with its final chunk and no error). Reported:

- requests served per kind and errors (target 0, the first few shown);
- RSS of the server and of its runner processes, sampled every --sample seconds; drift is
  the median of the last samples against the median of the first samples after --warmup
  (target < 5%);
- open file descriptors and threads of the server and runners before the traffic and after
  it (once idle), from /proc.

    .venv/bin/python bench/soak.py --clients 4 --duration 1800 --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2:135m"
PROMPTS = ["Say hello.", "Name a colour.", "Count to three.", "What is two plus two?", "Write one short sentence."]


# --- /proc ----------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of `pid` (the server's runner processes)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return sorted(set(found))


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class ProcStats:
    rss_mib: float
    fds: int
    threads: int


def proc_stats(pid: int) -> ProcStats | None:
    try:
        return ProcStats(_status(pid, "VmRSS") / 1024, len(os.listdir(f"/proc/{pid}/fd")), _status(pid, "Threads"))
    except (OSError, ValueError):
        return None  # the process is gone


@dataclass
class Snapshot:
    at: float
    server: ProcStats
    runners: dict[int, ProcStats]

    @property
    def runner_rss(self) -> float:
        return sum(s.rss_mib for s in self.runners.values())


def snapshot(server_pid: int) -> Snapshot:
    server = proc_stats(server_pid)
    if server is None:
        raise RuntimeError(f"the server (pid {server_pid}) is gone")
    runners = {pid: s for pid in children(server_pid) if (s := proc_stats(pid)) is not None}
    return Snapshot(time.monotonic(), server, runners)


# --- traffic ----------------------------------------------------------------------------------
class Failure(Exception):
    pass


def _ok(response: httpx.Response) -> httpx.Response:
    if not response.is_success:
        raise Failure(f"{response.status_code} {response.text[:200]}")
    return response


def native_generate(client: httpx.Client, rng: random.Random, tokens: int) -> None:
    body = {"messages": rng.choice(PROMPTS), "stream": False, "max_tokens": tokens}
    reply = _ok(client.post("/generate", json=body)).json()
    if reply["choices"][0]["finish_reason"] not in ("stop", "length"):
        raise Failure(f"/generate finished with {reply['choices'][0]['finish_reason']!r}")


def ollama_chat(client: httpx.Client, rng: random.Random, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "stream": rng.random() < 0.5,
        "options": {"num_predict": tokens},
    }
    with client.stream("POST", "/api/chat", json=body) as response:
        lines = [json.loads(line) for line in _ok(response).iter_lines() if line.strip()]
    if not lines or lines[-1].get("done") is not True or any("error" in line for line in lines):
        raise Failure(f"/api/chat ended without its final chunk: {lines[-1:]}")


def openai_stream(client: httpx.Client, rng: random.Random, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "stream": True,
        "max_tokens": tokens,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in _ok(response).iter_lines() if line.startswith("data: ")]
    if events[-1:] != ["[DONE]"] or any('"error"' in event for event in events):
        raise Failure(f"the OpenAI stream did not end cleanly: {events[-2:]}")


def embeddings(client: httpx.Client, rng: random.Random, tokens: int) -> None:
    inputs = rng.sample(PROMPTS, rng.randint(1, 3))
    if rng.random() < 0.5:
        reply = _ok(client.post("/api/embed", json={"model": MODEL, "input": inputs})).json()
        count = len(reply["embeddings"])
    else:
        reply = _ok(client.post("/v1/embeddings", json={"model": MODEL, "input": inputs})).json()
        count = len(reply["data"])
    if count != len(inputs):
        raise Failure(f"{len(inputs)} inputs, {count} embeddings")


def listing(client: httpx.Client, rng: random.Random, tokens: int) -> None:
    _ok(client.get(rng.choice(["/models", "/api/tags", "/api/ps", "/v1/models", "/current_model"])))


Operation = Callable[[httpx.Client, random.Random, int], None]
MIX: dict[str, tuple[Operation, int]] = {
    "native generate": (native_generate, 3),
    "ollama chat": (ollama_chat, 3),
    "openai chat stream": (openai_stream, 3),
    "embeddings": (embeddings, 2),
    "list/ps": (listing, 2),
}


@dataclass
class Tally:
    served: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.served[kind] += 1
                return
            self.errors[kind] += 1
            if len(self.first_errors) < 10:
                self.first_errors.append(f"{kind}: {error}")


def client_loop(base_url: str, seed: int, deadline: float, tokens: int, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds = list(MIX)
    weights = [MIX[k][1] for k in kinds]
    with httpx.Client(base_url=base_url, timeout=300) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                MIX[kind][0](client, rng, tokens)
            except (Failure, httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                tally.record(kind, f"{type(exc).__name__}: {exc}")
            else:
                tally.record(kind, None)


# --- the run ----------------------------------------------------------------------------------
@dataclass
class SoakReport:
    clients: int
    duration_s: float
    served: dict[str, int]
    errors: dict[str, int]
    first_errors: list[str]
    server_rss_mib: tuple[float, float]  # (after warm-up, at the end): medians of samples
    runner_rss_mib: tuple[float, float]
    fds: dict[str, tuple[int, int]]  # process -> (before, after)
    threads: dict[str, tuple[int, int]]
    runner_pids: tuple[list[int], list[int]]

    @property
    def total_served(self) -> int:
        return sum(self.served.values())

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    @staticmethod
    def drift(pair: tuple[float, float]) -> float:
        return (pair[1] - pair[0]) / pair[0] if pair[0] else float("nan")

    def table(self) -> str:
        served = ", ".join(f"{k} {v}" for k, v in sorted(self.served.items()))
        rows = [
            "| measure | value |",
            "|---|---|",
            f"| requests served | {self.total_served} ({served}) |",
            f"| errors | {self.total_errors} |",
            f"| server RSS MiB after warm-up → end | {self.server_rss_mib[0]:.1f} → {self.server_rss_mib[1]:.1f} "
            f"({self.drift(self.server_rss_mib):+.1%}) |",
            f"| runner RSS MiB after warm-up → end | {self.runner_rss_mib[0]:.1f} → {self.runner_rss_mib[1]:.1f} "
            f"({self.drift(self.runner_rss_mib):+.1%}) |",
        ]
        rows += [f"| {name} open fds before → after | {a} → {b} |" for name, (a, b) in self.fds.items()]
        rows += [f"| {name} threads before → after | {a} → {b} |" for name, (a, b) in self.threads.items()]
        rows.append(f"| runner pids before → after | {self.runner_pids[0]} → {self.runner_pids[1]} |")
        text = "\n".join(rows) + "\n"
        if self.first_errors:
            text += "\nFirst errors:\n" + "".join(f"- {e}\n" for e in self.first_errors)
        return text


def _idle_snapshot(server_pid: int, settle: float = 30.0) -> Snapshot:
    """Once traffic stopped, runner threads finish their last requests: wait until the
    thread and fd counts hold still for two samples in a row (or `settle` seconds)."""
    deadline = time.monotonic() + settle
    last = snapshot(server_pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = snapshot(server_pid)
        key = [(s.fds, s.threads) for s in (now.server, *now.runners.values())]
        if key == [(s.fds, s.threads) for s in (last.server, *last.runners.values())]:
            return now
        last = now
    return last


def _per_process(before: Snapshot, after: Snapshot, attr: str) -> dict[str, tuple[int, int]]:
    out = {"server": (getattr(before.server, attr), getattr(after.server, attr))}
    out["runners"] = (
        sum(getattr(s, attr) for s in before.runners.values()),
        sum(getattr(s, attr) for s in after.runners.values()),
    )
    return out


def run_soak(
    base_url: str,
    server_pid: int,
    *,
    clients: int = 4,
    duration: float = 1800,
    warmup: float = 60,
    sample_every: float = 10,
    tokens: int = 16,
    seed: int = 1,
) -> SoakReport:
    """Drive `clients` threads of mixed traffic for `warmup` + `duration` seconds."""
    with httpx.Client(base_url=base_url, timeout=300) as client:  # the model is loaded before we count
        ollama_chat(client, random.Random(seed), 1)
    before = _idle_snapshot(server_pid)
    tally = Tally()
    started = time.monotonic()
    deadline = started + warmup + duration
    workers = [
        threading.Thread(target=client_loop, args=(base_url, seed * 1000 + n, deadline, tokens, tally), daemon=True)
        for n in range(clients)
    ]
    for worker in workers:
        worker.start()
    samples: list[Snapshot] = []
    while any(w.is_alive() for w in workers):
        time.sleep(min(sample_every, max(0.1, deadline - time.monotonic())))
        if time.monotonic() - started >= warmup and time.monotonic() < deadline:
            samples.append(snapshot(server_pid))
    for worker in workers:
        worker.join()
    after = _idle_snapshot(server_pid)
    if not samples:
        samples = [after]
    edge = max(1, len(samples) // 5)  # the first and last fifth of the samples

    def span(values: list[float]) -> tuple[float, float]:
        return statistics.median(values[:edge]), statistics.median(values[-edge:])

    return SoakReport(
        clients=clients,
        duration_s=duration,
        served=dict(tally.served),
        errors=dict(tally.errors),
        first_errors=tally.first_errors,
        server_rss_mib=span([s.server.rss_mib for s in samples]),
        runner_rss_mib=span([s.runner_rss for s in samples]),
        fds=_per_process(before, after, "fds"),
        threads=_per_process(before, after, "threads"),
        runner_pids=(sorted(before.runners), sorted(after.runners)),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def rkllama_server(models: Path) -> Iterator[tuple[str, int]]:
    """A real `rkllama serve` on loopback with the default model."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "serve", "--port", str(port), "--models", str(models)],
        env={**os.environ, "RKLLAMA_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/current_model", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("rkllama serve did not become ready")
            time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=1800, help="seconds of measured traffic (after warm-up)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of traffic before RSS is measured")
    parser.add_argument("--sample", type=float, default=10, help="seconds between RSS samples")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from rkllama.store.default_model import install_default_model
    from rkllama.store.models_dir import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        install_default_model(ModelStore(Path(tmp)))
        with rkllama_server(Path(tmp)) as (base, pid):
            report = run_soak(
                base,
                pid,
                clients=args.clients,
                duration=args.duration,
                warmup=args.warmup,
                sample_every=args.sample,
                tokens=args.tokens,
                seed=args.seed,
            )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (
        f"### Soak {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.clients} clients, {args.duration:.0f} s after {args.warmup:.0f} s warm-up, {args.tokens} tokens\n\n"
        f"`{command}`\n"
    )
    table = header + "\n" + report.table()
    print(table)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as results:
            results.write("\n" + table)
    return 1 if report.total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
