"""Context size and prompt fitting, as Ollama users expect them (issue 8): the default context is
the model's trained one, a prompt too long is trimmed (oldest messages first) and says so,
`truncate: false` and oversized tools are clear 400s, num_ctx is bounded and a larger one waits
for the model to be idle, and short side tasks do not evict a conversation's cached prefix.

Open WebUI attaches 36 tools (~26 KB of JSON) to every chat: tests/fixtures/tools_36.json is
such a list (about 7,100 tokens with the default model's template).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from conftest import RkllamaServer, module_server

MODEL = "smollm2:135m"
TRAINED = 8192  # SmolLM2-135M's llama.context_length
TOOLS = json.loads((Path(__file__).parent / "fixtures" / "tools_36.json").read_text())
# More tokens than the old default context of 4096, by the tools alone.
TOOL_TOKENS_AT_LEAST = 6000
GREEDY = {"temperature": 0, "seed": 1}
# Long prompts take minutes on a busy 2-core machine.
SLOW = pytest.mark.timeout(1800)


def history(turns: int) -> list[dict[str, str]]:
    """A long conversation: about 80 tokens per turn."""
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: tell me about the number {i} and the sea."})
        messages.append({"role": "assistant", "content": f"The number {i} sailed on a calm sea for many days. " * 3})
    return messages


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    yield from module_server(tmp_path_factory, "context")


@pytest.fixture
def client(srv: RkllamaServer) -> ollama.Client:
    return ollama.Client(host=srv.base_url, timeout=1500)


@pytest.fixture
def http(srv: RkllamaServer) -> Iterator[httpx.Client]:
    with srv.client(timeout=1500) as c:
        yield c


def test_the_default_context_is_the_trained_context(client: ollama.Client, http: httpx.Client) -> None:
    assert client.ps().models[0].context_length == TRAINED
    shown = http.post("/api/show", json={"model": MODEL}).json()
    assert shown["model_info"]["llama.context_length"] == TRAINED
    assert shown["context_length"] == TRAINED


@SLOW
def test_an_open_webui_chat_with_36_tools_answers_with_default_settings(client: ollama.Client) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat(model=MODEL, messages=question, tools=TOOLS, options={"num_predict": 8, **GREEDY})
    assert reply.done and reply.message.role == "assistant"
    assert reply.prompt_eval_count and reply.prompt_eval_count > TOOL_TOKENS_AT_LEAST


@SLOW
def test_the_same_chat_answers_through_the_openai_client(srv: RkllamaServer) -> None:
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", timeout=1500)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        tools=TOOLS,
        max_tokens=8,
        temperature=0,
        seed=1,
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage is not None and reply.usage.prompt_tokens > TOOL_TOKENS_AT_LEAST


def test_a_long_history_drops_the_oldest_messages(srv: RkllamaServer, http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You answer in one word."}, *history(30)]
    messages.append({"role": "user", "content": "Say hi."})
    body = {"model": MODEL, "messages": messages, "stream": False, "options": {"num_ctx": 512, "num_predict": 4}}
    reply = http.post("/api/chat", json=body)
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert done["truncated"] is True and done["truncated_messages"] > 40 and done["truncated_tokens"] == 0
    assert done["prompt_eval_count"] < 512
    assert "oldest messages dropped" in srv.log()
    # A smaller num_ctx runs in the loaded context: no reload.
    assert http.get("/api/ps").json()["models"][0]["context_length"] == TRAINED


def test_a_raw_prompt_too_long_is_cut_from_the_front(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "word " * 800, "raw": True, "stream": False}
    reply = http.post("/api/generate", json={**body, "options": {"num_ctx": 512, "num_predict": 4}})
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert done["truncated"] is True and done["truncated_messages"] == 0 and done["truncated_tokens"] > 200
    assert done["prompt_eval_count"] <= 512 - 4


def test_truncate_false_refuses_a_prompt_longer_than_the_context(srv: RkllamaServer, http: httpx.Client) -> None:
    messages = [*history(30), {"role": "user", "content": "Say hi."}]
    body = {"model": MODEL, "messages": messages, "stream": False, "truncate": False, "options": {"num_ctx": 512}}
    reply = http.post("/api/chat", json=body)
    assert reply.status_code == 400
    assert "more than the model's context of 512, and truncate is false" in reply.json()["error"]
    generate = {"model": MODEL, "prompt": "word " * 800, "truncate": False, "options": {"num_ctx": 512}}
    reply = http.post("/api/generate", json=generate)
    assert reply.status_code == 400 and "truncate is false" in reply.json()["error"]
    # The native API's equivalent, against the whole loaded context.
    reply = http.post("/generate", json={"messages": "word " * 9000, "truncate": False, "max_tokens": 2})
    assert reply.status_code == 400 and f"context of {TRAINED}, and truncate is false" in reply.json()["error"]
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 9000}], extra_body={"truncate": False}
        )
    assert "truncate is false" in error.value.body["message"]


def test_tool_definitions_that_do_not_fit_are_a_400_saying_so(client: ollama.Client) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model=MODEL, messages=question, tools=TOOLS, options={"num_ctx": 2048})
    assert error.value.status_code == 400
    assert "The tool definitions alone are" in error.value.error
    assert "more than the context of 2048" in error.value.error


@pytest.mark.parametrize("num_ctx", [TRAINED + 1, 2147483648, 1000000000000, 0, -1])
def test_num_ctx_outside_the_trained_context_is_a_400(client: ollama.Client, num_ctx: int) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.generate(model=MODEL, prompt="Hi", options={"num_ctx": num_ctx, "num_predict": 1})
    assert error.value.status_code == 400
    assert error.value.error == (
        f"'num_ctx' must be between 1 and {TRAINED} (the model's trained context), got {num_ctx}."
    )


@SLOW
def test_a_follow_up_beside_side_tasks_reuses_its_cached_prefix(client: ollama.Client, srv: RkllamaServer) -> None:
    """Open WebUI's second turn: title/tags/follow-up tasks and the next chat turn at once.
    The side tasks start first; the chat's cached 7,000-token prefix must survive them."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat(model=MODEL, messages=first, tools=TOOLS, options={"num_predict": 8, **GREEDY})
    follow_up = [*first, {"role": "assistant", "content": answer.message.content}]
    follow_up.append({"role": "user", "content": "And of Spain?"})
    side_tasks = [f"Suggest {n} short titles for a chat about capitals, as a JSON list." for n in (3, 4, 5)]
    started = threading.Barrier(len(side_tasks) + 1)

    def side_task(prompt: str) -> int:
        stream = client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            options={"num_predict": 150, "temperature": 0.7, "seed": 3},
        )
        count = 0
        for count, _chunk in enumerate(stream, 1):
            if count == 1:
                started.wait()  # it holds a slot now
        return count

    with ThreadPoolExecutor(len(side_tasks)) as pool:
        futures = [pool.submit(side_task, prompt) for prompt in side_tasks]
        started.wait()
        reply = client.chat(model=MODEL, messages=follow_up, tools=TOOLS, options={"num_predict": 8, **GREEDY})
        assert all(f.result() >= 1 for f in futures)
    assert reply.done
    # Only the new turn was evaluated; the tools alone are more than 6,000 tokens.
    assert reply.prompt_eval_count is not None and 0 < reply.prompt_eval_count < 200


