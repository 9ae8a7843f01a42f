"""Decode speed and time to first token while other processes keep the CPU busy.

Zero, one and two competing busy processes (`python -c "while True: pass"`), for:
RKLLama with NUM_PARALLEL 1 and 4 (its default OpenMP wait policy, brief), RKLLama with
NUM_PARALLEL 4 and RKLLAMA_WAIT_POLICY=active (OpenMP's own default: shows the cause),
llama.cpp's llama-server (build it with bench/build_llama_server.sh) and llama-cpp-python
called in this process. Same GGUF, same threads; every contender runs at once (idle ones cost
nothing) and their runs alternate. Each run's prompt is new (no cached prefix), so the time
to first token includes the prompt. Also reported: the CPU time the contender's process used
per generated token (spinning threads show up there).

    .venv/bin/python bench/bench_contention.py --llama-server /path/to/llama-server --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import (  # noqa: E402
    DEFAULT_MODEL_NAME,
    N_CTX,
    ROOT,
    ChatMessage,
    ModelStore,
    avoid_amx_weight_buffers,
    children,
    install_default_model,
    llama_server,
    render_chat,
    report,
    serving,
)

PROMPT = "Story {n}: write a long story about a dragon who learns to bake bread."
PEER = "llama-server"


@dataclass
class Run:
    ttft: float  # seconds from sending the request to the first token
    decode: float  # tokens per second after the first token
    cpu_ms_per_token: float


@dataclass
class Contender:
    name: str
    # Streams one answer to prompt `n`: (send time, token times); stops at `tokens` or `deadline`.
    stream: Callable[[int, int, float], tuple[float, list[float]]]
    pid: Callable[[], int]  # the process whose CPU time is counted (a runner may be restarted)
    runs: dict[int, list[Run]] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(stamps: list[float]) -> float:
    """Tokens per second after the first chunk of tokens (which ends the prompt's time)."""
    first = stamps.count(stamps[0]) if stamps else 0
    if len(stamps) <= first or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - first) / (stamps[-1] - stamps[0])


def stream_lines(url: str, body: dict, tokens_in: Callable[[str], int], tokens: int, deadline: float):
    """(send time, one time per token). Tokens that arrive in one chunk (RKLLama sends tokens
    less than 40 ms apart as one message) are spread evenly since the previous chunk."""
    started = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", url, json=body, timeout=None) as response:
        for line in response.iter_lines():
            count = tokens_in(line) if line else 0
            if count:
                now = time.perf_counter()
                previous = stamps[-1] if stamps else now
                stamps += [previous + (now - previous) * (i + 1) / count for i in range(count)]
                if len(stamps) >= tokens or now > deadline:
                    break  # closing the stream cancels the rest
    return started, stamps


def rkllama_stream(base: str, model) -> Callable[[int, int, float], tuple[float, list[float]]]:
    def tokens_in(line: str) -> int:
        text = json.loads(line)["choices"][0]["content"]
        return len(model.tokenize(text.encode(), add_bos=False, special=True)) if text else 0

    def stream(n: int, tokens: int, deadline: float) -> tuple[float, list[float]]:
        body = {"messages": PROMPT.format(n=n), "stream": True, "max_tokens": tokens, "temperature": 0, "top_k": 1}
        return stream_lines(f"{base}/generate", body, tokens_in, tokens, deadline)

    return stream


def llama_server_stream(base: str, template: str | None) -> Callable[[int, int, float], tuple[float, list[float]]]:
    def tokens_in(line: str) -> int:
        return int(line.startswith("data: ") and bool(json.loads(line[6:]).get("content")))

    def stream(n: int, tokens: int, deadline: float) -> tuple[float, list[float]]:
        prompt = render_chat(template, [ChatMessage("user", PROMPT.format(n=n))])
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "top_k": 1, "stream": True}
        return stream_lines(f"{base}/completion", body, tokens_in, tokens, deadline)

    return stream


def direct_stream(gguf: Path, threads: int) -> tuple[Callable[[int, int, float], tuple[float, list[float]]], Any]:
    """llama-cpp-python in this process, with the runner's settings (flash attention)."""
    from llama_cpp import Llama

    avoid_amx_weight_buffers()
    llm = Llama(str(gguf), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")

    def stream(n: int, tokens: int, deadline: float) -> tuple[float, list[float]]:
        started = time.perf_counter()
        llm.reset()
        prompt = render_chat(template, [ChatMessage("user", PROMPT.format(n=n))])
        stamps: list[float] = []
        for _ in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0, top_k=1):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens or stamps[-1] > deadline:
                break
        return started, stamps

    return stream, llm


