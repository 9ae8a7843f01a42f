"""A bounded, seeded schemathesis run against the real server: every operation of
/openapi.json gets requests generated from its documented body (valid ones, and with
`mode: all` invalid ones too), and every answer must be no 5xx, a documented status and
content type, and a body that matches the documented schema (streams: every line/event).

Kept cheap and harmless (`cheap_and_harmless`): generations are capped at a few tokens and use
the default model, `num_ctx` is left out (a new context reloads the model), deletes aim at
names that cannot exist, and pulls reach only the hub emulator (HF_ENDPOINT).

The longer run (docs/testing.md):

    RKLLAMA_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import RkllamaServer, make_models_dir
from hub_emulator import HubEmulator
from rkllama.app import create_app
from rkllama.settings import Settings
from rkllama.store.default_model import DEFAULT_MODEL_NAME

EXAMPLES = int(os.environ.get("RKLLAMA_FUZZ_EXAMPLES", "5"))
SEED = int(os.environ.get("RKLLAMA_FUZZ_SEED", "20261125"))
MODEL = "smollm2:135m"
MAX_TOKENS = 3
GENERATING = {"/generate", "/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"}
EMBEDDING = {"/api/embed", "/api/embeddings", "/v1/embeddings"}
DELETING = {"/rm", "/api/delete"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """A private server (the fuzzer loads, unloads, copies and creates models) whose hub is
    the emulator, so a generated pull never leaves the machine."""
    with HubEmulator() as hub:
        root = tmp_path_factory.mktemp("fuzz")
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        srv = RkllamaServer(make_models_dir(root / "models"), root / "server.log", env=env).wait_ready()
        yield srv
        srv.stop()


def _cap(container: dict[str, Any], key: str, *, default: bool) -> None:
    value = container.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
        container[key] = MAX_TOKENS
    elif default and key not in container:
        container[key] = MAX_TOKENS


def cheap_and_harmless(path: str, body: Any) -> Any:
    """Generated bodies, kept within what a 2-core test machine can answer in a minute."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if path in GENERATING | EMBEDDING and isinstance(body.get("model"), str):
        body["model"] = MODEL  # model names are fuzzed on show, copy, load, models/{id}
    if path == "/generate":
        _cap(body, "max_tokens", default=True)
    elif path in ("/api/generate", "/api/chat"):
        options = body.get("options")
        if options is None or isinstance(options, dict):
            options = dict(options or {})
            _cap(options, "num_predict", default=True)
            if isinstance(options.get("num_ctx"), int) and options["num_ctx"] > 0:
                del options["num_ctx"]  # each new context reloads the model
            body["options"] = options
    elif path in ("/v1/chat/completions", "/v1/completions"):
        _cap(body, "max_completion_tokens", default=False)
        _cap(body, "max_tokens", default="max_completion_tokens" not in body)
    elif path in EMBEDDING:
        if isinstance(body.get("options"), dict):
            body["options"] = {k: v for k, v in body["options"].items() if k != "num_ctx"}
        if isinstance(body.get("input"), list):
            body["input"] = body["input"][:8]
    elif path in DELETING:
        for key in ("model", "name"):
            if isinstance(body.get(key), str):
                body[key] = "absent-" + body[key]  # never the model the other operations use
    return body


def served_schema() -> dict[str, Any]:
    """/openapi.json as the server builds it (the test below checks the real server serves
    the same), so schemathesis can make one test item per operation at collection time."""
    return create_app(Settings(models_dir=Path("/nonexistent/rkllama-models"))).openapi()


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "request-timeout": 120,
        "suppress-health-check": ["all"],
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none", "no-shrink": True},
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": False},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
)
schema = schemathesis.openapi.from_dict(served_schema(), config=CONFIG)


def _documented_item_schema(case: schemathesis.Case, content_type: str) -> dict[str, Any] | None:
    """The schema of one item of a streamed 200: an NDJSON line, or a text/plain chunk."""
    media = case.operation.definition.raw["responses"]["200"].get("content", {})
    entry = media.get(content_type.split(";")[0].strip(), {})
    return entry.get("x-chunk-schema") or (entry.get("schema") if content_type.startswith("application/x-") else None)


@schemathesis.check
def stream_items_conform(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """schemathesis validates JSON bodies and server-sent events itself; NDJSON lines and the
    native API's plain-text chunks are checked here, each against the documented item schema."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code != 200 or not content_type.startswith(("application/x-ndjson", "text/plain")):
        return None
    schema = _documented_item_schema(case, content_type)
    if schema is None:
        return None
    validator = jsonschema_rs.validator_for(schema)
    separator = "\n\n" if content_type.startswith("text/plain") else "\n"
    for item in filter(str.strip, response.text.split(separator)):
        errors = [error.message for error in validator.iter_errors(json.loads(item))]
        assert not errors, f"stream item {item!r} does not match the documented schema: {errors}"
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    stream_items_conform,
]


def test_the_server_serves_the_schema_the_fuzzer_uses(fuzz_server: RkllamaServer) -> None:
    with fuzz_server.client() as client:
        assert client.get("/openapi.json").json() == served_schema()


@schema.parametrize()
def test_generated_requests_get_no_5xx_and_documented_answers(
    case: schemathesis.Case, fuzz_server: RkllamaServer
) -> None:
    # Here rather than in a map_body hook, so the documented examples are capped too.
    case.body = cheap_and_harmless(case.operation.path, case.body)
    if case.operation.path == "/generate":
        # The native /generate answers with the current model: load one (a 400 if it is), or
        # every case after the fuzzed /unload_model would only meet "No model is loaded".
        with fuzz_server.client() as client:
            client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME})
    case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS)


# --- what the fuzzer found, kept as cases of their own -------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/embeddings", {"model": MODEL, "prompt": ""}),
        ("/api/embed", {"model": MODEL, "input": ["Hello", ""]}),
        ("/v1/embeddings", {"model": MODEL, "input": ""}),
    ],
)
def test_an_empty_embedding_input_is_a_clear_400_and_the_runner_stays_sound(
    fuzz_server: RkllamaServer, path: str, body: dict[str, Any]
) -> None:
    with fuzz_server.client() as client:
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "is empty: there is nothing to embed" in (error["message"] if isinstance(error, dict) else error)
        # A failed decode used to corrupt the runner's heap: the next generation died (SIGABRT).
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200


def test_an_empty_raw_prompt_is_a_clear_400(fuzz_server: RkllamaServer) -> None:
    with fuzz_server.client() as client:
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "The prompt is empty: there is nothing to generate from."
