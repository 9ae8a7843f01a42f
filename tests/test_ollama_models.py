"""Ollama calls that change the models dir or what is loaded (copy, create, delete, pull,
keep_alive, num_ctx), through the official `ollama` client, on a private server whose
hub is the emulator on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from conftest import RkllamaServer, make_models_dir
from faults_support import wait_until
from hub_emulator import HubEmulator
from rkllama.store.default_model import DEFAULT_MODEL_NAME, packaged_default_model

DEFAULT = f"{DEFAULT_MODEL_NAME}:latest"
SHORT = {"num_predict": 4, "temperature": 0}


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def private(hub: HubEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    root = tmp_path_factory.mktemp("ollama-models")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    srv = RkllamaServer(make_models_dir(root / "models"), root / "server.log", env=env).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def client(private: RkllamaServer) -> ollama.Client:
    return ollama.Client(host=private.base_url, timeout=120)


def names(client: ollama.Client) -> list[str]:
    return sorted(m.model or "" for m in client.list().models)


def running(client: ollama.Client) -> list[str]:
    return [m.model or "" for m in client.ps().models]


def test_copy_create_chat_delete(client: ollama.Client, private: RkllamaServer) -> None:
    assert client.copy(DEFAULT, "mine:v1").status == "success"
    assert names(client) == sorted([DEFAULT, "mine:v1"])
    assert client.show("mine:v1").details.quantization_level == "Q4_1"
    with pytest.raises(ollama.ResponseError) as error:
        client.copy(DEFAULT, "mine:v1")
    assert error.value.status_code == 409 and "already exists" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        client.copy(DEFAULT, "../outside")
    assert error.value.status_code == 400 and "one file or folder name" in error.value.error
    assert not (private.models_dir.parent / "outside").exists()

    created = client.create(
        model="pirate", from_="mine:v1", system="You are a pirate.", parameters={"temperature": 0.2, "stop": ["END"]}
    )
    assert created.status == "success"
    shown = client.show("pirate")
    assert 'SYSTEM """You are a pirate."""' in shown.modelfile
    assert "temperature 0.2" in shown.parameters and 'stop "END"' in shown.parameters

    # Naming another model loads it (evicting the default: one model at a time), and it
    # becomes the native API's current model.
    reply = client.chat(model="pirate", messages=[{"role": "user", "content": "Hello"}], options=SHORT)
    assert reply.eval_count == 4 and reply.load_duration and reply.load_duration > 0
    assert running(client) == ["pirate:latest"]
    with private.client() as http:
        assert http.get("/current_model").json() == {"model_name": "pirate"}

    assert client.delete("mine:v1").status == "success"
    assert client.delete("pirate").status == "success"  # loaded: unloaded first
    assert names(client) == [DEFAULT] and running(client) == []
    with pytest.raises(ollama.ResponseError) as error:
        client.delete("pirate")
    assert error.value.status_code == 404 and error.value.error == "model 'pirate' not found"
    # The default model's file is intact (the copies were hard links).
    assert client.generate(model=DEFAULT, prompt="Hi", options=SHORT).eval_count == 4


def test_create_from_modelfile_text(client: ollama.Client, private: RkllamaServer) -> None:
    ollama_syntax = 'FROM smollm2:135m\nPARAMETER temperature 0.1\nPARAMETER stop "END"\nSYSTEM """Be\nterse."""\n'
    rkllama_syntax = 'FROM="SmolLM2-135M-Instruct.Q4_1.gguf"\nTEMPERATURE=0.3\nSYSTEM="Be kind."\n'
    with private.client() as http:
        for name, text in (("terse", ollama_syntax), ("kind", rkllama_syntax)):
            response = http.post("/api/create", json={"model": name, "modelfile": text, "stream": False})
            assert response.status_code == 200, response.text
        refused = http.post("/api/create", json={"model": "t", "modelfile": "FROM smollm2:135m\nTEMPLATE {{ x }}"})
        assert refused.status_code == 400 and "TEMPLATE" in refused.json()["error"]
    terse = client.show("terse")
    assert "temperature 0.1" in terse.parameters and 'stop "END"' in terse.parameters
    assert 'SYSTEM """Be\nterse."""' in terse.modelfile
    assert "temperature 0.3" in client.show("kind:latest").parameters
    assert client.delete("terse").status == "success" and client.delete("kind").status == "success"
    with pytest.raises(ollama.ResponseError) as error:
        client.create(model="x", from_="no-such-model")
    assert error.value.status_code == 404 and error.value.error == "model 'no-such-model' not found"
    assert names(client) == [DEFAULT]


def test_keep_alive(client: ollama.Client) -> None:
    loaded = client.generate(model=DEFAULT, prompt="")  # an empty prompt only loads
    assert loaded.done and loaded.done_reason == "load"
    assert running(client) == [DEFAULT]

    reply = client.generate(model=DEFAULT, prompt="Hi", options=SHORT, keep_alive=0)
    assert reply.eval_count == 4
    assert running(client) == []  # unloaded once answered

    client.chat(model=DEFAULT, messages=[{"role": "user", "content": "Hi"}], options=SHORT, keep_alive=-1)
    forever = client.ps().models[0].expires_at
    assert forever is not None and forever.year > 2100

    # Loaded (the reply says so; asking /api/ps after it would race the 1 s), then unloaded.
    assert client.generate(model=DEFAULT, prompt="", keep_alive="1s").done_reason == "load"
    assert wait_until(lambda: running(client) == [])  # the sweeper unloads it

    unloaded = client.generate(model=DEFAULT, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and running(client) == []


def test_num_ctx_reloads_the_model(client: ollama.Client) -> None:
    client.generate(model=DEFAULT, prompt="", keep_alive=0)  # a request loading it sets its context
    client.generate(model=DEFAULT, prompt="Hi", options={**SHORT, "num_ctx": 1024})
    assert client.ps().models[0].context_length == 1024
    client.generate(model=DEFAULT, prompt="Hi", options=SHORT)  # no num_ctx: kept as loaded
    assert client.ps().models[0].context_length == 1024
    client.generate(model=DEFAULT, prompt="Hi", options={**SHORT, "num_ctx": 4096})
    assert client.ps().models[0].context_length == 4096
    client.generate(model=DEFAULT, prompt="Hi", options={**SHORT, "num_ctx": 1024})  # smaller: runs in 4096
    assert client.ps().models[0].context_length == 4096


def test_pull_from_the_hub(client: ollama.Client, hub: HubEmulator) -> None:
    source = packaged_default_model()
    assert source is not None
    hub.add_file("test-user/tiny-chat", "tiny-chat.gguf", Path(source))
    parts = list(client.pull("hf/test-user/tiny-chat/tiny-chat.gguf", stream=True))
    assert parts[-1].status == "success"
    progress = [p for p in parts if p.total]
    assert progress and progress[-1].completed == progress[-1].total == source.stat().st_size
    listed = {m.model: m for m in client.list().models}
    assert listed["tiny-chat:latest"].details.family == "llama"
    assert client.chat(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], options=SHORT).eval_count == 4

    with pytest.raises(ollama.ResponseError) as error:
        client.pull("hf/test-user/missing-repo/model.gguf")
    assert error.value.status_code == 400 and "not found" in error.value.error
    assert client.delete("tiny-chat").status == "success"
    assert names(client) == [DEFAULT]
