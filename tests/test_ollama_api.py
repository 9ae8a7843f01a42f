"""The Ollama dialect (/api/*) through the official `ollama` client, on the shared server
(default model loaded; these tests neither change the models dir nor what is loaded)."""

from __future__ import annotations

import json
import math
import secrets
import time
from datetime import UTC, datetime

import httpx
import ollama
import pytest

from json_prefix import is_json_prefix
from rkllama.store.default_model import DEFAULT_MODEL_NAME

MODEL = "smollm2:135m"  # resolves to SmolLM2-135M-Instruct, the default model
LISTED = f"{DEFAULT_MODEL_NAME}:latest"
SHORT = {"num_predict": 8, "temperature": 0, "seed": 7}


@pytest.fixture
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=120)


def test_list_shows_the_default_model_with_gguf_details(client: ollama.Client, server) -> None:
    models = client.list().models
    assert [m.model for m in models] == [LISTED]
    model = models[0]
    gguf = server.models_dir / DEFAULT_MODEL_NAME / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.size == gguf.stat().st_size
    assert model.digest is not None and len(model.digest) == 64
    assert model.details.format == "gguf"
    assert model.details.family == "llama"
    assert model.details.quantization_level == "Q4_1"
    assert model.details.parameter_size == "134.52M"


@pytest.mark.parametrize("name", [MODEL, LISTED, DEFAULT_MODEL_NAME, "smollm2-135m-instruct"])
def test_show_resolves_ollama_and_plain_names(client: ollama.Client, name: str) -> None:
    shown = client.show(name)
    assert shown.details is not None and shown.details.family == "llama"
    assert "FROM SmolLM2-135M-Instruct.Q4_1.gguf" in (shown.modelfile or "")
    assert "temperature 0.7" in (shown.parameters or "")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in (shown.template or "")


def test_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.show("no-such-model:7b")
    assert error.value.status_code == 404
    assert "no-such-model:7b" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="../etc/passwd", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404 and error.value.error == "model '../etc/passwd' not found"


def test_ps_shows_the_loaded_model(client: ollama.Client) -> None:
    running = client.ps().models
    assert [m.model for m in running] == [LISTED]
    assert running[0].context_length == 8192  # the model's trained context
    assert running[0].details.quantization_level == "Q4_1"
    # A loaded model's expiry lies ahead (loaded at start: far ahead, "kept loaded").
    assert running[0].expires_at > datetime.now(UTC)


def test_version_and_head(server, client: ollama.Client) -> None:
    with server.client() as http:
        assert http.head("/").status_code == 200
        assert http.get("/api/version").json()["version"]


def test_chat_returns_a_reply_with_real_figures(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], options=SHORT)
    assert reply.done is True
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done_reason == "length"
    assert reply.eval_count == 8
    assert reply.prompt_eval_count and reply.prompt_eval_count > 5
    assert reply.eval_duration and reply.eval_duration > 0
    assert reply.prompt_eval_duration and reply.prompt_eval_duration > 0
    assert reply.total_duration and reply.total_duration >= reply.eval_duration
    assert reply.load_duration == 0  # already loaded


def test_chat_streams_ndjson_ending_with_done(client: ollama.Client) -> None:
    parts = list(
        client.chat(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], options=SHORT, stream=True)
    )
    assert len(parts) >= 3
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].eval_count == 8 and parts[-1].done_reason == "length"
    streamed = "".join(p.message.content or "" for p in parts)
    whole = client.chat(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], options=SHORT)
    assert streamed == whole.message.content  # same seed, same text


def test_generate_stream_and_not(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL, prompt="The capital of France is", options=SHORT)
    assert whole.done and whole.response and whole.eval_count == 8
    parts = list(client.generate(model=MODEL, prompt="The capital of France is", options=SHORT, stream=True))
    assert "".join(p.response or "" for p in parts) == whole.response
    assert parts[-1].done and parts[-1].done_reason == "length"


def test_generate_raw_prompt_and_stop(client: ollama.Client) -> None:
    reply = client.generate(
        model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={"num_predict": 30, "temperature": 0, "stop": [","]}
    )
    assert reply.done_reason == "stop"
    assert "," not in reply.response


def test_json_schema_answer_parses_and_json_format_stays_json(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Ann is 30. Give her as JSON."}],
        format=schema,
        options={"num_predict": 60, "temperature": 0},
    )
    person = json.loads(reply.message.content)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    # Free-form JSON may run to the token limit: what came by then is still JSON, cut.
    reply = client.generate(
        model=MODEL, prompt="A JSON object about a cat:", format="json", options={"num_predict": 60, "temperature": 0}
    )
    if reply.done_reason == "stop":
        assert isinstance(json.loads(reply.response), dict)
    else:
        assert reply.done_reason == "length" and reply.response.lstrip().startswith("{")
        assert is_json_prefix(reply.response), reply.response