@contextlib.contextmanager
def rkllama(models: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    from bench_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "serve", "--port", str(port), "--models", str(models)],
        env={**os.environ, "RKLLAMA_LOG_LEVEL": "warning", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield from serving(proc, port, "/current_model")


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def measure(contender: Contender, n: int, tokens: int, max_seconds: float) -> Run:
    pid = contender.pid()
    before = cpu_seconds(pid)
    started, stamps = contender.stream(n, tokens, time.perf_counter() + max_seconds)
    used = cpu_seconds(pid) - before
    if not stamps:
        return Run(float("nan"), float("nan"), float("nan"))
    return Run(stamps[0] - started, rate(stamps), 1000 * used / len(stamps))


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def table(contenders: list[Contender], busy: int) -> list[str]:
    peer = next((c for c in contenders if c.name == PEER), None)
    peer_decode = median([r.decode for r in peer.runs[busy]]) if peer else float("nan")
    peer_ttft = median([r.ttft for r in peer.runs[busy]]) if peer else float("nan")
    rows = [
        f"**{busy} busy process{'es' if busy != 1 else ''}**",
        "",
        f"| contender | decode tok/s | x {PEER} | first token ms | x {PEER} | CPU ms per token |",
        "|---|---|---|---|---|---|",
    ]
    for c in contenders:
        runs = c.runs[busy]
        decode, ttft = median([r.decode for r in runs]), median([r.ttft for r in runs])
        cpu = median([r.cpu_ms_per_token for r in runs])
        rows.append(
            f"| {c.name} | {decode:.1f} | {decode / peer_decode:.2f} | {1000 * ttft:.0f} | "
            f"{ttft / peer_ttft:.2f} | {cpu:.1f} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--busy", default="0,1,2", help="competing busy processes, comma-separated counts")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="a run stops after this long")
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    # Off by default: an idle runner with OMP_WAIT_POLICY=active spins without end, so it acts as
    # busy processes for every other contender and the table measures that instead.
    parser.add_argument(
        "--with-active", action="store_true", help="add RKLLama with the active wait policy (skews the others)"
    )
    parser.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = parser.parse_args()
    busy_counts = [int(b) for b in args.busy.split(",")]

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        modelfile = models / DEFAULT_MODEL_NAME / "Modelfile"
        modelfile.write_text(modelfile.read_text() + f'NUM_CTX="{N_CTX}"\n')
        threads = {"RKLLAMA_NUM_THREAD": str(args.threads)}
        ours = {
            "rkllama NUM_PARALLEL=1": {**threads, "RKLLAMA_NUM_PARALLEL": "1"},
            "rkllama NUM_PARALLEL=4": {**threads, "RKLLAMA_NUM_PARALLEL": "4"},
        }
        if args.with_active:
            ours["rkllama NUM_PARALLEL=4, active wait"] = {
                **threads,
                "RKLLAMA_NUM_PARALLEL": "4",
                "RKLLAMA_WAIT_POLICY": "active",
            }
        direct, llm = direct_stream(gguf, args.threads)
        template = llm.metadata.get("tokenizer.chat_template")
        contenders: list[Contender] = []
        for name, env in ours.items():
            base, proc = stack.enter_context(rkllama(models, env))
            runner = lambda proc=proc: (children(proc.pid) or [proc.pid])[0]  # noqa: E731
            contenders.append(Contender(name, rkllama_stream(base, llm), runner))
        if args.llama_server.exists():
            base, proc = stack.enter_context(llama_server(args.llama_server, gguf, args.threads, 4))
            contenders.append(Contender(PEER, llama_server_stream(base, template), lambda pid=proc.pid: pid))
        contenders.append(Contender("llama-cpp-python in-process", direct, os.getpid))
        for contender in contenders:
            measure(contender, 0, 4, args.max_seconds)  # warm-up
        n = 0
        for busy in busy_counts:
            with busy_processes(busy):
                for contender in contenders:
                    contender.runs[busy] = []
                for round_number in range(args.runs):
                    shift = round_number % len(contenders)
                    for contender in contenders[shift:] + contenders[:shift]:
                        n += 1
                        run = measure(contender, n, args.tokens, args.max_seconds)
                        contender.runs[busy].append(run)
                        print(f"busy={busy} {contender.name}: {run}", file=sys.stderr, flush=True)

    load = os.getloadavg()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"threads={args.threads}, tokens={args.tokens}, runs={args.runs} (median, interleaved), "
        f"load average at the end {load[0]:.1f}",
        "",
        f"`{command}`",
        "",
    ]
    for busy in busy_counts:
        lines += [*table(contenders, busy), ""]
    text = "\n".join(lines)
    report(text, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
