"""Replays, against the real server, the requests Open WebUI sends for a chat (issue 8): the
title task and the tool-laden chat at the same moment, the follow-up turn beside the tag and
follow-up-suggestion tasks, then unloading the model with `keep_alive: 0`. Every answer must be a
well-formed 200, and the follow-up turn must reuse its cached prefix.

The sequence comes from the newest tests/fixtures/open_webui_<version>_requests.json, captured
from the real Open WebUI by e2e/open_webui. Each request is sent once every request that had
ended before it started in the capture has ended here, so what overlapped there overlaps here
and what followed an answer still follows it. Without such a file, the same sequence is built
from tools_36.json as described in the issue. Replies are capped at a few tokens (num_predict,
max_tokens) so the test takes minutes, not hours, on a small machine; nothing else of the
requests is changed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RkllamaServer, module_server

FIXTURES = Path(__file__).parent / "fixtures"
REPLY_CAP = 24
MODEL = "SmolLM2-135M-Instruct:latest"  # Open WebUI adds :latest to the names it lists

pytestmark = pytest.mark.timeout(3600)


def _task(text: str, num_predict: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": False}
    if num_predict:
        body["options"] = {"num_predict": num_predict}
    return body


def _request(seq: int, start: float, end: float, method: str, path: str, body: Any = None) -> dict[str, Any]:
    return {"seq": seq, "t_start_ms": start, "t_end_ms": end, "method": method, "path": path, "body": body}


def synthetic_sequence() -> dict[str, Any]:
    """Open WebUI 0.12.4's requests for two chat turns, as the issue and its notes describe them."""
    tools = json.loads((FIXTURES / "tools_36.json").read_text())
    question = {"role": "user", "content": "What is the capital of France?"}
    answer = {"role": "assistant", "content": "The capital of France is Paris."}
    follow_up = {"role": "user", "content": "And what about Spain?"}
    history = "USER: What is the capital of France?\nASSISTANT: The capital of France is Paris."
    chat = {"model": MODEL, "messages": [question], "tools": tools, "stream": True}
    requests = [
        _request(1, 0, 10, "GET", "/api/version"),
        _request(2, 0, 10, "GET", "/api/tags"),
        _request(3, 0, 10, "GET", "/api/ps"),
        _request(4, 100, 900, "POST", "/api/chat", _task(f"### Task:\nGenerate a concise title.\n{history}", 1000)),
        _request(5, 160, 1000, "POST", "/api/chat", chat),
        _request(6, 1100, 1900, "POST", "/api/chat", _task(f"### Task:\nSuggest 3 follow-up questions.\n{history}")),
        _request(7, 1110, 1900, "POST", "/api/chat", _task(f"### Task:\nGenerate 1-3 broad tags.\n{history}")),
        _request(8, 1150, 2000, "POST", "/api/chat", {**chat, "messages": [question, answer, follow_up]}),
        _request(9, 2100, 2110, "GET", "/api/ps"),
        _request(10, 2200, 2210, "POST", "/api/generate", {"model": MODEL, "keep_alive": 0, "prompt": ""}),
        _request(11, 2300, 2310, "GET", "/api/ps"),
    ]
    return {"open_webui_version": "synthetic (issue 8)", "requests": requests}


def load_sequence() -> dict[str, Any]:
    captured = sorted(FIXTURES.glob("open_webui_*_requests.json"))
    return json.loads(captured[-1].read_text()) if captured else synthetic_sequence()


def is_unload(request: dict[str, Any]) -> bool:
    return request["path"] == "/api/generate" and (request.get("body") or {}).get("keep_alive") == 0


def predecessors(request: dict[str, Any], requests: list[dict[str, Any]]) -> list[int]:
    """The requests that had ended before this one started, in the capture. The unload waits
    for every earlier request that ended at all: the user pressed it once the chat was done
    (on the slow capture machine a side task was still running then)."""
    before = request["t_start_ms"]
    return [
        other["seq"]
        for other in requests
        if other["t_end_ms"] is not None
        and other is not request
        and (other["t_end_ms"] <= before or (is_unload(request) and other["t_start_ms"] < before))
    ]


def capped(path: str, body: Any) -> Any:
    """The body with its reply length capped (the only change made to a replayed request)."""
    if not isinstance(body, dict) or not (body.get("messages") or body.get("prompt")):
        return body
    body = dict(body)
    if path.startswith("/v1/"):
        wanted = body.pop("max_completion_tokens", None) or body.get("max_tokens") or REPLY_CAP
        body["max_tokens"] = min(wanted, REPLY_CAP)
    else:
        options = dict(body.get("options") or {})
        options["num_predict"] = min(options.get("num_predict") or REPLY_CAP, REPLY_CAP)
        body["options"] = options
    return body


def streams(request: dict[str, Any]) -> bool:
    body = request.get("body") or {}
    default = request["path"] in ("/api/chat", "/api/generate")  # Ollama streams unless told not to
    return bool(body.get("stream", default)) if isinstance(body, dict) else False