def test_the_same_prompt_again_reuses_its_cache_though_its_answer_was_longer(start_server) -> None:
    """A regenerated answer (or a client asking again) finds its whole prompt cached, followed
    by the earlier answer; it must continue that cache, not re-read the prompt in an empty slot."""
    client = ollama.Client(host=start_server().base_url, timeout=600)
    prompt = "Write a long story about a dragon who learns to bake bread."
    options = {"num_predict": 96, **GREEDY}
    first = client.generate(model=MODEL, prompt=prompt, options=options)
    assert first.eval_count == 96  # the cached answer is longer than the prompt
    assert first.prompt_eval_count is not None and first.prompt_eval_count < 96
    again = client.generate(model=MODEL, prompt=prompt, options=options)
    assert again.prompt_eval_count == 1  # only the last prompt token, for fresh logits


def test_new_chats_sharing_a_short_system_prompt_reuse_its_cache(start_server) -> None:
    """A new chat takes an empty slot, so the caches of earlier chats survive it; the system
    prompt it shares with one of them is read from that chat's cells, not evaluated again
    (before, a shared prefix under 64 tokens was evaluated again in every slot)."""
    client = openai.OpenAI(base_url=f"{start_server().base_url}/v1", api_key="unused")
    system = {"role": "system", "content": "You are a storyteller who writes long stories for children."}
    replies = [
        client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=96, temperature=0
        )
        for question in ("Write a long story about a dragon who learns to bake bread.", "Name a fruit.")
    ]
    first, second = (reply.usage for reply in replies)
    # The first answer is long: the second chat would throw away more of that cache than it
    # reuses, so it goes to an empty slot.
    assert first.completion_tokens == 96 and first.prompt_tokens_details.cached_tokens == 0
    # The template's system header and the system prompt: more than a dozen tokens.
    assert 12 <= second.prompt_tokens_details.cached_tokens < second.prompt_tokens


def test_a_larger_num_ctx_waits_for_the_busy_model_and_reloads_it(start_server) -> None:
    """A request without num_ctx is answering when one needing a larger context arrives: the
    second waits for the first to finish, the model is reloaded, and both get 200."""
    srv = start_server(args=["--context-length", "1024"])
    client = ollama.Client(host=srv.base_url, timeout=1500)
    assert client.ps().models[0].context_length == 1024
    long_prompt = "Count the words: " + "tree " * 1200  # more than 1024 tokens
    results: dict[str, object] = {}
    first_chunk = threading.Event()

    def busy() -> None:
        chunks = client.generate(model=MODEL, prompt="Tell a long story.", stream=True, options={"num_predict": 200})
        for chunk in chunks:
            first_chunk.set()
            results["busy"] = chunk
        first_chunk.set()

    worker = threading.Thread(target=busy)
    worker.start()
    assert first_chunk.wait(600)
    larger = client.generate(model=MODEL, prompt=long_prompt, options={"num_ctx": 2048, "num_predict": 2, **GREEDY})
    worker.join()
    assert results["busy"].done  # the first one finished normally (no error in its stream)
    assert larger.done and larger.prompt_eval_count > 1024  # answered at the new size, untrimmed
    assert client.ps().models[0].context_length == 2048
    assert "Waiting for SmolLM2-135M-Instruct to be idle to reload it with a context of 2048" in srv.log()


def test_keep_alive_0_while_busy_unloads_once_the_requests_end(start_server) -> None:
    """Open WebUI's unload can arrive while a side task still runs: the model goes when it ends."""
    srv = start_server()
    client = ollama.Client(host=srv.base_url, timeout=1500)
    first_chunk, done = threading.Event(), threading.Event()

    def busy() -> None:
        stream = client.generate(model=MODEL, prompt="Tell a long story.", stream=True, options={"num_predict": 60})
        for _chunk in stream:
            first_chunk.set()
        done.set()

    worker = threading.Thread(target=busy)
    worker.start()
    assert first_chunk.wait(600)
    assert client.generate(model=MODEL, prompt="", keep_alive=0).done_reason == "unload"
    worker.join()
    assert done.is_set()
    deadline = time.monotonic() + 60
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []
