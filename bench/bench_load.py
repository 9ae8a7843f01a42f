"""Open-loop load: chat requests arriving as a Poisson process, ours and llama-server's on the
same seeded arrivals (as vLLM's benchmark_serving does it).

Each request is streamed through `/v1/chat/completions` (both servers speak it). Half of the
requests share a long system prompt (~650 tokens), the rest have a short one; answers are 16 to
96 tokens at most (`max_tokens`; greedy, so both servers give the same answers). Per rate:
time to first token p50/p99, time per output token p50/p99 (per request, from its first to its
last token over the tokens the server counted in `usage`, as vLLM's TPOT: our server sends
tokens that come close together in one chunk, so chunk gaps are not token gaps), the longest
gap between two chunks (p99: a stall a reader sees), output throughput and errors. Both servers
run 4 sequences sharing one KV pool of 4096 tokens (ours: NUM_PARALLEL 4, NUM_CTX 4096, the default pool;
llama-server: -np 4 -c 4096 -kvu).

`--rates auto` first measures llama-server's saturation (closed loop, 8 clients: completed
requests per second), then runs at 40%, 80% and 100% of it: the issue's target compares p99 time
to first token at 80% of that rate.

    .venv/bin/python bench/bench_load.py --duration 60 --rates auto --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_server import ROOT, llama_server, report, rkllama_server  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402

SLOTS = 4
TOPICS = ["bread", "rivers", "owls", "trains", "volcanoes", "chess", "tea", "glaciers", "bees", "lighthouses"]
LONG_SYSTEM = (
    "You are the assistant of a small museum of natural history. Visitors ask about the exhibits, "
    "the opening hours, the cafe and the shop. "
    + " ".join(
        f"Exhibit {n}: a hall about {TOPICS[n % len(TOPICS)]}, with models, maps and a short film, "
        "open every day but Monday, guided tours at ten and at three."
        for n in range(18)
    )
)
SHORT_SYSTEM = "You are a helpful assistant."


@dataclass
class Arrival:
    at: float  # seconds after the start
    messages: list[dict[str, str]]
    max_tokens: int


def schedule(rate: float, duration: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now >= duration:
            return arrivals
        system = LONG_SYSTEM if rng.random() < 0.5 else SHORT_SYSTEM
        question = f"Tell me about {rng.choice(TOPICS)}, request {len(arrivals)}."
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        arrivals.append(Arrival(now, messages, rng.randint(16, 96)))


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between content chunks
    span: float = 0.0  # first to last content chunk
    tokens: int = 0  # completion tokens, from usage when the server reports it
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return self.span / (self.tokens - 1) if self.tokens > 1 and self.span > 0 else None


def stream_chat(base: str, model: str, arrival: Arrival) -> Outcome:
    body = {
        "model": model,
        "messages": arrival.messages,
        "max_tokens": arrival.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = Outcome()
    started = time.perf_counter()
    first = last = None
    chunks = 0
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                response.read()
                outcome.error = f"{response.status_code}: {response.text[:200]}"
                return outcome
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"].get("completion_tokens", 0)
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft, first = now - started, now
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                    chunks += 1
            if first is not None and last is not None:
                outcome.span = last - first
            outcome.tokens = outcome.tokens or chunks
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def run_open_loop(send: Callable[[Arrival], Outcome], arrivals: list[Arrival]) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(arrival: Arrival) -> None:
        outcome = send(arrival)
        with lock:
            outcomes.append(outcome)

    started = time.perf_counter()
    threads = []
    for arrival in arrivals:
        delay = arrival.at - (time.perf_counter() - started)
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(arrival,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - started


def saturation(send: Callable[[Arrival], Outcome], seconds: float, seed: int, clients: int = 8) -> float:
    """Completed requests per second with `clients` always waiting: the closed-loop capacity."""
    pool = schedule(rate=100.0, duration=1000.0, seed=seed)
    done = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < deadline:
            send(pool[i % len(pool)])
            i += clients
            with lock:
                done += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(outcomes: list[Outcome], elapsed: float) -> dict[str, float]:
    ok = [o for o in outcomes if o.error is None and o.ttft is not None]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    tpot = [o.tpot for o in ok if o.tpot is not None]
    gaps = [g for o in ok for g in o.gaps]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "ttft_p50": percentile(ttft, 0.5) * 1000,
        "ttft_p99": percentile(ttft, 0.99) * 1000,
        "tpot_p50": percentile(tpot, 0.5) * 1000,
        "tpot_p99": percentile(tpot, 0.99) * 1000,
        "gap_p99": percentile(gaps, 0.99) * 1000,
        "throughput": sum(o.tokens for o in ok) / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    parser.add_argument("--rates", default="auto", help="requests/s, comma-separated, or 'auto'")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server.exists():
        parser.error(f"{args.llama_server} not found: build it with bench/build_llama_server.sh")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        ours_base, _ = stack.enter_context(rkllama_server(models, args.threads))
        peer_base, _ = stack.enter_context(llama_server(args.llama_server, gguf, args.threads, SLOTS))
        contenders: dict[str, Callable[[Arrival], Outcome]] = {
            "rkllama": lambda a: stream_chat(ours_base, DEFAULT_MODEL_NAME, a),
            "llama-server": lambda a: stream_chat(peer_base, "default", a),
        }
        for send in contenders.values():  # warm-up: the shared system prompt is cached alike
            send(schedule(1.0, 10.0, args.seed)[0])
        lines = []
        if args.rates == "auto":
            capacity = saturation(contenders["llama-server"], seconds=min(60.0, args.duration), seed=args.seed)
            rates = [round(capacity * share, 3) for share in (0.4, 0.8, 1.0)]
            lines.append(f"llama-server saturation (8 clients, closed loop): {capacity:.3f} requests/s")
        else:
            rates = [float(r) for r in args.rates.split(",")]
        rows = [
            "| rate req/s | contender | requests | errors | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
            "chunk gap p99 ms | output tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for index, rate in enumerate(rates):
            arrivals = schedule(rate, args.duration, args.seed + index)
            order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
            for name in order:
                s = summary(*run_open_loop(contenders[name], arrivals))
                rows.append(
                    f"| {rate:.3f} | {name} | {s['requests']:.0f} | {s['errors']:.0f} | {s['ttft_p50']:.0f} | "
                    f"{s['ttft_p99']:.0f} | {s['tpot_p50']:.1f} | {s['tpot_p99']:.1f} | {s['gap_p99']:.0f} | "
                    f"{s['throughput']:.1f} |"
                )
                print(rows[-1], flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (
        f"### Open-loop load, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"threads={args.threads}, {args.duration:.0f} s per rate, seed {args.seed}, {SLOTS} sequences each\n\n"
        f"`{command}`\n"
    )
    table = header + "\n" + "\n".join([*lines, "", *rows] if lines else rows) + "\n"
    report(table, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
