"""Decode speed, concurrent throughput and memory of RKLLama against its peers, measured
in one run on the same GGUF with the same threads:

- llama-cpp-python called directly (the library our llama.cpp engine drives),
- llama.cpp's own llama-server (build it with bench/build_llama_server.sh), if present.

Prints a markdown table of absolute figures and ratios; --record appends it, with the
command, to bench/RESULTS.md. Timing is taken by the client, from the first streamed token
to the last, so every contender is measured the same way.

    .venv/bin/python bench/bench_server.py --tokens 128 --runs 3 --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rkllama.chat_template import render_chat  # noqa: E402
from rkllama.runner.engines.llamacpp_cpu import avoid_amx_weight_buffers, cpu_has_amx  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402
from rkllama.types import ChatMessage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about a dragon who learns to bake bread."
N_CTX = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def decode_rate(stamps: list[float], tokens: int) -> float:
    """Tokens per second after the first token (prompt processing excluded)."""
    if tokens < 2 or len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (tokens - 1) / (stamps[-1] - stamps[0])


# --- contenders ---------------------------------------------------------------------------


class DirectLlama:
    """llama-cpp-python called directly, in this process, with the settings our runner uses
    (flash attention on, as llama-server has it by default): the floor of our own overhead."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        avoid_amx_weight_buffers()
        self.llm = Llama(
            str(gguf), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False
        )
        text = render_chat(self.llm.metadata.get("tokenizer.chat_template"), [ChatMessage("user", PROMPT)])
        self.prompt_text = text
        self.prompt = self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def run(self, tokens: int) -> float:
        self.llm.reset()
        stamps: list[float] = []
        for _ in self.llm.generate(self.prompt, temp=0.0, top_k=1):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens:
                break
        return decode_rate(stamps, len(stamps))

    def first_token_ms(self, n: int) -> float:
        """Milliseconds from the messages to the first token, template and tokenizer included."""
        started = time.perf_counter()
        text = render_chat(self.llm.metadata.get("tokenizer.chat_template"), fresh_messages(n))
        prompt = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1):
            return (time.perf_counter() - started) * 1000
        return float("nan")


def fresh_messages(n: int) -> list[ChatMessage]:
    """A prompt no cache holds beyond its first few tokens (the number differs each time, its
    length does not), so every contender evaluates the whole of it."""
    return [ChatMessage("system", f"Request {n:05d}."), ChatMessage("user", PROMPT)]


def first_token_rkllama(base: str, n: int) -> float:
    messages = [{"role": m.role, "content": m.content} for m in fresh_messages(n)]
    body = {"messages": messages, "stream": True, "max_tokens": 2, "temperature": 0, "top_k": 1}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/generate", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line and json.loads(line)["choices"][0]["content"]:
                return (time.perf_counter() - started) * 1000
    return float("nan")


def first_token_llama_server(base: str, template: str | None, n: int) -> float:
    body = {"prompt": render_chat(template, fresh_messages(n)), "n_predict": 2, "temperature": 0, "top_k": 1}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/completion", json={**body, "stream": True}, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("content"):
                return (time.perf_counter() - started) * 1000
    return float("nan")


