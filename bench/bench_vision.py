"""Time to first token of a chat with one image, for RKLLama and llama.cpp's llama-server,
measured in one run on the same GGUF and projector with the same threads and one slot each.

Each run sends every server, in turn (the order rotates), a fresh random-noise PNG (so no
cache can serve it) in a streamed /v1/chat/completions with max_tokens 1, then a second turn
about the same image, then the chat without the image. The image's cost is the difference of
the first and the last. llama-server's own image encode time is read from its log; ours is
not reported by the server, so the in-process figure (our Projector, the same libmtmd) stands
beside it as the floor.

No real vision model is reachable here: the projector is the tests' tiny random one
(tests/vision_support.py: 16 image tokens, a 2-block ViT of width 32), so absolute encode
times say little about a real VLM; the ratios compare the servers' handling of the same work.

    .venv/bin/python bench/bench_vision.py --runs 7 --record
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import ROOT, free_port, report, serving  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from rkllama.runner.engines.llamacpp_cpu import avoid_amx_weight_buffers, cpu_has_amx  # noqa: E402
from rkllama.store.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, install_default_model  # noqa: E402
from rkllama.store.models_dir import ModelStore  # noqa: E402
from vision_support import write_tiny_mmproj  # noqa: E402

N_CTX = 4096
VISION = "bench-vision"
QUESTION = "What is in this picture? Answer in one word."
FOLLOW_UP = "And what colour is it mostly?"
WIDTH, HEIGHT = 320, 240
# llama-server at verbosity 4 logs, with timestamps (min.s.ms.us), when it starts encoding an
# image and when it starts decoding the embeddings (the encode is the gap), and that decode's time.
STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "
ENCODING = re.compile(STAMP + r"slot process_mtmd: .*encoding mtmd batch")
DECODING = re.compile(STAMP + r"decoding image batch 1/")
DECODED = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+) ms")


def noise_png(rng: np.random.Generator) -> str:
    """A fresh random-noise PNG, base64: a distinct image every call, so nothing is cached."""
    pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image: str | None) -> dict[str, Any]:
    if image is None:
        return {"role": "user", "content": text}
    # The image before the text: where our server puts an image (Ollama's placement), so both
    # servers see the same prompt.
    url = {"url": "data:image/png;base64," + image}
    return {"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": text}]}


@dataclass
class Reply:
    ttft_ms: float
    prompt_tokens: int | None  # from usage, where the server sends it
    timings: dict[str, Any] | None  # llama-server's own


def chat(base: str, model: str, messages: list[dict[str, Any]]) -> Reply:
    """One streamed chat with max_tokens 1: the client's time to the first content (or to the
    end, if the one token is empty)."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "max_tokens": 1,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    first: float | None = None
    prompt_tokens, timings = None, None
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base}: {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"].get("prompt_tokens")
            if chunk.get("timings"):
                timings = chunk["timings"]
    end = time.perf_counter()
    return Reply(((first or end) - started) * 1000, prompt_tokens, timings)


@dataclass
class Contender:
    base: str
    model: str
    log: Path | None = None  # llama-server's log, where its encode times are

    def log_offset(self) -> int:
        return self.log.stat().st_size if self.log else 0

    def logged(self, offset: int) -> dict[str, float]:
        """llama-server's image encode and embeddings decode times in the log written since `offset`."""
        if self.log is None:
            return {}
        with open(self.log, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        out: dict[str, float] = {}
        start, end = ENCODING.search(text), DECODING.search(text)
        if start and end:
            out["encode (log)"] = stamp_ms(end) - stamp_ms(start)
        if decoded := DECODED.findall(text):
            out["image decode (log)"] = sum(float(ms) for ms in decoded)
        return out


def stamp_ms(found: re.Match[str]) -> float:
    minutes, seconds, ms, us = (int(found[i]) for i in range(1, 5))
    return (minutes * 60 + seconds) * 1000 + ms + us / 1000


def vision_folder(models: Path, threads: int) -> Path:
    """A model folder as tests/test_vision.py makes it: the default GGUF and the tiny projector,
    one slot and the bench's threads and context (as llama-server gets them)."""
    folder = models / VISION
    folder.mkdir()
    os.link(models / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE, folder / DEFAULT_MODEL_FILE)
    write_tiny_mmproj(folder / "mmproj-tiny.gguf")
    (folder / "Modelfile").write_text(
        f'FROM="{DEFAULT_MODEL_FILE}"\nMMPROJ="mmproj-tiny.gguf"\n'
        f'NUM_THREAD="{threads}"\nNUM_CTX="{N_CTX}"\nNUM_PARALLEL="1"\n'
    )
    return folder


@contextlib.contextmanager
def rkllama_server(models: Path, threads: int) -> Iterator[Contender]:
    port = free_port()
    env = {"RKLLAMA_LOG_LEVEL": "warning", "RKLLAMA_NUM_PARALLEL": "1", "RKLLAMA_NUM_THREAD": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "serve", "--port", str(port), "--models", str(models), "--model", VISION],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with contextlib.closing(serving(proc, port, "/current_model")) as server:  # closing stops it
        base, _ = next(server)
        yield Contender(base, VISION)


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, mmproj: Path, threads: int, log: Path) -> Iterator[Contender]:
    port = free_port()
    args = [str(binary), "-m", str(gguf), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port)]
    args += ["-t", str(threads), "-tb", str(threads), "-c", str(N_CTX), "-np", "1"]
    args += ["-lv", "4"]  # the image encode's log lines (a few lines per request, no per-token logging)
    if cpu_has_amx():
        args.append("--no-repack")  # as our runner: AMX weight buffers crash here
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        with contextlib.closing(serving(proc, port, "/health")) as server:
            base, _ = next(server)
            yield Contender(base, "peer", log)


