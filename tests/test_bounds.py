"""Bad input through the real server: hostile JSON on every POST route, keep_alive that no
clock can show, sampling values out of range and requests over their size limits. Each
is a 400 whose message says what was wrong (never a 500), and the server keeps serving.

Uses the shared server (default model loaded), plus one private server with small size
limits; nothing here changes the models dir or what is loaded."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from conftest import RkllamaServer, make_models_dir

MODEL = "smollm2:135m"  # the default model
ASK = [{"role": "user", "content": "Say hi."}]

# Every route that reads a JSON body, with its method.
POST_ROUTES = [
    ("POST", "/generate"),
    ("POST", "/load_model"),
    ("POST", "/rm"),
    ("DELETE", "/rm"),
    ("POST", "/pull"),
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("POST", "/api/show"),
    ("POST", "/api/copy"),
    ("POST", "/api/create"),
    ("POST", "/api/pull"),
    ("DELETE", "/api/delete"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
]
# Each field any of those routes reads, so the bad value is where the route would look.
FIELDS = ["model", "model_name", "messages", "prompt", "input", "source", "destination", "name"]

DEEP = "[" * 10_000 + "]" * 10_000
HOSTILE_BODIES = {
    "nested 10,000 deep": ('{"model": ' + DEEP + "}", "is nested deeper than 100 levels"),
    "a 5,000-digit integer": ('{"model": 1' + "0" * 4999 + "}", "holds an integer of 5000 digits"),
    "a lone surrogate": (
        "{" + ", ".join(f'"{f}": "hi \\ud800"' for f in FIELDS) + "}",
        "holds a lone UTF-16 surrogate \\ud800 at 'model'",
    ),
    "NaN": ('{"model": NaN}', "holds NaN, which is not a JSON number"),
    "a number too large for a float": ('{"model": 1e999}', "holds the number 1e999, too large for a 64-bit float"),
}


def error_message(response: httpx.Response) -> str:
    """The message of any dialect's error body (OpenAI nests it)."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.fixture(scope="module")
def http(server: RkllamaServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.mark.parametrize("case", HOSTILE_BODIES)
@pytest.mark.parametrize(("method", "path"), POST_ROUTES)
def test_hostile_json_is_a_400_saying_what_was_wrong(http: httpx.Client, method: str, path: str, case: str) -> None:
    body, expected = HOSTILE_BODIES[case]
    response = http.request(method, path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert f"The request body {expected}" in error_message(response)
    assert http.get("/current_model").json() == {"model_name": "SmolLM2-135M-Instruct"}


def test_deep_tool_call_arguments_are_a_400(http: httpx.Client) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    answer = {"role": "tool", "tool_call_id": "c1", "content": "1"}
    messages = [*ASK, {"role": "assistant", "tool_calls": [call]}, answer]
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert error_message(response) == ("'messages.1.tool_calls.0.function.arguments' is nested deeper than 100 levels.")


def nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"items": value}
    return value


def test_json_nested_100_deep_is_accepted_101_is_not(http: httpx.Client) -> None:
    # The body object is level 1; an empty prompt only loads the model, so `format` goes unused.
    response = http.post("/api/generate", json={"model": MODEL, "prompt": "", "format": nested(99)})
    assert response.status_code == 200, response.text
    response = http.post("/api/generate", json={"model": MODEL, "prompt": "", "format": nested(100)})
    assert response.status_code == 400
    assert error_message(response) == "The request body is nested deeper than 100 levels."


# --- keep_alive -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep_alive", "shown"),
    [(1e12, "1000000000000"), ("999999999h", "'999999999h'"), ("NaN", "'NaN'"), ("inf", "'inf'"),
     (315_360_001, "315360001")],
)  # fmt: skip
@pytest.mark.parametrize("route", ["/api/generate", "/api/embed"])
def test_keep_alive_beyond_ten_years_is_refused_and_ps_keeps_working(
    http: httpx.Client, route: str, keep_alive: object, shown: str
) -> None:
    body = {"model": MODEL, "prompt": "", "input": "hi", "keep_alive": keep_alive}
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    assert error_message(response) == (
        f"Invalid keep_alive {shown}: at most 315360000 seconds (10 years); "
        "use -1 to keep the model loaded until it is unloaded."
    )
    ps = http.get("/api/ps")
    assert ps.status_code == 200, ps.text
    assert [m["name"] for m in ps.json()["models"]] == ["SmolLM2-135M-Instruct:latest"]


