"""More than the KV pool holds: requests that cannot all grow side by side, ours and llama-server's.

Both servers run 4 sequences in one KV pool of 4096 cells (ours: the default pool, NUM_PARALLEL 4,
NUM_CTX 4096; llama-server: -np 4 -c 4096 -kvu). `--streams` chat requests are sent at once
through `/v1/chat/completions`, each with a prompt of its own (no shared prefix) and a JSON
schema that cannot end before `--tokens` tokens, so each needs prompt + tokens cells and together
they need more than the pool. Reported per contender: requests answered whole (finish_reason
"length" with every token asked for), requests that failed (an HTTP error, an error in the
stream, or an answer cut short), wall time, and output tokens per second.

    .venv/bin/python bench/bench_overflow.py --streams 4 --tokens 700 --record
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench_server import ROOT, llama_server, report, rkllama_server, together  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402

SLOTS = 4
# An answer that cannot end before many numbers: each request runs to its max_tokens.
ENDLESS = {"type": "array", "items": {"type": "integer"}, "minItems": 500}


@dataclass
class Outcome:
    whole: bool = False
    error: str = ""
    tokens: int = 0


def prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    text = " ".join(f"{rng.randrange(16**4):04x}" for _ in range(words))
    return f"Here are some codes: {text}. List numbers."


def chat(base: str, seed: int, words: int, tokens: int, model: str) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(seed, words)}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": ENDLESS}},
    }
    outcome = Outcome()
    finish = None
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=1800) as response:
            if response.status_code != 200:
                return Outcome(error=f"HTTP {response.status_code}: {response.read()[:120]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(error=str(event["error"])[:160])
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    outcome.tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}")
    outcome.whole = finish == "length" and outcome.tokens == tokens
    if not outcome.whole:
        outcome.error = f"finish_reason {finish}, {outcome.tokens} tokens"
    return outcome


def run_at_once(base: str, streams: int, words: int, tokens: int, model: str, seed: int) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    seeds = iter(range(seed, seed + streams))

    def one() -> int:
        outcome = chat(base, next(seeds), words, tokens, model)
        outcomes.append(outcome)
        return outcome.tokens

    _, seconds = together(one, streams)
    return outcomes, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=700, help="tokens each answer asks for")
    parser.add_argument("--words", type=int, default=450, help="codes in each prompt (~4 tokens each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server.exists():
        print(f"{args.llama_server} is missing: build it with bench/build_llama_server.sh", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        install_default_model(ModelStore(models))
        gguf = next((models / DEFAULT_MODEL_NAME).glob("*.gguf"))
        contenders: dict[str, Callable[[], contextlib.AbstractContextManager[tuple[str, object]]]] = {
            "rkllama": lambda: rkllama_server(models, args.threads),
            "llama-server": lambda: llama_server(args.llama_server, gguf, args.threads, SLOTS),
        }
        for name, start in contenders.items():
            with start() as (base, _):
                outcomes, seconds = run_at_once(base, args.streams, args.words, args.tokens, DEFAULT_MODEL_NAME, 7)
            whole = sum(o.whole for o in outcomes)
            errors = sorted({o.error for o in outcomes if o.error})
            tokens = sum(o.tokens for o in outcomes)
            rows.append(
                f"| {name} | {whole} of {len(outcomes)} | {len(outcomes) - whole} | {seconds:.1f} | "
                f"{tokens / seconds:.1f} | {'; '.join(errors) or '-'} |"
            )
            print(rows[-1], flush=True)
    command = "python bench/bench_overflow.py " + shlex.join(sys.argv[1:])
    text = "\n".join(
        [
            f"### KV pool overflow, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"{os.cpu_count()} cores, threads={args.threads}, {args.streams} requests at once, "
            f"~{args.words * 4}-token prompts, {args.tokens} tokens each, pool of 4096 cells for {SLOTS} sequences",
            "",
            f"`{command}`",
            "",
            "| contender | answered whole | failed or cut | seconds | output tok/s | errors seen |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    report(text, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