def send(http: httpx.Client, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request; return its status and final object (the last stream line or event)."""
    path = request["path"] + (f"?{request['query']}" if request.get("query") else "")
    body = capped(request["path"], request.get("body"))
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    if not streams(request):
        response = http.request(request["method"], path, **kwargs)
        return {"request": request, "status": response.status_code, "final": response.json(), "chunks": 1}
    with http.stream(request["method"], path, **kwargs) as response:
        lines = [line for line in response.iter_lines() if line.strip()]
        status = response.status_code
    if request["path"].startswith("/v1/"):
        events = [line.removeprefix("data: ") for line in lines]
        assert events[-1] == "[DONE]", events[-3:]
        objects = [json.loads(e) for e in events[:-1]]
    else:
        objects = [json.loads(line) for line in lines]
    assert all("error" not in o for o in objects), objects[-1]
    return {"request": request, "status": status, "final": objects[-1], "chunks": len(objects)}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    yield from module_server(tmp_path_factory, "replay")


@pytest.fixture(scope="module")
def replayed(srv: RkllamaServer) -> list[dict[str, Any]]:
    requests = sorted(load_sequence()["requests"], key=lambda r: (r["t_start_ms"], r["seq"]))
    ended = {r["seq"]: threading.Event() for r in requests}

    def replay(request: dict[str, Any]) -> dict[str, Any]:
        for seq in predecessors(request, requests):
            assert ended[seq].wait(3000), f"request {seq} never ended"
        try:
            return send(http, request)
        finally:
            ended[request["seq"]].set()

    with srv.client(timeout=3000) as http, ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(replay, requests))


def is_chat_turn(request: dict[str, Any]) -> bool:
    body = request.get("body") or {}
    return request["path"] in ("/api/chat", "/v1/chat/completions") and bool(body.get("tools"))


def test_every_answer_is_a_well_formed_200(replayed: list[dict[str, Any]]) -> None:
    assert [r["status"] for r in replayed] == [200] * len(replayed), [
        (r["request"]["path"], r["status"], r["final"]) for r in replayed if r["status"] != 200
    ]
    for result in replayed:
        request, final = result["request"], result["final"]
        if request["path"] in ("/api/chat", "/api/generate") and request["method"] == "POST":
            assert final["done"] is True, final
            if request["path"] == "/api/chat":
                assert final["message"]["role"] == "assistant"
        if request["path"] == "/api/ps":
            assert all("expires_at" in m and "context_length" in m for m in final["models"])


def test_the_tool_laden_chat_turns_are_answered_in_the_default_context(replayed: list[dict[str, Any]]) -> None:
    turns = [r for r in replayed if is_chat_turn(r["request"]) and r["request"]["path"] == "/api/chat"]
    assert len(turns) >= 2
    assert turns[0]["final"]["prompt_eval_count"] > 4096  # more than the old default context
    assert all(r["final"]["done_reason"] in ("stop", "length") for r in turns)
    for result in replayed:  # through the OpenAI connection: a finished completion
        if is_chat_turn(result["request"]) and result["request"]["path"] == "/v1/chat/completions":
            final = result["final"]
            assert final.get("usage") or final["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_the_follow_up_turn_reuses_its_cached_prefix(replayed: list[dict[str, Any]]) -> None:
    turns = [r for r in replayed if is_chat_turn(r["request"]) and r["request"]["path"] == "/api/chat"]
    first, follow_ups = turns[0], [r for r in turns[1:] if len(r["request"]["body"]["messages"]) > 1]
    assert follow_ups
    for follow_up in follow_ups:
        # Its prompt is longer than the first turn's, yet only the new messages were evaluated.
        assert follow_up["final"]["prompt_eval_count"] * 4 < first["final"]["prompt_eval_count"]
    # Through the OpenAI connection, where the reply carries a usage: most of the prompt was cached.
    for result in replayed:
        usage = result["final"].get("usage") if isinstance(result["final"], dict) else None
        if is_chat_turn(result["request"]) and usage and len(result["request"]["body"]["messages"]) > 1:
            assert usage["prompt_tokens_details"]["cached_tokens"] * 4 > usage["prompt_tokens"] * 3


def test_keep_alive_0_unloads_the_model(replayed: list[dict[str, Any]]) -> None:
    unloads = [i for i, r in enumerate(replayed) if is_unload(r["request"])]
    assert unloads
    assert replayed[unloads[-1]]["final"]["done_reason"] == "unload"
    # /api/ps after the unload, until the next request that loads the model again.
    later = replayed[unloads[-1] + 1 :]
    until = next((i for i, r in enumerate(later) if r["request"]["method"] == "POST"), len(later))
    later_ps = [r for r in later[:until] if r["request"]["path"] == "/api/ps"]
    assert later_ps and all(r["final"]["models"] == [] for r in later_ps)