@pytest.mark.parametrize("keep_alive", [-1e12, "-999999999h", -1])
def test_any_negative_keep_alive_keeps_the_model_loaded_for_good(http: httpx.Client, keep_alive: object) -> None:
    response = http.post("/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": keep_alive})
    assert response.status_code == 200, response.text
    ps = http.get("/api/ps")
    assert ps.status_code == 200, ps.text
    (model,) = ps.json()["models"]
    assert model["expires_at"].startswith(("21", "22"))  # ~100 years ahead: forever


# --- sampling ranges --------------------------------------------------------------------------
OLLAMA_OUT_OF_RANGE = [
    ("temperature", -1, "must be between 0 and 100, got -1"),
    ("temperature", 101, "must be between 0 and 100, got 101"),
    ("top_p", 5, "must be between 0 and 1, got 5"),
    ("min_p", -0.5, "must be between 0 and 1, got -0.5"),
    ("top_k", -1, "must be between 0 and 2147483647, got -1"),
    ("seed", 2**64, "must be -1, or between 0 and 4294967295, got 18446744073709551616"),
    ("seed", -2, "must be -1, or between 0 and 4294967295, got -2"),
    ("repeat_penalty", 0, "must be greater than 0 and at most 100, got 0"),
    ("presence_penalty", 1e300, "must be between -100 and 100, got 1e+300"),
    ("frequency_penalty", -101, "must be between -100 and 100, got -101"),
    ("num_predict", -3, "must be at least -2, got -3"),
]


@pytest.mark.parametrize(("field", "value", "expected"), OLLAMA_OUT_OF_RANGE)
@pytest.mark.parametrize("kind", ["generate", "chat"])
def test_ollama_option_out_of_range_is_a_400_naming_field_and_range(
    server: RkllamaServer, kind: str, field: str, value: float, expected: str
) -> None:
    client = ollama.Client(host=server.base_url, timeout=120)
    with pytest.raises(ollama.ResponseError) as error:
        if kind == "chat":
            client.chat(model=MODEL, messages=ASK, options={field: value})
        else:
            client.generate(model=MODEL, prompt="Say hi.", options={field: value})
    assert error.value.status_code == 400
    assert error.value.error == f"Invalid request: 'options.{field}' {expected}."


@pytest.mark.parametrize(
    "options",
    [
        {"num_predict": -1},
        {"num_predict": -2},
        {"num_predict": 0},
        {"seed": -1},
        {"seed": 2**32 - 1},
        {"temperature": 0, "top_k": 0, "top_p": 0, "min_p": 1},
        {"temperature": 5, "presence_penalty": -3, "frequency_penalty": 3, "repeat_penalty": 0.5},
    ],
)
def test_ollama_accepts_its_documented_special_values(server: RkllamaServer, options: dict) -> None:
    # An empty prompt only loads the model, but the options are checked all the same.
    reply = ollama.Client(host=server.base_url, timeout=120).generate(model=MODEL, prompt="", options=options)
    assert reply.done_reason == "load"


OPENAI_OUT_OF_RANGE = [
    ("temperature", -1, "must be between 0 and 2, got -1"),
    ("temperature", 3, "must be between 0 and 2, got 3"),
    ("top_p", 5, "must be between 0 and 1, got 5"),
    ("max_tokens", -5, "must be at least 1, got -5"),
    ("max_tokens", 0, "must be at least 1, got 0"),
    ("max_completion_tokens", -5, "must be at least 1, got -5"),
    ("seed", 2**64, "must be -1, or between 0 and 4294967295, got 18446744073709551616"),
    ("presence_penalty", 2.5, "must be between -2 and 2, got 2.5"),
    ("frequency_penalty", -3, "must be between -2 and 2, got -3"),
]


@pytest.mark.parametrize(("field", "value", "expected"), OPENAI_OUT_OF_RANGE)
def test_openai_value_out_of_range_is_a_400_naming_field_and_range(
    server: RkllamaServer, field: str, value: float, expected: str
) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, **{field: value})  # type: ignore[call-overload]
    assert error.value.status_code == 400
    assert error.value.body["message"] == f"Invalid request: '{field}' {expected}."  # type: ignore[index]
    if field != "max_completion_tokens":  # a chat field only
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=MODEL, prompt="Hi", **{field: value})  # type: ignore[call-overload]
        assert error.value.status_code == 400
        assert error.value.body["message"] == f"Invalid request: '{field}' {expected}."  # type: ignore[index]


def test_openai_accepts_the_edges_of_its_ranges(server: RkllamaServer) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=120, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1, seed=-1, temperature=2, top_p=1, presence_penalty=-2,
        frequency_penalty=2,
    )  # fmt: skip
    assert reply.usage is not None and reply.usage.completion_tokens == 1


