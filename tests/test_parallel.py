"""Concurrent requests to one llama.cpp model decode together in one batch (NUM_PARALLEL),
and each still gets exactly its own answer, limits and stops, through the real server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama

from rkllama.store.default_model import packaged_default_model

GREEDY = {"temperature": 0, "seed": 7}
MODEL = "smollm2:135m"  # the default model, by its Ollama name
# Greedy, the 135M model runs on for hundreds of tokens here: seconds of work.
LONG = {"messages": "Tell a very long story.", "max_tokens": 3000, **GREEDY}
# (prompt, max_tokens, stop): different limits and stop strings side by side.
MIXED = [
    ("What is the capital of France? Answer in one word.", 12, ["Paris"]),
    ("What color is the sky?", 5, None),
    ("What is 2+2?", 14, [" is"]),
    ("Write a haiku about rain.", 9, ["\n"]),
]


def generate(client: httpx.Client, prompt: str, max_tokens: int, stop: list[str] | None = None) -> dict:
    body = {"messages": prompt, "max_tokens": max_tokens, "stream": False, **GREEDY}
    if stop:
        body["stop"] = stop
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {
        "content": choice["content"],
        "finish_reason": choice["finish_reason"],
        "tokens": response.json()["usage"]["completion_tokens"],
    }


def together(srv, cases: list[tuple[str, int, list[str] | None]]) -> list[dict]:
    """Each case on its own connection, all at once."""

    def ask(case: tuple[str, int, list[str] | None]) -> dict:
        with srv.client() as client:
            return generate(client, *case)

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return list(pool.map(ask, cases))


def alone_then_together(srv, cases: list[tuple[str, int, list[str] | None]]) -> tuple[list[dict], list[dict]]:
    with srv.client() as client:
        alone = [generate(client, *case) for case in cases]
    return alone, together(srv, cases * 2)


def test_concurrent_requests_keep_their_own_limits_and_stops(server):
    alone, together = alone_then_together(server, MIXED)
    assert together == alone * 2
    by_prompt = dict(zip([case[0] for case in MIXED], alone, strict=True))
    # The cases do exercise what they claim: a stop string, a length limit.
    assert by_prompt[MIXED[0][0]]["finish_reason"] == "stop" and "Paris" not in by_prompt[MIXED[0][0]]["content"]
    assert by_prompt[MIXED[1][0]] == {**by_prompt[MIXED[1][0]], "finish_reason": "length", "tokens": 5}


def test_cancelled_stream_leaves_the_others_answering(start_server):
    srv = start_server()
    cases = MIXED[:2]
    with srv.client() as client:
        alone = [generate(client, *case) for case in cases]
        with client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["choices"][0]["finish_reason"] is None
            # While the long story is being told, the others are answered in full...
            assert together(srv, cases) == alone
            assert json.loads(next(line for line in lines if line))["choices"][0]["finish_reason"] is None
        # ...and closing it then cancels work the runner was still doing: it ran alongside.
        deadline = time.monotonic() + 30
        while "cancelled; the runner stopped after" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "cancelled; the runner stopped after" in srv.log()
        assert [generate(client, *case) for case in cases] == alone


def test_json_schema_chat_alongside_a_plain_request(server):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    options = {"num_predict": 40, **GREEDY}

    def structured() -> str:
        reply = ollama.Client(host=server.base_url, timeout=120).chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Ann is 30. Give her as JSON."}],
            format=schema,
            options=options,
        )
        return reply.message.content

    def plain() -> str:
        reply = ollama.Client(host=server.base_url, timeout=120).chat(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}], options=options
        )
        return reply.message.content

    # Each grammar stays with its own request: every structured answer is the schema's JSON,
    # every plain one is prose. (The texts themselves are not compared with lone runs: llama.cpp's
    # logits differ in the last bits between batch sizes, so a greedy tie may break either way.)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(structured), pool.submit(plain), pool.submit(structured), pool.submit(plain)]
        together = [f.result() for f in futures]
    for answer in together[0::2]:
        person = json.loads(answer)
        assert isinstance(person["name"], str) and isinstance(person["age"], int)
    for answer in together[1::2]:
        assert not answer.lstrip().startswith("{") and len(answer.split()) > 5, answer


def test_runner_killed_with_three_requests_in_flight(start_server):
    srv = start_server()
    (runner,) = srv.runner_pids()
    with contextlib.ExitStack() as stack:
        line_iters = []
        for _ in range(3):
            client = stack.enter_context(srv.client())
            response = stack.enter_context(client.stream("POST", "/generate", json={**LONG, "stream": True}))
            line_iters.append(response.iter_lines())
        for lines in line_iters:
            assert json.loads(next(lines))["choices"][0]["finish_reason"] is None
        os.kill(runner, signal.SIGKILL)
        for lines in line_iters:
            last = [json.loads(line) for line in lines if line][-1]
            assert "SIGKILL" in last["error"] and "load it again" in last["error"]
    with srv.client() as client:
        assert client.get("/current_model").json() == {"error": "No model is currently loaded."}


def assert_one_request_at_a_time(srv) -> None:
    """A second stream sent while a first runs gets its first token only once the first is
    closed: the order of events, not times, shows the requests did not run side by side."""
    events: list[str] = []
    lock = threading.Lock()

    def second() -> None:
        with srv.client() as client, client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
            next(line for line in response.iter_lines() if line)
            with lock:
                events.append("second answers")

    requests_seen = srv.log().count('"POST /generate')
    with srv.client() as client, client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
        chunks = (line for line in response.iter_lines() if line)
        next(chunks)
        waiter = threading.Thread(target=second)
        waiter.start()
        # The second request is in the server (its stream has started) ...
        while srv.log().count('"POST /generate') < requests_seen + 2:
            next(chunks)
        # ... and the first goes on answering for a while: running side by side, the
        # second would have answered by now.
        for _ in range(30):
            next(chunks)
        with lock:
            events.append("first closed")
    waiter.join()
    assert events == ["first closed", "second answers"]


def test_num_parallel_1_serves_one_at_a_time_with_the_same_answers(start_server, server):
    """NUM_PARALLEL=1 keeps the one-request-at-a-time runner; its answers are the batched ones."""
    single = start_server(env={"RKLLAMA_NUM_PARALLEL": "1"})
    assert_one_request_at_a_time(single)
    alone, together = alone_then_together(single, MIXED)
    assert together == alone * 2
    with server.client() as client:
        assert [generate(client, *case) for case in MIXED] == alone
    # A long request keeps the only slot: a cancel then lets the next one in.
    with single.client() as client:
        with client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
            assert json.loads(next(response.iter_lines()))["choices"][0]["finish_reason"] is None
        assert generate(client, *MIXED[0]) == alone[0]


def test_num_parallel_from_the_modelfile_and_a_bad_value(start_server, tmp_path):
    models = tmp_path / "models"
    for name, value in [("single", "1"), ("bad", "0")]:
        (models / name).mkdir(parents=True)
        os.link(packaged_default_model(), models / name / "weights.gguf")
        (models / name / "Modelfile").write_text(f'FROM="weights.gguf"\nNUM_PARALLEL={value}\n')
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        bad = client.post("/load_model", json={"model_name": "bad"})
        assert bad.status_code == 400
        assert "NUM_PARALLEL must be between 1 and" in bad.json()["error"]
        assert client.post("/load_model", json={"model_name": "single"}).status_code == 200
        assert_one_request_at_a_time(srv)
        with client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
            assert json.loads(next(response.iter_lines()))["choices"][0]["finish_reason"] is None
        # The one slot is free again once the stream is closed.
        assert generate(client, *MIXED[1])["tokens"] == MIXED[1][1]


def test_batched_repeat_penalties_give_the_answers_of_llama_cpps_own_sampler(start_server, server):
    """The batch decoder applies the penalties itself (llamacpp_penalties.py); NUM_PARALLEL=1
    samples through llama-cpp-python's chain, penalties included: the answers are the same."""
    single = start_server(env={"RKLLAMA_NUM_PARALLEL": "1"})

    def answer(srv, penalty: float) -> str:
        options = {"num_predict": 60, "temperature": 0, "repeat_penalty": penalty}
        client = ollama.Client(host=srv.base_url, timeout=120)
        return client.generate(model=MODEL, prompt="one two one two one two", raw=True, options=options).response

    penalised = answer(server, 1.5)
    assert penalised == answer(single, 1.5)
    assert penalised != answer(server, 1.0)  # the penalty did change the answer


