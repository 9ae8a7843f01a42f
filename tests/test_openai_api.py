"""The OpenAI dialect (/v1/*) through the official `openai` client, on the shared server
(default model loaded; nothing here changes the models dir or what is loaded)."""

from __future__ import annotations

import json
import math
import secrets
import time

import openai
import pytest

from json_prefix import is_json_prefix
from rkllama.store.default_model import DEFAULT_MODEL_NAME

MODEL = "smollm2:135m"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Get the time.", "parameters": {"type": "object"}},
}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [DEFAULT_MODEL_NAME]
    assert client.models.retrieve(MODEL).id == DEFAULT_MODEL_NAME


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ask("Say hello."), max_tokens=8, seed=3)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *ask("Name three colours.")]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in with_choices)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list = ask("What is the weather in Paris?")
    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=forced, max_tokens=40
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)

    log = " ".join(secrets.token_hex(3) for _ in range(600))
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": f"Sunny, 24 degrees. Station log: {log}"},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=20, temperature=0
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls and final.choices[0].message.content
    # The result was read into the prompt (what a 135M model makes of it is its own affair):
    # a never-seen-before log of 600 words is evaluated, not reused from a cache.
    assert final.usage.prompt_tokens - final.usage.prompt_tokens_details.cached_tokens >= 600


def test_tool_call_streams_as_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("What is the weather in Oslo?"),
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=40,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].index == 0
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer"},
            "size": {"type": "string", "enum": ["small", "big"]},
        },
        "required": ["city", "population", "size"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("Describe Paris."),
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=60,
        temperature=0,
    )
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "population", "size"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)
    assert data["size"] in ("small", "big")
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("A JSON object about a dog."),
        response_format={"type": "json_object"},
        max_tokens=400,
        temperature=0,
    )
    # Free-form JSON may run to the token limit (a greedy answer of the tiny model depends in its
    # last bits on what else shares the KV pool): what came by then is still JSON, cut.
    content = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert reply.choices[0].finish_reason == "length" and content.lstrip().startswith("{")
        assert is_json_prefix(content), content


def test_embeddings(client: openai.OpenAI) -> None:
    # The client asks for base64 unless told otherwise; both encodings give the same vectors.
    packed = client.embeddings.create(model=MODEL, input=["The cat sat.", "A dog ran."])
    plain = client.embeddings.create(model=MODEL, input=["The cat sat.", "A dog ran."], encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1]
    assert len(packed.data[0].embedding) == 576
    assert packed.data[0].embedding == pytest.approx(plain.data[0].embedding, abs=1e-6)
    assert math.isclose(math.sqrt(sum(x * x for x in plain.data[0].embedding)), 1.0, rel_tol=1e-3)
    assert packed.usage.prompt_tokens > 0


def test_text_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, stream=True)
    )
    assert streamed == reply.choices[0].text


def test_errors_have_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), n=2)
    assert error.value.status_code == 400
    assert error.value.body["type"] == "invalid_request_error" and "'n' must be 1" in error.value.body["message"]

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert missing.value.body["code"] == "model_not_found" and "gpt-4o" in missing.value.body["message"]

    with pytest.raises(openai.BadRequestError) as error:
        forced = {"type": "function", "function": {"name": "launch"}}
        client.chat.completions.create(model=MODEL, messages=ask("hi"), tools=[WEATHER_TOOL], tool_choice=forced)
    assert "launch" in error.value.body["message"]

    with pytest.raises(openai.BadRequestError) as error:
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [image]}])
    assert "image_url" in error.value.body["message"]

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), temperature="warm")  # type: ignore[arg-type]
    assert "temperature" in error.value.body["message"]


def test_a_failure_before_the_first_token_is_an_http_error_when_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        list(
            client.chat.completions.create(
                model=MODEL, messages=ask("word " * 9000), stream=True, extra_body={"truncate": False}
            )
        )
    assert "more than the model's context" in error.value.body["message"]


def test_closing_a_stream_stops_generation(client: openai.OpenAI, server) -> None:
    marker = "cancelled; the runner stopped after"
    before = server.log().count(marker)
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Write a very long story."), max_tokens=2000, stream=True
    )
    for _ in range(4):
        next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while server.log().count(marker) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count(marker) == before + 1
    reply = client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=2)
    assert reply.usage.completion_tokens == 2
