"""The shared KV pool (issue 13), as llama-server's default slots (-kvu): a model's sequences share
one KV pool of NUM_CTX cells instead of one context each (KV_UNIFIED=0), and idle sequences'
caches wait in host RAM, not in the pool. What it costs, that every sequence is served, that
a parked conversation continues from its cache, and what happens when the pool is full: a prompt
waits for room, and a generating sequence that finds none is paused until an older one ends,
so every answer finishes whole."""

from __future__ import annotations

import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import pytest

from rkllama.store.default_model import packaged_default_model

KV_BYTES_PER_TOKEN = 30 * 3 * (64 + 64) * 2  # SmolLM2-135M: layers x KV heads x (K+V) x f16
STORY = [{"role": "user", "content": "List numbers."}]
# A grammar that cannot end before 500 numbers: an answer runs to its num_predict (no early EOS).
ENDLESS = {"type": "array", "items": {"type": "integer"}, "minItems": 500}


def pooled_model(models: Path, name: str, modelfile: str, pooled: bool = True) -> Path:
    """A model folder with the default KV layout, one shared pool (or, not `pooled`, a stream per
    sequence: KV_UNIFIED=0)."""
    folder = models / name
    folder.mkdir(parents=True)
    os.link(packaged_default_model(), folder / "weights.gguf")
    (folder / "Modelfile").write_text(f'FROM="weights.gguf"\n{"" if pooled else "KV_UNIFIED=0"}\n{modelfile}')
    return models


def stream_lines(srv, body: dict):
    """The NDJSON objects of a streamed /api/chat, as they arrive."""
    with srv.client() as http, http.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def test_by_default_the_sequences_share_one_pool_and_every_one_is_served(start_server, tmp_path):
    models = pooled_model(tmp_path / "models", "pooled", "NUM_CTX=2048\nNUM_PARALLEL=4\n")
    srv = start_server(models_dir=models, args=["--model", "pooled"])
    with srv.client() as http:
        (loaded,) = http.get("/api/ps").json()["models"]
    assert loaded["kv_unified"] is True and loaded["num_parallel"] == 4 and loaded["context_length"] == 2048
    # Four sequences: one context of KV pool, and at most one more in host RAM for idle caches.
    assert loaded["size"] == packaged_default_model().stat().st_size + 2 * 2048 * KV_BYTES_PER_TOKEN
    client = ollama.Client(host=srv.base_url, timeout=300)
    questions = ["What is the sky?", "Name a fruit.", "Say hello.", "Count to three."]
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda q: client.chat(
                    model="pooled", messages=[{"role": "user", "content": q}], options={"num_predict": 24}
                ),
                questions,
            )
        )
    assert all(reply.done and reply.message.content for reply in replies)


def test_with_kv_unified_0_each_sequence_has_a_context_of_its_own(start_server, tmp_path):
    models = pooled_model(tmp_path / "models", "split", "NUM_CTX=2048\nNUM_PARALLEL=4\n", pooled=False)
    srv = start_server(models_dir=models, args=["--model", "split"])
    with srv.client() as http:
        (loaded,) = http.get("/api/ps").json()["models"]
    assert loaded["kv_unified"] is False and loaded["num_parallel"] == 4
    assert loaded["size"] == packaged_default_model().stat().st_size + 4 * 2048 * KV_BYTES_PER_TOKEN
    reply = ollama.Client(host=srv.base_url, timeout=300).chat(
        model="split", messages=[{"role": "user", "content": "Say hello."}], options={"num_predict": 4}
    )
    assert reply.done and reply.message.content


def test_a_conversation_idle_while_another_fills_the_pool_continues_from_its_cache(start_server, tmp_path):
    """Two conversations of ~400 tokens do not fit a 512-cell pool together. The first is idle
    when the second starts: its cache is parked in host RAM, not dropped, and its next turn
    evaluates only the new message."""
    models = pooled_model(tmp_path / "models", "parking", "NUM_CTX=512\nNUM_PARALLEL=2\n")
    srv = start_server(models_dir=models, args=["--model", "parking"])
    client = ollama.Client(host=srv.base_url, timeout=300)
    options = {"num_predict": 8, "temperature": 0}
    first = [{"role": "user", "content": " ".join(secrets.token_hex(2) for _ in range(90))}]
    answer = client.chat(model="parking", messages=first, options=options)
    assert answer.prompt_eval_count is not None and answer.prompt_eval_count > 250
    second = [{"role": "user", "content": " ".join(secrets.token_hex(2) for _ in range(90))}]
    assert client.chat(model="parking", messages=second, options=options).prompt_eval_count > 250
    follow_up = [*first, {"role": "assistant", "content": answer.message.content}]
    follow_up.append({"role": "user", "content": "And then?"})
    again = client.chat(model="parking", messages=follow_up, options=options)
    assert again.done and again.prompt_eval_count is not None and again.prompt_eval_count < 40


