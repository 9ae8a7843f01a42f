"""Faults through the real server: runners killed, stopped or breaking the protocol, bad model
files, unloads while other clients are answered. Every wait is on a condition."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import pytest

from faults_support import (
    DIALECTS,
    MODEL,
    STORY,
    answers,
    loaded_models,
    models_dir_with,
    os_kill_if_alive,
    process_gone,
    stream_then,
    wait_until,
)
from rkllama.store.default_model import packaged_default_model
from rkllm_support import double_env, rkllm_doubles

__all__ = ["rkllm_doubles"]  # the fixture, imported for pytest


# --- a runner killed mid-stream ----------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_runner_sigkill_mid_stream_ends_the_stream_with_an_error_chunk(start_server, dialect):
    srv = start_server()
    (runner,) = srv.runner_pids()
    end, detail = stream_then(srv, dialect, lambda: os.kill(runner, signal.SIGKILL))
    assert end == "error", detail
    assert "was killed by SIGKILL" in detail and "load it again" in detail
    assert loaded_models(srv) == []
    assert answers(srv, dialect)  # the server is unharmed: a fresh runner answers


# --- a runner that hangs: the watchdog ---------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_stopped_runner_is_killed_by_the_watchdog(start_server, dialect):
    srv = start_server(env={"RKLLAMA_RUNNER_TIMEOUT": "5"})
    (runner,) = srv.runner_pids()
    try:
        end, detail = stream_then(srv, dialect, lambda: os.kill(runner, signal.SIGSTOP))
    finally:
        os_kill_if_alive(runner, signal.SIGCONT)
    assert end == "error", detail
    assert f"The runner of model {MODEL} made no progress for 5 s" in detail and "load it again" in detail
    assert wait_until(lambda: process_gone(runner))
    assert loaded_models(srv) == []
    assert answers(srv, dialect)


def test_a_request_to_a_stopped_idle_runner_is_a_504(start_server):
    srv = start_server(env={"RKLLAMA_RUNNER_TIMEOUT": "5"})
    (runner,) = srv.runner_pids()
    os.kill(runner, signal.SIGSTOP)
    try:
        with srv.client(timeout=90) as client:
            reply = client.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        os_kill_if_alive(runner, signal.SIGCONT)
    assert reply.status_code == 504, reply.text
    assert "made no progress for 5 s" in reply.json()["error"]
    assert wait_until(lambda: process_gone(runner))
    assert answers(srv, "ollama")


def test_a_long_prompt_evaluation_is_not_mistaken_for_a_hang(start_server):
    """The runner's heartbeat covers prompt evaluation, which sends no tokens for a while."""
    srv = start_server(env={"RKLLAMA_RUNNER_TIMEOUT": "10"})
    long_prompt = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 150
    with srv.client(timeout=900) as client:
        reply = client.post(
            "/api/generate",
            json={"model": MODEL, "prompt": long_prompt, "stream": False, "options": {"num_predict": 2}},
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["prompt_eval_count"] > 1500
    assert "made no progress" not in srv.log()


# --- a runner that breaks the protocol ----------------------------------------------------------


def test_a_runner_message_over_the_limit_stops_and_forgets_the_runner(start_server):
    # One embedding vector of the default model is ~13 KB of JSON: over this limit.
    srv = start_server(env={"RKLLAMA_RUNNER_MAX_MESSAGE_BYTES": "8192"})
    (runner,) = srv.runner_pids()
    with srv.client() as client:
        reply = client.post("/api/embed", json={"model": MODEL, "input": "hello"})
        assert reply.status_code == 502, reply.text
        error = reply.json()["error"]
        assert "sent a message longer than 8192 bytes and was stopped" in error and "load it again" in error
        assert wait_until(lambda: process_gone(runner))
        assert loaded_models(srv) == []
    assert answers(srv, "ollama")  # tokens are small messages: the reloaded model answers


def test_embeddings_larger_than_one_runner_message_travel(start_server):
    """Each vector travels as its own message: the result may be far larger than one."""
    srv = start_server(env={"RKLLAMA_RUNNER_MAX_MESSAGE_BYTES": "65536"})
    inputs = [f"sentence number {i}" for i in range(12)]  # ~13 KB each, ~160 KB in all
    reply = ollama.Client(host=srv.base_url, timeout=300).embed(model=MODEL, input=inputs)
    assert len(reply.embeddings) == len(inputs)
    assert len({len(vector) for vector in reply.embeddings}) == 1
    assert reply.embeddings[0] != reply.embeddings[1]


# --- unloading drains ------------------------------------------------------------------------------


# Generous, so that only a broken drain ends these streams early.
PATIENT = {"RKLLAMA_UNLOAD_GRACE": "600"}


def test_unload_lets_requests_in_flight_finish(start_server):
    srv = start_server(env=PATIENT)
    (runner,) = srv.runner_pids()
    body = {"messages": STORY, "stream": True, "max_tokens": 20, "temperature": 0}
    with srv.client() as client, srv.client() as other, ThreadPoolExecutor(1) as pool:
        with client.stream("POST", "/generate", json=body) as response:
            chunks = (json.loads(line) for line in response.iter_lines() if line)
            assert next(chunks)["choices"][0]["finish_reason"] is None
            unload = pool.submit(other.post, "/unload_model")
            # The unload waits for this stream: the server says so before it ends.
            assert wait_until(lambda: f"Unloading {MODEL}: waiting" in srv.log())
            assert client.get("/current_model").json() == {"error": "No model is currently loaded."}
            rest = list(chunks)
        assert "error" not in rest[-1]
        assert rest[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert rest[-1]["usage"]["completion_tokens"] > 1
        assert unload.result().json() == {"message": "Model unloaded successfully."}
    assert process_gone(runner)


def _unload(srv) -> None:
    with srv.client() as client:
        assert client.post("/unload_model").json() == {"message": "Model unloaded successfully."}


def test_a_request_during_an_unload_waits_and_loads_the_model_again(start_server):
    srv = start_server(env=PATIENT)
    (first_runner,) = srv.runner_pids()
    outcomes: list[str] = []

    def unload_and_ask_again() -> None:
        with ThreadPoolExecutor(2) as pool:
            unload = pool.submit(_unload, srv)
            assert wait_until(lambda: f"Unloading {MODEL}: waiting" in srv.log())
            again = pool.submit(answers, srv, "ollama")  # waits for the drain, then loads
            unload.result()
            outcomes.append(again.result())

    worker = threading.Thread(target=unload_and_ask_again)
    end, detail = stream_then(srv, "ollama", worker.start, timeout=600, tokens=20)
    worker.join()
    assert end == "done", detail
    assert len(outcomes) == 1 and outcomes[0]
    assert process_gone(first_runner)
    assert loaded_models(srv) == [MODEL]


# --- bad model files ----------------------------------------------------------------------------------


def _gguf_header(path: Path) -> int:
    """Bytes up to the end of the tensor table of a GGUF file (where the data starts)."""
    from rkllama.runner.engines.gguf_check import data_start

    return data_start(path)


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    good = Path(packaged_default_model()).read_bytes()
    header = _gguf_header(Path(packaged_default_model()))
    return {
        "empty.gguf": b"",
        "garbage.gguf": b"this is not a model at all\n" * 100,
        "header-only.gguf": good[:header],
        "truncated.gguf": good[: len(good) // 2],
        "cut-short.gguf": good[:-100],
    }


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("empty.gguf", "empty.gguf is empty (0 bytes)"),
        ("garbage.gguf", "garbage.gguf is not a GGUF file"),
        ("header-only.gguf", "header-only.gguf is truncated"),
        ("truncated.gguf", "truncated.gguf is truncated"),
        ("cut-short.gguf", "cut-short.gguf is truncated"),
    ],
)
def test_a_bad_gguf_file_is_a_clear_400_and_the_server_serves_on(start_server, tmp_path, bad_ggufs, name, fragment):
    models = models_dir_with(tmp_path / "models", {name: bad_ggufs[name]})
    os.link(packaged_default_model(), models / "good.gguf")
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        native = client.post("/load_model", json={"model_name": name})
        assert native.status_code == 400, native.text
        assert fragment in native.json()["error"] and "pull it again" in native.json()["error"]
        dialect = client.post("/api/chat", json={"model": name, "messages": [{"role": "user", "content": "Hi"}]})
        assert dialect.status_code == 400 and fragment in dialect.json()["error"]
        assert client.post("/load_model", json={"model_name": "good.gguf"}).status_code == 200
        assert client.post("/generate", json={"messages": "Hi", "max_tokens": 2}).status_code == 200


def test_an_empty_rkllm_file_is_a_clear_400(start_server, tmp_path, rkllm_doubles):
    models = models_dir_with(tmp_path / "models", {"empty.rkllm": b""})
    srv = start_server(
        models_dir=models, args=["--no-default"], env=double_env(rkllm_doubles["1.3"]), expect_model=False
    )
    with srv.client() as client:
        reply = client.post("/load_model", json={"model_name": "empty.rkllm"})
        assert reply.status_code == 400, reply.text
        assert "empty.rkllm is empty (0 bytes)" in reply.json()["error"]
        assert client.get("/").status_code == 200


# --- keep-alive after a fault -------------------------------------------------------------------------


def test_keep_alive_still_unloads_after_a_runner_was_killed(start_server):
    srv = start_server()
    client = ollama.Client(host=srv.base_url, timeout=120)
    (runner,) = srv.runner_pids()
    os.kill(runner, signal.SIGKILL)
    assert wait_until(lambda: loaded_models(srv) == [])
    assert client.generate(model=MODEL, prompt="", keep_alive="2s").done_reason == "load"
    assert wait_until(lambda: loaded_models(srv) == [])  # the sweeper is still at work
    assert "Traceback" not in srv.log()


def test_a_gguf_with_a_valid_magic_and_garbage_after_it_is_listed_not_a_500(start_server, tmp_path):
    """A header that declares absurd lengths (a string of 2**63 bytes) must not break listings."""
    garbage = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2**63 - 5) + bytes(range(256)) * 64
    models = models_dir_with(tmp_path / "models", {"magic-garbage.gguf": garbage})
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        tags = client.get("/api/tags")
        assert tags.status_code == 200, tags.text
        assert [m["name"] for m in tags.json()["models"]] == ["magic-garbage:latest"]
        show = client.post("/api/show", json={"model": "magic-garbage.gguf"})
        assert show.status_code == 200, show.text
        loaded = client.post("/load_model", json={"model_name": "magic-garbage.gguf"})
        assert loaded.status_code == 400 and "pull it again" in loaded.json()["error"]
        assert client.get("/api/ps").status_code == 200
