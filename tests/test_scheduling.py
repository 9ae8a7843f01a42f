"""The scheduler under load (issue 13): several models at once, LRU eviction, the memory
budget, the server keep-alive default, the bounded queue, per-model load locks, and /metrics.
Every test runs the real server; the slow load is the rkllm C double held at rkllm_init."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RkllamaServer, make_models_dir
from faults_support import loaded_models, wait_until
from rkllama.store.default_model import DEFAULT_MODEL_NAME, packaged_default_model
from rkllm_support import build_double, double_env, log_lines

SHORT = {"num_predict": 4, "temperature": 0}
LONG_STREAM = {"num_predict": 4000, "temperature": 0}


def model_folder(models: Path, name: str, modelfile: str = "") -> None:
    folder = models / name
    folder.mkdir(parents=True)
    os.link(packaged_default_model(), folder / "weights.gguf")
    (folder / "Modelfile").write_text(f'FROM="weights.gguf"\n{modelfile}')


def chat(srv: RkllamaServer, model: str, **options) -> ollama.ChatResponse:
    client = ollama.Client(host=srv.base_url, timeout=300)
    return client.chat(model=model, messages=[{"role": "user", "content": "Say hi."}], options={**SHORT, **options})


def ps_names(srv: RkllamaServer) -> set[str]:
    return set(loaded_models(srv))


def test_two_models_are_loaded_and_answer_at_once(start_server, tmp_path):
    models = make_models_dir(tmp_path / "models")
    model_folder(models, "second")
    srv = start_server(models_dir=models, args=["--max-loaded-models", "2"])
    client = ollama.Client(host=srv.base_url, timeout=300)
    stream = client.chat(
        model=DEFAULT_MODEL_NAME,
        messages=[{"role": "user", "content": "Tell a very long story."}],
        options=LONG_STREAM,
        stream=True,
    )
    first = next(stream)
    assert first.message.content is not None and not first.done
    # While the first model is answering, the second is loaded beside it and answers.
    reply = chat(srv, "second")
    assert reply.done and reply.message.content
    assert ps_names(srv) == {DEFAULT_MODEL_NAME, "second"}
    more = next(stream)
    assert not more.done  # the first stream is still going: nothing was evicted under it
    stream.close()


def test_least_recently_used_idle_model_is_evicted_first(start_server, tmp_path):
    models = make_models_dir(tmp_path / "models")
    for name in ("second", "third"):
        model_folder(models, name)
    srv = start_server(models_dir=models, args=["--max-loaded-models", "2"])
    chat(srv, "second")  # loaded: default, second
    chat(srv, DEFAULT_MODEL_NAME)  # the default is now the more recently used
    assert ps_names(srv) == {DEFAULT_MODEL_NAME, "second"}
    chat(srv, "third")
    assert ps_names(srv) == {DEFAULT_MODEL_NAME, "third"}
    chat(srv, "second")  # now "default" is the least recently used
    assert ps_names(srv) == {"third", "second"}
    assert f"Unloading {DEFAULT_MODEL_NAME} (least recently used) to make room for second" in srv.log()


@pytest.fixture
def budget_models(tmp_path: Path) -> Path:
    """small: 1 sequence of 1024 tokens (~117 MiB); big: 4 x 8192 in a stream each (~814 MiB)."""
    models = tmp_path / "models"
    model_folder(models, "small", "NUM_CTX=1024\nNUM_PARALLEL=1\n")
    model_folder(models, "big", "NUM_CTX=8192\nNUM_PARALLEL=4\nKV_UNIFIED=0\n")
    return models


def test_a_model_beyond_the_memory_budget_is_refused_and_the_loaded_one_stays(start_server, budget_models):
    srv = start_server(
        models_dir=budget_models, args=["--model", "small", "--max-loaded-models", "3", "--memory-budget", "400MiB"]
    )
    with pytest.raises(ollama.ResponseError) as refused:
        chat(srv, "big")
    assert refused.value.status_code == 400
    message = refused.value.error
    assert "Model big needs about" in message and "more than the memory budget of 400 MiB" in message
    assert "--memory-budget" in message
    assert ps_names(srv) == {"small"}  # refused before anything was unloaded
    assert chat(srv, "small").done


def test_the_memory_budget_evicts_an_idle_model_to_fit_a_new_one(start_server, budget_models):
    srv = start_server(
        models_dir=budget_models, args=["--model", "small", "--max-loaded-models", "3", "--memory-budget", "900MiB"]
    )
    assert chat(srv, "big").done  # 117 + 814 MiB do not fit in 900: small goes
    assert ps_names(srv) == {"big"}
    with srv.client() as http:
        (big,) = http.get("/api/ps").json()["models"]
    # The estimate is the weights plus the KV cache: tokens x sequences x layers x KV heads x
    # (key + value width) x 2 bytes (f16), from SmolLM2-135M's header.
    kv_cache = 8192 * 4 * 30 * 3 * (64 + 64) * 2
    assert big["size"] == packaged_default_model().stat().st_size + kv_cache


def test_the_server_keep_alive_default_unloads_a_dialect_loaded_model(start_server, tmp_path):
    models = make_models_dir(tmp_path / "models")
    model_folder(models, "second")
    srv = start_server(models_dir=models, args=["--max-loaded-models", "2", "--keep-alive", "1s"])
    with srv.client() as http:
        ps = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
    # Loaded at start through the native API: kept for good, as the spec's current model.
    assert ps[f"{DEFAULT_MODEL_NAME}:latest"]["expires_at"].startswith(("21", "22"))
    chat(srv, "second")
    assert wait_until(lambda: ps_names(srv) == {DEFAULT_MODEL_NAME})
    assert "second" not in ps_names(srv) and DEFAULT_MODEL_NAME in ps_names(srv)


def test_a_bad_keep_alive_setting_stops_the_start_with_a_message(tmp_path):
    srv = RkllamaServer(make_models_dir(tmp_path / "models"), tmp_path / "log", args=["--keep-alive", "soon"])
    assert srv.process.wait(60) != 0
    assert "--keep-alive (RKLLAMA_KEEP_ALIVE): Invalid keep_alive 'soon'" in srv.log()
    srv.stop()


def queue_depth(srv: RkllamaServer) -> int:
    with srv.client() as http:
        return http.get("/health").json()["queue_depth"]


def test_past_the_queue_bound_a_request_gets_503_with_retry_after(start_server):
    srv = start_server(env={"RKLLAMA_NUM_PARALLEL": "1", "RKLLAMA_MAX_QUEUE": "1"})
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}], "options": SHORT}
    story = {**body, "messages": [{"role": "user", "content": "Tell a very long story."}], "options": LONG_STREAM}
    with srv.client() as first, first.stream("POST", "/api/chat", json=story) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        assert not json.loads(next(lines))["done"]  # the only sequence is busy
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(lambda: srv.client().post("/api/chat", json={**body, "stream": False}))
            assert wait_until(lambda: queue_depth(srv) == 1)
            with srv.client() as third:
                refused = third.post("/api/chat", json={**body, "stream": False})
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert "requests are waiting already (RKLLAMA_MAX_QUEUE)" in refused.json()["error"]
            running.close()  # the running stream ends; the queued request gets the sequence
            assert queued.result().status_code == 200


@pytest.fixture
def slow_rkllm(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A models dir with the default model and an .rkllm one whose load waits at a gate."""
    models = make_models_dir(tmp_path / "models")
    (models / "slow.rkllm").write_bytes(b"RKLLM test model slow")
    library = build_double("1.3", tmp_path)
    yield models, library, tmp_path / "gate"