NATIVE_OUT_OF_RANGE = [
    ("temperature", -1, "must be between 0 and 100, got -1"),
    ("top_p", 5, "must be between 0 and 1, got 5"),
    ("top_k", -1, "must be between 0 and 2147483647, got -1"),
    ("max_tokens", -5, "must be at least 1, got -5"),
    ("seed", 2**64, "must be -1, or between 0 and 4294967295, got 18446744073709551616"),
]


@pytest.mark.parametrize(("field", "value", "expected"), NATIVE_OUT_OF_RANGE)
def test_native_generate_value_out_of_range_is_a_400(
    http: httpx.Client, field: str, value: float, expected: str
) -> None:
    response = http.post("/generate", json={"messages": "Say hi.", field: value})
    assert response.status_code == 400, response.text
    assert response.json() == {"error": f"'{field}' {expected}."}


@pytest.mark.parametrize(
    ("create", "expected"),
    [
        ({"parameters": {"temperature": -1}}, "Parameter 'temperature' must be between 0 and 100, got -1."),
        ({"parameters": {"seed": 2**64}},
         "Parameter 'seed' must be -1, or between 0 and 4294967295, got 18446744073709551616."),
        ({"modelfile": "FROM smollm2:135m\nPARAMETER top_p 5"}, "Parameter 'top_p' must be between 0 and 1, got 5."),
        ({"parameters": {"num_thread": 10**9}}, "Parameter 'num_thread' must be between 1 and 1024, got 1000000000."),
        ({"modelfile": "NUM_CTX=1000000000000"},
         "Parameter 'num_ctx' must be between 1 and 1048576, got 1000000000000."),
        ({"modelfile": "FROM smollm2:135m\nPARAMETER num_ctx 1e999"},
         "Parameter 'num_ctx' must be between 1 and 1048576, got inf."),
        ({"modelfile": "FROM smollm2:135m\nPARAMETER top_k " + DEEP},
         "Modelfile: PARAMETER top_k needs a number, got '[[[["),
        ({"modelfile": "FROM smollm2:135m\nPARAMETER seed 1" + "0" * 4999},
         "Modelfile: PARAMETER seed needs a number, got '1000"),
    ],
)  # fmt: skip
def test_create_refuses_parameters_out_of_range(http: httpx.Client, create: dict, expected: str) -> None:
    response = http.post("/api/create", json={"model": "bounded", "from": MODEL, **create})
    assert response.status_code == 400, response.text
    assert error_message(response).startswith(expected)
    assert "bounded:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]


# --- sizes ------------------------------------------------------------------------------------
def test_absurd_max_tokens_is_refused_on_every_dialect(http: httpx.Client) -> None:
    setting = "at most 1048576 tokens, got 1000000000000 (setting RKLLAMA_MAX_TOKENS)."
    cases = [
        ("/generate", {"messages": "Hi", "max_tokens": 10**12}, "max_tokens"),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 10**12}}, "options.num_predict"),
        ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"num_predict": 10**12}}, "options.num_predict"),
        ("/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 10**12}, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_completion_tokens": 10**12},
         "max_completion_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 10**12}, "max_tokens"),
    ]  # fmt: skip
    for path, body, field in cases:
        response = http.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert error_message(response) == f"'{field}' must be {setting}", path


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_default_limits_refuse_too_many_of_each(http: httpx.Client) -> None:
    many_messages = [{"role": "user", "content": "x"}] * 4097
    response = http.post("/api/chat", json={"model": MODEL, "messages": many_messages})
    assert response.status_code == 400
    assert error_message(response) == (
        "'messages' holds 4097 messages; at most 4096 are allowed (setting RKLLAMA_MAX_MESSAGES)."
    )
    response = http.post("/v1/embeddings", json={"model": MODEL, "input": ["hi"] * 3000})
    assert response.status_code == 400
    assert error_message(response) == (
        "'input' holds 3000 inputs; at most 2048 are allowed (setting RKLLAMA_MAX_EMBED_INPUTS)."
    )
    response = http.post("/api/embed", json={"model": MODEL, "input": ["hi"] * 3000})
    assert response.status_code == 400
    assert "'input' holds 3000 inputs; at most 2048" in error_message(response)
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": [TOOL] * 129})
    assert response.status_code == 400
    assert error_message(response) == "'tools' holds 129 tools; at most 128 are allowed (setting RKLLAMA_MAX_TOOLS)."
    response = http.post("/api/chat", json={"model": MODEL, "messages": ASK, "options": {"stop": ["a"] * 33}})
    assert response.status_code == 400
    assert error_message(response) == (
        "'options.stop' holds 33 stop strings; at most 32 are allowed (setting RKLLAMA_MAX_STOP_STRINGS)."
    )
    response = http.post("/generate", json={"messages": "Hi", "stop": ["ok", "x" * 257]})
    assert response.status_code == 400
    assert error_message(response) == (
        "'stop.1' is 257 characters long; at most 256 are allowed (setting RKLLAMA_MAX_STOP_CHARS)."
    )