def test_a_prompt_waits_for_room_and_the_running_answer_finishes_whole(start_server, tmp_path):
    # 512 cells for two sequences; per-token stream messages, so tokens can be counted as they come.
    models = pooled_model(tmp_path / "models", "small-pool", "NUM_CTX=512\nNUM_PARALLEL=2\n")
    srv = start_server(models_dir=models, args=["--model", "small-pool"], env={"RKLLAMA_STREAM_BATCH_MS": "0"})
    story = {
        "model": "small-pool",
        "messages": STORY,
        "format": ENDLESS,
        "options": {"num_predict": 300, "temperature": 0},
    }
    # A prompt of ~330 tokens that no cache holds: it fits alone, not beside the story's cells.
    long_prompt = " ".join(secrets.token_hex(2) for _ in range(110))
    question = {
        "model": "small-pool",
        "messages": [{"role": "user", "content": long_prompt}],
        "options": {"num_predict": 4, "temperature": 0},
        "stream": False,
    }
    events: list[str] = []
    story_chunks = stream_lines(srv, story)
    for _ in range(200):  # the story holds ~230 cells now
        chunk = next(story_chunks)
        assert not chunk["done"], "the story ended early"
    with ThreadPoolExecutor(1) as pool:

        def ask() -> dict:
            with srv.client() as http:
                reply = http.post("/api/chat", json=question)
            events.append("question answered")
            return reply.json()

        answered = pool.submit(ask)
        for chunk in story_chunks:
            if chunk["done"]:
                events.append("story done")
                final = chunk
        reply = answered.result()
    assert final["done_reason"] == "length" and final["eval_count"] == 300  # whole, not cut
    assert events == ["story done", "question answered"]  # the prompt waited for room
    assert reply["done"] and reply["prompt_eval_count"] > 256


@pytest.mark.parametrize(
    ("cache_ram", "resumed_from"),
    [("", "its cache parked in host RAM"), ("0", "its cache to be evaluated again")],
    ids=["parked", "evaluated-again"],
)
def test_a_full_pool_pauses_the_newest_answer_and_both_finish_whole(start_server, tmp_path, cache_ram, resumed_from):
    """Two answers of 420 tokens cannot grow side by side in 512 cells. The one started last is
    paused (its cache parked in host RAM, or with CACHE_RAM=0 evaluated again) until the first
    ends, then goes on: both get every token they asked for, and neither sees an error."""
    parking = f"CACHE_RAM={cache_ram}\n" if cache_ram else ""
    models = pooled_model(tmp_path / "models", "tiny-pool", f"NUM_CTX=512\nNUM_PARALLEL=2\n{parking}")
    srv = start_server(models_dir=models, args=["--model", "tiny-pool"])
    options = {"num_predict": 420, "temperature": 0}
    first = stream_lines(srv, {"model": "tiny-pool", "messages": STORY, "format": ENDLESS, "options": options})
    assert not next(first)["done"]  # the first answer runs before the second starts
    other = [{"role": "user", "content": "List other numbers."}]
    second = list(stream_lines(srv, {"model": "tiny-pool", "messages": other, "format": ENDLESS, "options": options}))
    rest = list(first)
    for answer in (second, rest):
        assert not [chunk for chunk in answer if "error" in chunk], answer[-1]
        assert answer[-1]["done"] and answer[-1]["done_reason"] == "length" and answer[-1]["eval_count"] == 420
    # The pool did fill, and the answer started last made way, as the log says.
    assert "KV pool full: pausing the sequence in slot" in srv.log()
    assert f"until another ends ({resumed_from})" in srv.log()