def test_batched_json_schema_answers_are_those_of_llama_cpps_own_grammar_sampler(start_server):
    """The batch decoder checks the chain's pick against the grammar and constrains the whole
    vocabulary only when the pick is refused (llamacpp_grammar.py); NUM_PARALLEL=1 samples
    through llama-cpp-python's chain, the grammar first: the greedy answers are the same. The
    model's own first pick here (prose) is refused, so both ways of sampling are exercised.
    The batched server has a KV stream per sequence, so its greedy answer does not depend on
    what earlier tests left cached (in one pool it may, in the last bits)."""
    single = start_server(env={"RKLLAMA_NUM_PARALLEL": "1"})
    server = start_server(env={"RKLLAMA_KV_UNIFIED": "0"})
    schema = {
        "type": "object",
        "properties": {"fruits": {"type": "array", "items": {"type": "string"}}, "count": {"type": "integer"}},
        "required": ["fruits", "count"],
    }

    def answer(srv) -> str:
        client = ollama.Client(host=srv.base_url, timeout=120)
        options = {"num_predict": 60, "temperature": 0}
        return client.generate(model=MODEL, prompt="Name some fruits.", format=schema, options=options).response

    batched = answer(server)
    assert batched == answer(single)
    assert batched.startswith('{"fruits"') or batched.startswith('{ "fruits"'), batched