def test_a_slow_load_does_not_delay_requests_to_a_loaded_model(start_server, slow_rkllm, tmp_path):
    models, library, gate = slow_rkllm
    log = tmp_path / "double.log"
    srv = start_server(
        models_dir=models,
        args=["--max-loaded-models", "2"],
        env=double_env(library, log, RKLLM_DOUBLE_INIT_GATE=str(gate)),
    )
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, srv, "slow")
        assert wait_until(lambda: any(line.startswith("init waiting") for line in log_lines(log)))
        # The load of "slow" holds only its own lock: the loaded model answers meanwhile.
        assert chat(srv, "smollm2:135m").done
        assert not slow.done() and not gate.exists()
        gate.touch()
        assert slow.result().done
    assert ps_names(srv) == {DEFAULT_MODEL_NAME, "slow"}


def scrape(srv: RkllamaServer, **headers: str) -> dict[tuple[str, tuple], float]:
    with srv.client(headers=headers) as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_move_with_the_requests_made(start_server):
    # One token per runner message (no stream batching), so every token after the first has a gap.
    server = start_server(env={"RKLLAMA_STREAM_BATCH_MS": "0"})
    model = (("model", DEFAULT_MODEL_NAME),)
    before = scrape(server)
    reply = chat(server, "smollm2:135m")
    after = scrape(server)

    def moved(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert moved("rkllama_http_requests_total", (("route", "/api/chat"), ("status", "200"))) == 1
    assert moved("rkllama_prompt_tokens_total") == reply.prompt_eval_count
    assert moved("rkllama_generated_tokens_total") == reply.eval_count
    assert moved("rkllama_time_to_first_token_seconds_count") == 1
    assert moved("rkllama_inter_token_latency_seconds_count") == reply.eval_count - 1
    assert after[("rkllama_loaded_models", ())] == 1
    assert after[("rkllama_model_rss_bytes", model)] > 50 * 2**20
    assert after[("rkllama_queue_depth", model)] == 0
    with server.client() as http:
        http.get("/no/such/route")
    assert scrape(server)[("rkllama_http_requests_total", (("route", "unmatched"), ("status", "404")))] >= 1


def test_metrics_need_the_api_key_and_health_does_not(start_server):
    srv = start_server(api_key="sekrit", args=["--api-key", "sekrit"])
    with srv.client() as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401 and "Missing API key" in refused.json()["error"]
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "models": [DEFAULT_MODEL_NAME], "queue_depth": 0}
    assert ("rkllama_loaded_models", ()) in scrape(srv, Authorization="Bearer sekrit")


def test_a_runner_killed_counts_as_a_restart(start_server):
    srv = start_server()
    (pid,) = srv.runner_pids()
    os.kill(pid, 9)
    assert wait_until(lambda: srv.runner_pids() == [])
    key = ("rkllama_runner_restarts_total", (("model", DEFAULT_MODEL_NAME),))
    assert wait_until(lambda: scrape(srv).get(key) == 1)


def test_a_request_for_another_model_waits_for_the_busy_one_then_swaps_it(start_server, tmp_path):
    models = make_models_dir(tmp_path / "models")
    model_folder(models, "second")
    srv = start_server(models_dir=models)  # --max-loaded-models 1: the two models cannot share
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Tell a very long story."}]}
    with srv.client() as first, first.stream("POST", "/api/chat", json={**body, "options": LONG_STREAM}) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        assert not json.loads(next(lines))["done"]
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(chat, srv, "second")
            assert wait_until(lambda: "Waiting for a loaded model to be idle to make room for second" in srv.log())
            assert not other.done() and ps_names(srv) == {DEFAULT_MODEL_NAME}
            assert not json.loads(next(lines))["done"]  # the busy model was not taken from its request
            running.close()
            assert other.result().done  # a 200, not a 503
    assert ps_names(srv) == {"second"}