def test_too_many_images_are_refused_before_images_are(http: httpx.Client) -> None:
    image = "iVBORw0KGgo="
    response = http.post("/api/chat", json={"model": MODEL, "messages": [{**ASK[0], "images": [image] * 17}]})
    assert response.status_code == 400
    assert error_message(response) == (
        "The request holds 17 images; at most 16 are allowed (setting RKLLAMA_MAX_IMAGES)."
    )
    response = http.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "images": [image] * 17})
    assert error_message(response).startswith("The request holds 17 images; at most 16")
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [part] * 17}]})  # fmt: skip  # noqa: E501
    assert response.status_code == 400
    assert error_message(response).startswith("The request holds 17 images; at most 16")


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """A private server whose size settings are small, set through the environment."""
    env = {"RKLLAMA_MAX_PROMPT_CHARS": "1000", "RKLLAMA_MAX_MESSAGES": "3", "RKLLAMA_MAX_TOKENS": "50",
           "RKLLAMA_MAX_EMBED_INPUTS": "2", "RKLLAMA_MAX_TOOLS": "1", "RKLLAMA_MAX_STOP_STRINGS": "1",
           "RKLLAMA_MAX_STOP_CHARS": "4", "RKLLAMA_MAX_IMAGES": "1"}  # fmt: skip
    models = make_models_dir(tmp_path_factory.mktemp("models"))
    server = RkllamaServer(models, tmp_path_factory.mktemp("log") / "server.log", env=env).wait_ready()
    yield server
    server.stop()


def test_size_settings_bound_each_dialect(small_limits: RkllamaServer) -> None:
    with small_limits.client() as http:
        long = "x" * 1001
        cases = [
            ("/generate", {"messages": long}, "The prompt is 1001 characters long; at most 1000 are allowed"),
            ("/api/generate", {"model": MODEL, "prompt": "x" * 600, "system": "y" * 401},
             "The prompt is 1001 characters long; at most 1000"),
            ("/v1/completions", {"model": MODEL, "prompt": long}, "The prompt is 1001 characters long"),
            ("/v1/chat/completions", {"model": MODEL, "messages": ASK * 4}, "'messages' holds 4 messages; at most 3"),
            ("/api/chat", {"model": MODEL, "messages": ASK, "options": {"num_predict": 51}},
             "'options.num_predict' must be at most 50 tokens, got 51"),
            ("/v1/embeddings", {"model": MODEL, "input": ["a", "b", "c"]}, "'input' holds 3 inputs; at most 2"),
            ("/api/embed", {"model": MODEL, "input": ["a", long]}, "'input.1' is 1001 characters long; at most 1000"),
            ("/api/embeddings", {"model": MODEL, "prompt": long}, "'prompt' is 1001 characters long; at most 1000"),
            ("/v1/chat/completions", {"model": MODEL, "messages": ASK, "stop": ["a", "b"]},
             "'stop' holds 2 stop strings; at most 1"),
            ("/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"stop": "abcde"}},
             "'options.stop' is 5 characters long; at most 4"),
            ("/api/chat", {"model": MODEL, "messages": ASK, "tools": [TOOL] * 2},
             "'tools' holds 2 tools; at most 1"),
            ("/api/generate", {"model": MODEL, "prompt": "Hi", "images": ["a", "b"]},
             "The request holds 2 images; at most 1"),
        ]  # fmt: skip
        for path, body, expected in cases:
            response = http.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            assert expected in error_message(response), (path, error_message(response))
        # At the limits, the same requests are served.
        reply = http.post("/generate", json={"messages": "x" * 900, "max_tokens": 1})
        assert reply.status_code == 200, reply.text
        reply = http.post("/api/chat", json={"model": MODEL, "messages": ASK * 3, "stream": False,
                                             "options": {"num_predict": 1, "stop": ["abcd"]}})  # fmt: skip
        assert reply.status_code == 200, reply.text


def test_a_bad_size_setting_stops_the_server_with_a_clear_message(tmp_path) -> None:
    server = RkllamaServer(tmp_path / "models", tmp_path / "server.log", env={"RKLLAMA_MAX_MESSAGES": "lots"})
    try:
        assert server.process.wait(60) != 0
        assert "RKLLAMA_MAX_MESSAGES must be a whole number, got 'lots'." in server.log()
    finally:
        server.stop()
