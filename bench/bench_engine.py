"""Where concurrent throughput goes: our batch engine called in this process, the same engine
behind the server, and llama-server, on the same GGUF and threads, runs interleaved.

The in-process contender is the runner's own `BatchDecoder` with the runner's OpenMP wait
(set before llama.cpp loads, as the runner does), fed requests without HTTP. So

- in-process vs llama-server is the engine's own batching against llama.cpp's,
- ours vs in-process is what the hop costs: the runner's request threads, the socket to the
  server, the server and the HTTP stream, and the bench client reading it (which llama-server's
  stream costs the client too).

Each row also gives the CPU seconds per 100 tokens on the model side (the in-process engine:
this whole process; ours: the runner; llama-server: its process), of our server process, and
of the bench client reading the HTTP streams.

    .venv/bin/python bench/bench_engine.py --tokens 128 --runs 5 --streams 1,4,8 --record
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from rkllama.runner.engines.cpu_threads import apply_wait_policy  # noqa: E402

apply_wait_policy(batched=True)  # before llama.cpp (and its OpenMP) loads, as in the runner

import llama_cpp  # noqa: E402
from llama_cpp._internals import LlamaModel  # noqa: E402
from llama_cpp._logger import set_verbose  # noqa: E402

from bench_server import (  # noqa: E402
    N_CTX,
    PROMPT,
    ROOT,
    children,
    llama_server,
    report,
    rkllama_server,
    stream_llama_server,
    stream_rkllama,
    together,
)
from rkllama.chat_template import render_chat  # noqa: E402
from rkllama.runner.engines.llamacpp import BUILTIN_DEFAULTS  # noqa: E402
from rkllama.runner.engines.llamacpp_batch import BatchDecoder  # noqa: E402
from rkllama.runner.engines.llamacpp_cpu import avoid_amx_weight_buffers  # noqa: E402
from rkllama.runner.engines.llamacpp_jobs import Finished, Job  # noqa: E402
from rkllama.runner.engines.llamacpp_penalties import RecentPenalties  # noqa: E402
from rkllama.runner.engines.llamacpp_sampling import sampler_chain  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402
from rkllama.types import ChatMessage, SamplingOptions  # noqa: E402

SLOTS = 4
Stream = Callable[[], int]  # runs one request, returns the tokens it generated


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class InProcessEngine:
    """The runner's batch decoder in this process, greedy, with the runner's settings."""

    def __init__(self, gguf: Path, threads: int) -> None:
        avoid_amx_weight_buffers()
        set_verbose(False)  # as the runner: llama.cpp's load log is not the bench's output
        self.model = LlamaModel(
            path_model=str(gguf), params=llama_cpp.llama_cpp.llama_model_default_params(), verbose=False
        )
        self.decoder = BatchDecoder(self.model, N_CTX, SLOTS, 512, threads, flash_attn=True, unified=True)
        text = render_chat(self.model.metadata().get("tokenizer.chat_template"), [ChatMessage("user", PROMPT)])
        self.prompt = self.model.tokenize(text.encode(), add_bos=False, special=True)

    def stream(self, tokens: int) -> int:
        # Sampled as the bench's served requests are: greedy, with the engine's defaults for
        # what they leave out (repeat_penalty 1.1, as Ollama).
        options = SamplingOptions(temperature=0.0, top_k=1).merged_over(BUILTIN_DEFAULTS)
        penalties = RecentPenalties(options, self.model.n_vocab())
        job = Job(
            prompt=list(self.prompt),
            sampler=sampler_chain(self.model, options, None, 0),
            limit=tokens,
            cancel=threading.Event(),
            penalties=penalties if penalties.active else None,
        )
        self.decoder.submit(job)
        count = 0
        while not isinstance(job.out.get(), Finished | Exception):
            count += 1
        return count

    def close(self) -> None:
        self.decoder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", default="1,4,8", help="concurrent requests, comma-separated")
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server.exists():
        print(f"{args.llama_server} is missing: build it with bench/build_llama_server.sh", file=sys.stderr)
        return 1
    stream_counts = [int(n) for n in args.streams.split(",")]

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        engine = InProcessEngine(gguf, args.threads)
        stack.callback(engine.close)
        ours_base, ours_proc = stack.enter_context(rkllama_server(models, args.threads))
        peer_base, peer_proc = stack.enter_context(llama_server(args.llama_server, gguf, args.threads, SLOTS))
        prompt_text = render_chat(engine.model.metadata().get("tokenizer.chat_template"), [ChatMessage("user", PROMPT)])
        contenders: dict[str, Stream] = {
            "engine in-process": lambda: engine.stream(args.tokens),
            "rkllama": lambda: stream_rkllama(ours_base, args.tokens)[0],
            "llama-server": lambda: stream_llama_server(peer_base, prompt_text, args.tokens)[0],
        }
        # Whose CPU each contender's tokens cost: the model side (for the in-process engine,
        # this whole process), our server process, the bench client (HTTP contenders).
        runner = children(ours_proc.pid)
        for stream in contenders.values():
            stream()  # warm-up: the prompt is cached from here on, for every contender
        rate: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int, str], list[float]] = {}  # CPU seconds per 100 tokens
        for round_number in range(args.runs):
            order = list(contenders)
            order = order[round_number % len(order) :] + order[: round_number % len(order)]
            for streams in stream_counts:
                for name in order:
                    before = (own_cpu_seconds(), cpu_seconds(ours_proc.pid), sum(map(cpu_seconds, runner)))
                    peer_before = cpu_seconds(peer_proc.pid)
                    tokens, seconds = together(contenders[name], streams)
                    own, server, model = (
                        now - then
                        for now, then in zip(
                            (own_cpu_seconds(), cpu_seconds(ours_proc.pid), sum(map(cpu_seconds, runner))),
                            before,
                            strict=True,
                        )
                    )
                    peer = cpu_seconds(peer_proc.pid) - peer_before
                    spent = {
                        "engine in-process": {"model": own},
                        "rkllama": {"model": model, "server": server, "client": own},
                        "llama-server": {"model": peer, "client": own},
                    }[name]
                    rate.setdefault((name, streams), []).append(tokens / seconds)
                    for part, value in spent.items():
                        cpu.setdefault((name, streams, part), []).append(100 * value / max(tokens, 1))

    def spent(name: str, streams: int, part: str) -> str:
        return f"{statistics.median(cpu[name, streams, part]):.2f}"

    rows = [
        "| streams | engine in-process tok/s | rkllama tok/s | llama-server tok/s | in-process x llama-server "
        "| rkllama x llama-server | rkllama x in-process | model-side CPU s / 100 tokens: in-process, rkllama "
        "runner, llama-server | rkllama server process | client: rkllama, llama-server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in stream_counts:
        median = {name: statistics.median(rate[name, n]) for name in contenders}
        rows.append(
            f"| {n} | {median['engine in-process']:.1f} | {median['rkllama']:.1f} | {median['llama-server']:.1f} "
            f"| {median['engine in-process'] / median['llama-server']:.2f} "
            f"| {median['rkllama'] / median['llama-server']:.2f} "
            f"| {median['rkllama'] / median['engine in-process']:.2f} "
            f"| {spent('engine in-process', n, 'model')}, {spent('rkllama', n, 'model')}, "
            f"{spent('llama-server', n, 'model')} | {spent('rkllama', n, 'server')} "
            f"| {spent('rkllama', n, 'client')}, {spent('llama-server', n, 'client')} |"
        )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (
        f"### Engine in-process vs served, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, threads={args.threads}, tokens={args.tokens}, runs={args.runs} "
        f"(median, interleaved), {SLOTS} sequences each\n\n`{command}`\n"
    )
    table = header + "\n" + "\n".join(rows) + "\n"
    report(table, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
