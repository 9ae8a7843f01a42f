"""JSON-schema answers: decode speed of a grammar-constrained reply, ours and llama-server's.

One stream at a time through `/v1/chat/completions` with `response_format` a JSON schema that
cannot end before `--tokens` tokens (an array of at least 500 integers), greedy, on the same
GGUF and threads; tokens per second after the first token (the prompt is short), medians of
`--runs` interleaved runs. Both servers check the chain's pick against the grammar first and
constrain the whole vocabulary only when it is refused.

    .venv/bin/python bench/bench_json.py --tokens 200 --runs 5 --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_server import ROOT, decode_rate, llama_server, report, rkllama_server  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 500}
QUESTION = "List numbers."


def json_answer_rate(base: str, tokens: int) -> float:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": SCHEMA}},
    }
    stamps: list[float] = []
    count = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return decode_rate(stamps, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server.exists():
        print(f"{args.llama_server} is missing: build it with bench/build_llama_server.sh", file=sys.stderr)
        return 1
    rates: dict[str, list[float]] = {"rkllama": [], "llama-server": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        ours, _ = stack.enter_context(rkllama_server(models, args.threads))
        peer, _ = stack.enter_context(llama_server(args.llama_server, gguf, args.threads, 4))
        bases = {"rkllama": ours, "llama-server": peer}
        for base in bases.values():
            json_answer_rate(base, 8)  # warm-up
        for run in range(args.runs):
            order = list(bases) if run % 2 == 0 else list(reversed(bases))
            for name in order:
                rates[name].append(json_answer_rate(bases[name], args.tokens))
    ours_rate, peer_rate = (statistics.median(rates[name]) for name in ("rkllama", "llama-server"))
    command = "python bench/bench_json.py " + shlex.join(sys.argv[1:])
    text = "\n".join(
        [
            f"### JSON-schema answer, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"{os.cpu_count()} cores, threads={args.threads}, tokens={args.tokens}, runs={args.runs} "
            "(median, interleaved)",
            "",
            f"`{command}`",
            "",
            "| contender | decode tok/s | runs |",
            "|---|---|---|",
            f"| rkllama | {ours_rate:.1f} | {', '.join(f'{r:.1f}' for r in rates['rkllama'])} |",
            f"| llama-server | {peer_rate:.1f} | {', '.join(f'{r:.1f}' for r in rates['llama-server'])} |",
            f"| rkllama x llama-server | {ours_rate / peer_rate:.2f} | |",
            "",
        ]
    )
    report(text, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