def direct_image_ms(gguf: Path, mmproj: Path, threads: int, images: list[str]) -> tuple[list[float], list[float]]:
    """Our Projector in this process (libmtmd through llama-cpp-python, as our runner calls
    it), with no server around it: each image's preprocessing (PNG decode, resize, mtmd
    tokenize) and its encode."""
    from llama_cpp._internals import LlamaModel
    from llama_cpp.llama_cpp import llama_model_default_params

    from rkllama.runner.engines.llamacpp_vision import ImageChunk, Projector

    avoid_amx_weight_buffers()
    model = LlamaModel(path_model=str(gguf), params=llama_model_default_params(), verbose=False)
    projector = Projector(model, str(mmproj), threads)
    prepare, encode = [], []
    for image in [images[0], *images]:  # the first again as a warm-up: it pays the graph allocation
        data = base64.b64decode(image)
        started = time.perf_counter()
        pieces = projector.split(projector.marker, [data], add_special=False)
        chunk = next(piece for piece in pieces if isinstance(piece, ImageChunk))
        split = time.perf_counter()
        projector.encode(chunk)
        prepare.append((split - started) * 1000)
        encode.append((time.perf_counter() - split) * 1000)
    projector.close()
    return prepare[1:], encode[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-server", type=Path, default=ROOT / "bench" / "work" / "llama-server")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if not args.llama_server.exists():
        sys.exit(f"{args.llama_server} not found: build it with bash bench/build_llama_server.sh")
    rng = np.random.default_rng(args.seed)
    names = ["rkllama", "llama-server"]
    measures = ["image", "second turn", "text only", "encode (log)", "image decode (log)", "prompt ms (timings)"]
    figures: dict[tuple[str, str], list[float]] = {(n, m): [] for n in names for m in measures}
    tokens: dict[str, set[int | None]] = {n: set() for n in names}
    images: list[str] = []

    # Both servers run at once (the idle one costs nothing) and the runs alternate, so a
    # machine that speeds up or slows down during the bench affects both alike.
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = Path(tmp) / "models"
        install_default_model(ModelStore(models))
        folder = vision_folder(models, args.threads)
        gguf, mmproj = folder / DEFAULT_MODEL_FILE, folder / "mmproj-tiny.gguf"
        contenders = {
            "rkllama": stack.enter_context(rkllama_server(models, args.threads)),
            "llama-server": stack.enter_context(
                llama_server(args.llama_server, gguf, mmproj, args.threads, Path(tmp) / "llama-server.log")
            ),
        }
        for contender in contenders.values():  # warm-up: the first image pays the graph allocation
            chat(contender.base, contender.model, [user(QUESTION, noise_png(rng))])
            chat(contender.base, contender.model, [user(QUESTION, None)])
        for run in range(args.runs):
            order = names[run % 2 :] + names[: run % 2]
            for name in order:
                contender = contenders[name]
                image = noise_png(rng)
                images.append(image)
                # A nonce per request, so its text is never a cached prefix either.
                first_turn = [user(f"[{secrets.token_hex(4)}] {QUESTION}", image)]
                offset = contender.log_offset()
                reply = chat(contender.base, contender.model, first_turn)
                figures[name, "image"].append(reply.ttft_ms)
                tokens[name].add(reply.prompt_tokens)
                for measure, ms in contender.logged(offset).items():
                    figures[name, measure].append(ms)
                if reply.timings:
                    figures[name, "prompt ms (timings)"].append(reply.timings["prompt_ms"])
                # The same image again: both should find it, and the first turn, in their cache.
                second = [*first_turn, {"role": "assistant", "content": "Noise."}, user(FOLLOW_UP, None)]
                figures[name, "second turn"].append(chat(contender.base, contender.model, second).ttft_ms)
                text = [user(f"[{secrets.token_hex(4)}] {QUESTION}", None)]
                figures[name, "text only"].append(chat(contender.base, contender.model, text).ttft_ms)
        prepare, encode = direct_image_ms(gguf, mmproj, args.threads, images[: args.runs])

    med = {key: statistics.median(values) for key, values in figures.items() if values}
    for name in names:  # the image's cost, run by run, then its median
        costs = [a - b for a, b in zip(figures[name, "image"], figures[name, "text only"], strict=True)]
        med[name, "image cost"] = statistics.median(costs)

    def cell(name: str, measure: str, digits: int = 1) -> str:
        return f"{med[name, measure]:.{digits}f}" if (name, measure) in med else "n/a"

    def ratio(measure: str) -> str:
        ours, peer = med.get(("rkllama", measure)), med.get(("llama-server", measure))
        return f"{ours / peer:.2f}" if ours and peer else "n/a"

    rows = [
        "| ms (median) | rkllama | llama-server | ratio |",
        "|---|---|---|---|",
        f"| TTFT, chat with one fresh image | {cell('rkllama', 'image')} | {cell('llama-server', 'image')} | "
        f"{ratio('image')} |",
        f"| TTFT, same chat without the image | {cell('rkllama', 'text only')} | {cell('llama-server', 'text only')} "
        f"| {ratio('text only')} |",
        f"| image cost (difference of the two) | {cell('rkllama', 'image cost')} | "
        f"{cell('llama-server', 'image cost')} | {ratio('image cost')} |",
        f"| TTFT, second turn about the same image | {cell('rkllama', 'second turn')} | "
        f"{cell('llama-server', 'second turn')} | {ratio('second turn')} |",
        f"| image encode (llama-server: its log; ours: our Projector in-process) | {statistics.median(encode):.2f} | "
        f"{cell('llama-server', 'encode (log)', 2)} | |",
        f"| image preprocessing: PNG decode, resize, mtmd tokenize (our Projector in-process) | "
        f"{statistics.median(prepare):.1f} | | |",
        f"| image embeddings decode (llama-server's log) | | {cell('llama-server', 'image decode (log)')} | |",
        f"| prompt processing, image chat (llama-server's timings) | | "
        f"{cell('llama-server', 'prompt ms (timings)')} | |",
        f"| prompt tokens of the image chat (usage) | {fmt(tokens['rkllama'])} | {fmt(tokens['llama-server'])} | |",
    ]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())  # this VM is shared: how busy it was
    header = (
        f"### Vision {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} cores, threads={args.threads}, 1 slot each, runs={args.runs} (median, interleaved)\n\n"
        f"`{command}`\n\n"
        f"llama-cpp-python {version('llama_cpp_python')}, llama-server {server_version(args.llama_server)}; "
        f"load average at the end {load}; "
        f"a fresh {WIDTH}x{HEIGHT} noise PNG per request, streamed /v1/chat/completions, max_tokens 1, temperature 0.\n"
    )
    table = header + "\n" + "\n".join(rows) + "\n"
    report(table, args.record)
    return 0


def fmt(values: set[int | None]) -> str:
    return ", ".join(str(v) for v in sorted(values, key=lambda v: v or 0))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def server_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"version: (\S+) \((.+?)\)", out.stdout + out.stderr)
    return f"{found[1]} ({found[2]})" if found else "unknown"


if __name__ == "__main__":
    sys.exit(main())