def stream_rkllama(base: str, tokens: int) -> tuple[int, list[float]]:
    stamps: list[float] = []
    count = 0
    body = {"messages": PROMPT, "stream": True, "max_tokens": tokens, "temperature": 0, "top_k": 1}
    with httpx.stream("POST", f"{base}/generate", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line:
                continue
            chunk = json.loads(line)
            if chunk["choices"][0]["content"]:
                stamps.append(time.perf_counter())
            if chunk["choices"][0]["finish_reason"]:
                count = chunk["usage"]["completion_tokens"]
    return count, stamps


def stream_llama_server(base: str, prompt: str, tokens: int) -> tuple[int, list[float]]:
    stamps: list[float] = []
    count = 0
    body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "top_k": 1, "stream": True, "cache_prompt": True}
    with httpx.stream("POST", f"{base}/completion", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("content"):
                stamps.append(time.perf_counter())
            if chunk.get("stop"):
                count = chunk.get("timings", {}).get("predicted_n", len(stamps))
    return count, stamps


def together(stream: Callable[[], int], streams: int) -> tuple[int, float]:
    """Tokens and seconds of `streams` requests sent at once (`stream` runs one, returns its tokens)."""
    counts: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        count = stream()
        with lock:
            counts.append(count)

    started = time.perf_counter()
    workers = [threading.Thread(target=one) for _ in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts), time.perf_counter() - started


def aggregate(stream: Callable[[], tuple[int, list[float]]], streams: int) -> float:
    """Total tokens per second of `streams` requests sent at once."""
    tokens, seconds = together(lambda: stream()[0], streams)
    return tokens / seconds


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def serving(proc: subprocess.Popen, port: int, ready_path: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Wait until the server answers `ready_path`, hand it out, and stop it afterwards."""
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + ready_path)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def rkllama_server(
    models: Path, threads: int, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    folder = models / DEFAULT_MODEL_NAME
    modelfile = folder / "Modelfile"
    if "NUM_THREAD=" not in modelfile.read_text():
        modelfile.write_text(modelfile.read_text() + f'NUM_THREAD="{threads}"\nNUM_CTX="{N_CTX}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "serve", "--port", str(port), "--models", str(models)],
        env={**os.environ, "RKLLAMA_LOG_LEVEL": "warning", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield from serving(proc, port, "/current_model")


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, streams: int) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    # One KV pool of N_CTX cells for the slots, as ours by default (idle slots go to its
    # host-RAM prompt cache, --cache-idle-slots, on by default).
    args += ["-t", str(threads), "-tb", str(threads), "-c", str(N_CTX), "-np", str(streams), "-kvu"]
    if cpu_has_amx():
        args.append("--no-repack")  # as our runner: AMX weight buffers crash here
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield from serving(proc, port, "/health")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--streams", default="4", help="concurrent streams for the aggregate rows, comma-separated (1,2,4,8)"
    )
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    stream_counts = [int(n) for n in args.streams.split(",")]
    slots = 4  # ours: the default NUM_PARALLEL; llama-server gets the same -np and context

    # Every contender runs at once (idle ones cost nothing) and the runs alternate, so a
    # machine that speeds up or slows down during the bench affects them all alike.
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        direct = DirectLlama(gguf, args.threads)
        ours_base, ours_proc = stack.enter_context(rkllama_server(models, args.threads))
        contenders: dict[str, Callable[[], tuple[int, list[float]]]] = {
            "rkllama": lambda: stream_rkllama(ours_base, args.tokens),
        }
        peer_proc = None
        if args.llama_server.exists():
            peer_base, peer_proc = stack.enter_context(llama_server(args.llama_server, gguf, args.threads, slots))
            contenders["llama-server"] = lambda: stream_llama_server(peer_base, direct.prompt_text, args.tokens)
        for run in contenders.values():
            run()  # warm-up
        decode: dict[str, list[float]] = {name: [] for name in [*contenders, "direct"]}
        template = direct.llm.metadata.get("tokenizer.chat_template")
        first_token: dict[str, Callable[[int], float]] = {"rkllama": lambda n: first_token_rkllama(ours_base, n)}
        if peer_proc is not None:
            first_token["llama-server"] = lambda n: first_token_llama_server(peer_base, template, n)
        first_token["direct"] = direct.first_token_ms
        ttft: dict[str, list[float]] = {name: [] for name in first_token}
        together: dict[tuple[str, int], list[float]] = {(name, n): [] for name in contenders for n in stream_counts}
        for round_number in range(args.runs):
            order = list(contenders)
            order = order[round_number % len(order) :] + order[: round_number % len(order)]
            for repeat in range(3):
                for name, measure in first_token.items():
                    ttft[name].append(measure(round_number * 10 + repeat))
            decode["direct"].append(direct.run(args.tokens))
            for name in order:
                count, stamps = contenders[name]()
                decode[name].append(decode_rate(stamps, count))
            for streams in stream_counts:
                for name in order:
                    together[name, streams].append(aggregate(contenders[name], streams))
        rates = {name: statistics.median(values) for name, values in decode.items()}
        agg = {key: statistics.median(values) for key, values in together.items()}
        first = {name: statistics.median(values) for name, values in ttft.items()}
        rss = {
            "rkllama": sum(rss_mib(p) for p in children(ours_proc.pid)),
            "direct": rss_mib(os.getpid()),
            "server": rss_mib(ours_proc.pid),
        }
        if peer_proc is not None:
            rss["llama-server"] = rss_mib(peer_proc.pid)
        # Ours again with one sequence: what the three more sequences of the default cost.
        with rkllama_server(models, args.threads, env={"RKLLAMA_NUM_PARALLEL": "1"}) as (single_base, single):
            stream_rkllama(single_base, args.tokens)
            rss["rkllama 1 slot"] = sum(rss_mib(p) for p in children(single.pid))
    peer = {"decode": rates["llama-server"], "rss": rss["llama-server"]} if "llama-server" in rates else None
    ours = {"decode": rates["rkllama"], "rss": rss["rkllama"], "server_rss": rss["server"]}
    direct_rate, direct_rss = rates["direct"], rss["direct"]

    rows = [
        "| measure | rkllama | llama-cpp-python direct | ratio | llama-server | ratio |",
        "|---|---|---|---|---|---|",
        f"| decode tok/s (1 stream) | {ours['decode']:.1f} | {direct_rate:.1f} | {ours['decode'] / direct_rate:.2f} | "
        + (f"{peer['decode']:.1f} | {ours['decode'] / peer['decode']:.2f} |" if peer else "n/a | n/a |"),
        *(
            f"| aggregate tok/s ({n} streams, {slots} sequences) | {agg['rkllama', n]:.1f} | n/a | n/a | "
            + (
                f"{agg['llama-server', n]:.1f} | {agg['rkllama', n] / agg['llama-server', n]:.2f} |"
                if peer
                else "n/a | n/a |"
            )
            for n in stream_counts
        ),
        f"| time to first token ms, fresh prompt | {first['rkllama']:.1f} | {first['direct']:.1f} | "
        f"{first['rkllama'] - first['direct']:+.1f} ms | "
        + (
            f"{first['llama-server']:.1f} ({first['llama-server'] - first['direct']:+.1f} ms over direct) | "
            f"{first['rkllama'] / first['llama-server']:.2f} |"
            if peer
            else "n/a | n/a |"
        ),
        f"| model process RSS MiB | {ours['rss']:.0f} | {direct_rss:.0f} | {ours['rss'] / direct_rss:.2f} | "
        + (f"{peer['rss']:.0f} | {ours['rss'] / peer['rss']:.2f} |" if peer else "n/a | n/a |"),
        f"| model process RSS MiB, 1 sequence (NUM_PARALLEL=1) | {rss['rkllama 1 slot']:.0f} | | "
        f"{ours['rss'] / rss['rkllama 1 slot']:.2f} (4 vs 1) | | |",
        f"| server process RSS MiB (no model) | {ours['server_rss']:.0f} | | | | |",
    ]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (
        f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"threads={args.threads}, tokens={args.tokens}, runs={args.runs} (median, interleaved)\n\n`{command}`\n"
    )
    table = header + "\n" + "\n".join(rows) + "\n"
    report(table, args.record)
    return 0


def record(text: str) -> None:
    """Append a bench's results to bench/RESULTS.md."""
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as results:
        results.write("\n" + text)


def report(text: str, save: bool) -> None:
    """Print a bench's results, and append them to bench/RESULTS.md when `save` (--record)."""
    print(text)
    if save:
        record(text)


if __name__ == "__main__":
    sys.exit(main())