def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The name of the city

    Returns:
      str: The weather
    """
    return f"Sunny in {city}"


def station_log(words: int) -> str:
    """Text no earlier request has sent: its tokens are evaluated, never reused from a cache."""
    return " ".join(secrets.token_hex(3) for _ in range(words))


def test_tool_call_comes_back_as_tool_calls(client: ollama.Client) -> None:
    # Ollama has no tool_choice; a format holding a call object makes the 135M model call.
    call_schema = {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        "required": ["name", "arguments"],
    }
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat(
        model=MODEL,
        messages=messages,
        tools=[get_weather],
        format=call_schema,
        options={"num_predict": 40, "temperature": 0},
    )
    calls = reply.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments["city"], str)
    assert reply.message.content == ""
    # Streamed: the call is not leaked as text, it arrives as tool_calls.
    parts = list(
        client.chat(
            model=MODEL,
            messages=messages,
            tools=[get_weather],
            format=call_schema,
            options={"num_predict": 40, "temperature": 0},
            stream=True,
        )
    )
    assert "".join(p.message.content or "" for p in parts) == ""
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert [c.function.name for c in streamed] == ["get_weather"]
    # The round trip: the tool's result goes back in and the model answers in text. What a
    # 135M model makes of the result is its own affair; that the result was read into the
    # prompt shows in the count: a never-seen-before log of 600 words cannot come from a cache.
    log = station_log(600)
    result = f"{get_weather(**calls[0].function.arguments)}. Station log: {log}"
    messages += [reply.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    final = client.chat(
        model=MODEL, messages=messages, tools=[get_weather], options={"num_predict": 20, "temperature": 0}
    )
    assert not final.message.tool_calls and final.message.content
    assert final.prompt_eval_count >= 600


def test_embed_and_embeddings(client: ollama.Client) -> None:
    result = client.embed(model=MODEL, input=["The cat sat.", "A dog ran."])
    assert len(result.embeddings) == 2
    first = result.embeddings[0]
    assert len(first) == 576
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, rel_tol=1e-3)
    assert result.embeddings[0] != result.embeddings[1]
    single = client.embeddings(model=MODEL, prompt="The cat sat.")
    assert len(single.embedding) == 576


def test_bad_input_is_a_clear_400(client: ollama.Client, server) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"temperature": "hot"})
    assert error.value.status_code == 400 and "temperature" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=MODEL, prompt="hi", keep_alive="soon")
    assert error.value.status_code == 400 and "keep_alive" in error.value.error
    with server.client() as http:
        response = http.post("/api/chat", content=b"{not json")
        assert response.status_code == 400 and "JSON" in response.json()["error"]
        response = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "format": "yaml"})
        assert response.status_code == 400 and response.json()["error"] == (
            "Invalid request: 'format' has the wrong type: \"yaml\"."
        )
        response = http.post("/api/embed", json={"model": MODEL, "input": [1, 2]})
        assert response.status_code == 400 and "'input' has the wrong type" in response.json()["error"]


def test_curl_style_form_content_type_is_read_as_json(server) -> None:
    # Ollama's docs use `curl -d`, which sends application/x-www-form-urlencoded.
    body = json.dumps({"model": MODEL, "prompt": "Hi", "stream": False, "options": SHORT})
    with server.client() as http:
        response = http.post(
            "/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
        )
    assert response.status_code == 200 and response.json()["done"] is True


def test_client_leaving_stops_generation(server, client: ollama.Client) -> None:
    before = server.log().count("cancelled; the runner stopped after")
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        body = {"model": MODEL, "prompt": "Write a very long story.", "options": {"num_predict": 2000}}
        with http.stream("POST", "/api/generate", json=body) as response:
            lines = response.iter_lines()
            for _ in range(3):
                assert not json.loads(next(lines))["done"]
    deadline = time.monotonic() + 30
    while server.log().count("cancelled; the runner stopped after") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("cancelled; the runner stopped after") == before + 1
    # The runner is free and clean for the next request.
    reply = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    assert reply.eval_count == 2 and reply.done_reason == "length"


def test_a_failure_before_the_first_token_keeps_its_http_status(client: ollama.Client) -> None:
    # Tool definitions longer than the request's context are refused before any token.
    tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "word " * 50, "parameters": {}}}
        for i in range(10)
    ]
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(**ask, options={"num_ctx": 256})
    assert error.value.status_code == 400 and "The tool definitions alone are" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        list(client.chat(**ask, options={"num_ctx": 256}, stream=True))
    # An HTTP error status (the client gives -1 for an error line in a started stream).
    assert error.value.status_code == 400 and "The tool definitions alone are" in error.value.error


def test_think_with_a_model_that_does_not_think_gives_plain_content(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], think=True, options=SHORT)
    assert reply.message.content and not reply.message.thinking
    parts = list(client.generate(model=MODEL, prompt="Hi", think=True, options=SHORT, stream=True))
    assert "".join(p.response or "" for p in parts) and not any(p.thinking for p in parts)
