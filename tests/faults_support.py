"""Streams in each dialect, read with that dialect's client, and ways to watch processes:
what the fault and shutdown tests share."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import openai

from conftest import RkllamaServer
from rkllama.store.default_model import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
# Greedy, the default model tells this story for ~400 tokens: a stream that runs a while.
STORY = "Tell a very long story."
LONG_TOKENS = 4000
DIALECTS = ["native", "ollama", "openai"]


def wait_until(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Poll a condition; the deadline only bounds a failing test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def runner_processes() -> set[int]:
    """Every runner on the machine (other servers' too): compare sets taken before and after."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"rkllama.runner.main" in cmdline and not process_gone(int(entry.name)):
                pids.add(int(entry.name))
    return pids


def stream_then(
    srv: RkllamaServer, dialect: str, action: Callable[[], None], timeout: float = 600.0, tokens: int = LONG_TOKENS
) -> tuple[str, str]:
    """Start a long streamed answer in `dialect`, run `action` once the first piece of text
    arrived, and read on. Returns ("error", message) when the stream ended with an error
    chunk, ("done", last chunk) when it ended normally, or ("cut", why) when it just broke."""
    try:
        if dialect == "native":
            return _native(srv, action, timeout, tokens)
        if dialect == "ollama":
            return _ollama(srv, action, timeout, tokens)
        return _openai(srv, action, timeout, tokens)
    except (httpx.HTTPError, openai.APIConnectionError) as exc:  # no final chunk: cut or hung
        return "cut", repr(exc)


def _native(srv: RkllamaServer, action: Callable[[], None], timeout: float, tokens: int) -> tuple[str, str]:
    body = {"messages": STORY, "stream": True, "max_tokens": tokens, "temperature": 0}
    with srv.client(timeout=timeout) as client, client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        chunks = (json.loads(line) for line in response.iter_lines() if line)
        assert next(chunks)["choices"][0]["finish_reason"] is None
        action()
        last = None
        for last in chunks:
            if "error" in last:
                return "error", last["error"]
        return "done", json.dumps(last)


def _ollama(srv: RkllamaServer, action: Callable[[], None], timeout: float, tokens: int) -> tuple[str, str]:
    client = ollama.Client(host=srv.base_url, timeout=timeout)
    options = {"num_predict": tokens, "temperature": 0}
    parts = client.chat(model=MODEL, messages=[{"role": "user", "content": STORY}], stream=True, options=options)
    try:
        assert not next(parts).done
        action()
        last = None
        for part in parts:
            last = part
    except ollama.ResponseError as exc:
        return "error", exc.error
    return "done", last.model_dump_json() if last else ""


def _openai(srv: RkllamaServer, action: Callable[[], None], timeout: float, tokens: int) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", timeout=timeout, max_retries=0)
    messages = [{"role": "user", "content": STORY}]
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, max_tokens=tokens, temperature=0
    )
    try:
        while not next(chunks).choices[0].delta.content:
            pass
        action()
        last = None
        for chunk in chunks:
            last = chunk
    except openai.APIError as exc:
        if isinstance(exc, openai.APIConnectionError):
            raise
        return "error", exc.message
    return "done", last.model_dump_json() if last else ""


def answers(srv: RkllamaServer, dialect: str, timeout: float = 600) -> str:
    """A short answer in `dialect` (the native API loads the model first, as its clients must)."""
    if dialect == "native":
        with srv.client(timeout=timeout) as client:
            if client.get("/current_model").status_code != 200:
                loaded = client.post("/load_model", json={"model_name": MODEL})
                assert loaded.status_code == 200, loaded.text
            reply = client.post("/generate", json={"messages": "Hi", "max_tokens": 3, "stream": False})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["content"]
    if dialect == "ollama":
        chat = ollama.Client(host=srv.base_url, timeout=timeout).chat(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 3}
        )
        return chat.message.content or ""
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", timeout=timeout, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    return reply.choices[0].message.content or ""


def loaded_models(srv: RkllamaServer) -> list[str]:
    with srv.client() as client:
        return [m["name"].removesuffix(":latest") for m in client.get("/api/ps").json()["models"]]


def models_dir_with(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def os_kill_if_alive(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
