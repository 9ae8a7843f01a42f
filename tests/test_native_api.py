"""The spec's endpoints, their documented answers and errors, through the real server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from faults_support import wait_until
from rkllama.store.default_model import DEFAULT_MODEL_NAME, packaged_default_model

NO_MODEL = {"error": "No model is currently loaded."}
GREEDY = {"temperature": 0, "seed": 7}
# A question the 135M default model answers correctly when greedy.
FRANCE = "What is the capital of France? Answer in one word."


def generate(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/generate", json={"stream": False, **body})


def stream_chunks(client: httpx.Client, **body) -> list[dict]:
    """Read a streamed /generate the way a blank-line reader does."""
    with client.stream("POST", "/generate", json={"stream": True, **body}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    assert raw.endswith("\n\n")
    return [json.loads(part) for part in raw.split("\n\n") if part]


# --- GET / and /models ----------------------------------------------------------------


def test_home_is_the_documented_welcome(server):
    with server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Welcome to RK-LLama!", "github": "https://github.com/notpunhnox/rkllama"}


def test_models_lists_folders_and_flat_files(start_server, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.link(packaged_default_model(), models / "flat.gguf")
    (models / "notes.txt").write_text("not a model")
    (models / "half.gguf.part").write_bytes(b"partial download")
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        response = client.get("/models")
    assert response.status_code == 200
    assert response.json() == {"models": ["flat.gguf"]}


def test_models_dir_missing_is_the_documented_500(start_server, tmp_path):
    models = tmp_path / "gone"
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    models.rmdir()
    with srv.client() as client:
        response = client.get("/models")
    assert response.status_code == 500
    assert response.json() == {"error": f"The directory {models} is not found."}


# --- load / unload / current ------------------------------------------------------------


def test_current_model_is_the_default_model(server):
    with server.client() as client:
        response = client.get("/current_model")
    assert response.status_code == 200
    assert response.json() == {"model_name": DEFAULT_MODEL_NAME}


def test_load_while_loaded_is_refused(server):
    with server.client() as client:
        response = client.post("/load_model", json={"model_name": "model1.rkllm"})
    assert response.status_code == 400
    assert response.json() == {"error": "A model is already loaded. Please unload it first."}


def test_load_unload_cycle_and_documented_errors(start_server):
    srv = start_server()
    with srv.client() as client:
        unload = client.post("/unload_model")
        assert (unload.status_code, unload.json()) == (200, {"message": "Model unloaded successfully."})
        assert (client.get("/current_model").status_code, client.get("/current_model").json()) == (404, NO_MODEL)
        again = client.post("/unload_model")
        assert (again.status_code, again.json()) == (400, NO_MODEL)
        no_model = generate(client, messages="Hello")
        assert (no_model.status_code, no_model.json()) == (400, NO_MODEL)

        missing = client.post("/load_model", json={"model_name": "model1.rkllm"})
        assert missing.status_code == 400
        assert missing.json() == {"error": "Model model1.rkllm not found in the /models directory."}

        loaded = client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME})
        assert loaded.status_code == 200
        assert loaded.json() == {"message": f"Model {DEFAULT_MODEL_NAME} loaded successfully."}
        assert client.get("/current_model").json() == {"model_name": DEFAULT_MODEL_NAME}
        assert generate(client, messages="Hello", max_tokens=3).status_code == 200


def test_unload_ends_the_runner_process(start_server):
    srv = start_server()
    pids = srv.runner_pids()
    assert len(pids) == 1
    with srv.client() as client:
        assert client.post("/unload_model").status_code == 200
    assert srv.runner_pids() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "Please enter the name of the model"),
        (b'{"model_name": 5}', "'model_name' must be a string"),
    ],
)
def test_load_model_bad_bodies(server, body, fragment):
    with server.client() as client:
        response = client.post("/load_model", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_failed_load_leaves_the_server_serving(start_server):
    srv = start_server(args=["--no-default"], expect_model=False)
    (srv.models_dir / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with srv.client() as client:
        broken = client.post("/load_model", json={"model_name": "broken.gguf"})
        assert broken.status_code == 400
        assert "broken.gguf" in broken.json()["error"]
        assert client.get("/current_model").status_code == 404
        assert client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME}).status_code == 200
        assert generate(client, messages="Hi", max_tokens=2).status_code == 200


def test_no_default_starts_with_nothing_loaded(start_server, tmp_path):
    srv = start_server(models_dir=tmp_path / "empty", args=["--no-default"], expect_model=False)
    with srv.client() as client:
        assert client.get("/models").json() == {"models": []}
        assert client.get("/current_model").status_code == 404


def test_first_start_installs_and_loads_the_default_model(start_server, tmp_path):
    models = tmp_path / "fresh"
    srv = start_server(models_dir=models)
    with srv.client() as client:
        assert client.get("/models").json() == {"models": [DEFAULT_MODEL_NAME]}
        assert client.get("/current_model").json() == {"model_name": DEFAULT_MODEL_NAME}
    assert (models / DEFAULT_MODEL_NAME / "Modelfile").is_file()


# --- generate -----------------------------------------------------------------------------


def test_generate_non_stream_shape_and_usage(server):
    with server.client() as client:
        response = generate(client, messages="Hello, how are you?", max_tokens=12)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "object", "created", "choices", "usage"}
    assert body["id"] == body["object"] == "rkllm_chat"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["role"] == "assistant"
    assert choice["content"].strip()
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["tokens_per_second"] > 0


def test_generate_max_tokens_gives_length(server):
    with server.client() as client:
        body = generate(client, messages="Write a long poem about the sea.", max_tokens=4, **GREEDY).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_stream_framing_and_usage_match_non_stream(server):
    prompt = [{"role": "user", "content": FRANCE}]
    with server.client() as client:
        whole = generate(client, messages=prompt, max_tokens=16, **GREEDY).json()
        chunks = stream_chunks(client, messages=prompt, max_tokens=16, **GREEDY)
    assert len(chunks) >= 2
    for chunk in chunks[:-1]:
        assert chunk["id"] == "rkllm_chat"
        assert chunk["choices"][0]["finish_reason"] is None
        assert chunk["choices"][0]["role"] == "assistant"
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in {"stop", "length"}
    streamed = "".join(c["choices"][0]["content"] for c in chunks)
    assert streamed == whole["choices"][0]["content"]
    assert "Paris" in streamed
    assert last["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert last["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_stream_is_line_readable(server):
    """Each chunk is one JSON object on its own line followed by a blank line."""
    with (
        server.client() as client,
        client.stream(
            "POST", "/generate", json={"messages": "Count to five.", "stream": True, "max_tokens": 6}
        ) as response,
    ):
        lines = list(response.iter_lines())
    non_empty = [line for line in lines if line]
    assert non_empty and all(isinstance(json.loads(line), dict) for line in non_empty)
    assert lines.count("") >= len(non_empty) - 1


def test_stop_strings_end_the_answer(server):
    with server.client() as client:
        free = generate(client, messages=FRANCE, max_tokens=16, **GREEDY).json()
        text = free["choices"][0]["content"]
        assert "Paris" in text
        stopped = generate(client, messages=FRANCE, max_tokens=16, stop=["Paris"], **GREEDY).json()
    assert stopped["choices"][0]["content"] == text[: text.index("Paris")]
    assert stopped["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "'messages' is required"),
        ({"messages": 42}, "'messages' is required"),
        ({"messages": []}, "'messages' is required"),
        ({"messages": [{"content": "hi"}]}, "messages[0]"),
        ({"messages": "hi", "stream": "yes"}, "'stream' must be a boolean"),
        ({"messages": "hi", "temperature": "hot"}, "'temperature' must be a number"),
        ({"messages": "hi", "max_tokens": 1.5}, "'max_tokens' must be an integer"),
        ({"messages": "hi", "stop": [1]}, "'stop' must be a string or a list of strings"),
    ],
)
def test_generate_bad_fields(server, body, fragment):
    with server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_concurrent_generates_each_get_their_own_answer(server):
    prompts = [FRANCE, "What color is the sky?", "What is 2+2?"]
    with server.client() as client:
        expected = [
            generate(client, messages=p, max_tokens=10, **GREEDY).json()["choices"][0]["content"] for p in prompts
        ]

    def ask(prompt: str) -> str:
        with server.client() as client:
            response = generate(client, messages=prompt, max_tokens=10, **GREEDY)
            assert response.status_code == 200
            return response.json()["choices"][0]["content"]

    with ThreadPoolExecutor(max_workers=len(prompts) * 2) as pool:
        answers = list(pool.map(ask, prompts * 2))
    # Each answer opens as its prompt's answer alone did, and the openings tell the prompts
    # apart, so a crossed or mixed answer fails. Only the opening is compared: as with
    # llama-server's cache_prompt, llama.cpp's logits are not bit-identical across batch
    # splits (a reused prefix leaves the last prompt token to a batch of its own), so a near
    # tie several tokens in may go either way ("blue. It" or "blue, but").
    openings = [opening(text) for text in expected]
    assert len(set(openings)) == len(prompts), expected
    assert [opening(text) for text in answers] == openings * 2, answers


def opening(text: str) -> str:
    return " ".join(text.split()[:4])


def test_client_disconnect_stops_generation(start_server):
    srv = start_server()
    with srv.client() as client:
        with client.stream(
            "POST", "/generate", json={"messages": "Tell a very long story.", "stream": True, "max_tokens": 3000}
        ) as response:
            first = next(response.iter_lines())
            assert json.loads(first)["choices"][0]["finish_reason"] is None
        # The server notices the disconnect and tells the runner to stop.
        deadline = time.monotonic() + 30
        while "cancelled; the runner stopped after" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "cancelled; the runner stopped after" in srv.log()
        after = generate(client, messages=FRANCE, max_tokens=8, **GREEDY)
        assert after.status_code == 200 and "Paris" in after.json()["choices"][0]["content"]


# --- a runner that dies ---------------------------------------------------------------------


def test_runner_killed_mid_generation(start_server):
    srv = start_server()
    (runner,) = srv.runner_pids()
    with srv.client() as client:
        with client.stream(
            "POST", "/generate", json={"messages": "Tell a very long story.", "stream": True, "max_tokens": 3000}
        ) as response:
            lines = response.iter_lines()
            assert "finish_reason" in next(lines)
            os.kill(runner, signal.SIGKILL)
            rest = [json.loads(line) for line in lines if line]
        assert "error" in rest[-1]
        assert "SIGKILL" in rest[-1]["error"] and "load it again" in rest[-1]["error"]
        assert client.get("/current_model").json() == NO_MODEL
        assert generate(client, messages="hi").json() == NO_MODEL
        assert client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME}).status_code == 200
        assert generate(client, messages="Hi", max_tokens=3).status_code == 200


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_runner_killed_during_non_stream_request(start_server):
    srv = start_server()
    (runner,) = srv.runner_pids()
    idle = cpu_seconds(runner)

    def kill_once_generating() -> None:
        # Greedy, this prompt runs for ~400 tokens (seconds): kill once the runner is busy.
        deadline = time.monotonic() + 30
        while cpu_seconds(runner) < idle + 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(runner, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_generating)
    killer.start()
    with srv.client() as client:
        response = generate(client, messages="Tell a very long story.", max_tokens=3000, **GREEDY)
        killer.join()
        assert response.status_code == 502
        assert "SIGKILL" in response.json()["error"]
        assert client.get("/").status_code == 200
        assert client.get("/current_model").json() == NO_MODEL


# --- model folders and Modelfile -----------------------------------------------------------------


def model_folder(models: Path, name: str, modelfile: str) -> Path:
    """A model folder holding the default model's weights and the given Modelfile."""
    folder = models / name
    folder.mkdir(parents=True)
    os.link(packaged_default_model(), folder / "weights.gguf")
    (folder / "Modelfile").write_text(modelfile)
    return folder


def test_modelfile_defaults_apply(start_server, tmp_path):
    models = tmp_path / "models"
    model_folder(models, "tiny", 'FROM="weights.gguf"\nMAX_NEW_TOKENS=3\nTEMPERATURE=0\n')
    srv = start_server(models_dir=models, args=["--no-default", "--model", "tiny"])
    with srv.client() as client:
        assert client.get("/models").json() == {"models": ["tiny"]}
        body = generate(client, messages="Write a long poem.").json()
        assert body["usage"]["completion_tokens"] == 3
        assert body["choices"][0]["finish_reason"] == "length"
        # A request's own value wins over the Modelfile's.
        assert generate(client, messages="Write a long poem.", max_tokens=5).json()["usage"]["completion_tokens"] == 5


def test_bad_modelfile_is_a_clear_error(start_server, tmp_path):
    models = tmp_path / "models"
    model_folder(models, "odd", "this line has no equals sign\n")
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        response = client.post("/load_model", json={"model_name": "odd"})
    assert response.status_code == 400
    assert "Modelfile line 1" in response.json()["error"]


# --- rm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_rm_deletes_and_reports_missing(start_server, method):
    srv = start_server()
    with srv.client() as client:
        missing = client.request(method, "/rm", json={"model": "model1.rkllm"})
        assert missing.status_code == 404
        assert missing.json() == {"error": "The model: model1.rkllm cannot be found."}
        # The loaded model is unloaded first, then deleted.
        done = client.request(method, "/rm", json={"model": DEFAULT_MODEL_NAME})
        assert done.status_code == 200
        assert done.json() == {"message": "The model has been successfully deleted."}
        assert client.get("/models").json() == {"models": []}
        assert client.get("/current_model").status_code == 404
    assert not (srv.models_dir / DEFAULT_MODEL_NAME).exists()
    assert srv.runner_pids() == []


def test_rm_without_model_is_400(server):
    with server.client() as client:
        response = client.request("DELETE", "/rm", json={})
    assert response.status_code == 400
    assert "Please specify a model" in response.json()["error"]


# --- names never escape the models dir -------------------------------------------------------------


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A file outside the models dir that an escaping name would reach."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "decoy.gguf"
    os.link(packaged_default_model(), target)
    return target


def test_escaping_names_are_refused(start_server, tmp_path, decoy):
    models = tmp_path / "models"
    models.mkdir()
    (models / "link.gguf").symlink_to(decoy)
    folder = models / "folder"
    folder.mkdir()
    (folder / "inner.gguf").symlink_to(decoy)
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    separator = "a model name is one file or folder name"
    names = {
        "../outside/decoy.gguf": separator,
        str(decoy): separator,
        "link.gguf": "points outside the models directory",
        "folder": "points outside the models directory",
        "..": "hidden files of the models directory",
        "sub/../../outside/decoy.gguf": separator,
    }
    with srv.client() as client:
        assert client.get("/models").json() == {"models": []}
        for name, reason in names.items():
            load = client.post("/load_model", json={"model_name": name})
            assert load.status_code == 400, name
            assert reason in load.json()["error"], name
            for method in ("POST", "DELETE"):
                rm = client.request(method, "/rm", json={"model": name})
                assert rm.status_code == 400 and reason in rm.json()["error"], name
        assert client.get("/current_model").json() == {"error": "No model is currently loaded."}
    assert decoy.is_file() and decoy.stat().st_size > 0


def test_unknown_route_is_json_404(server):
    with server.client() as client:
        response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json() == {"error": "Not found: GET /no/such/route"}


def test_unload_during_generation_stops_it_with_a_clear_error(start_server):
    # No grace: the unload stops what is running at once (tests/test_faults.py: with one).
    srv = start_server(env={"RKLLAMA_UNLOAD_GRACE": "0"})
    with srv.client() as client, srv.client() as other:
        with client.stream(
            "POST", "/generate", json={"messages": "Tell a very long story.", "stream": True, "max_tokens": 3000}
        ) as response:
            lines = response.iter_lines()
            assert "finish_reason" in next(lines)
            assert other.post("/unload_model").status_code == 200
            rest = [json.loads(line) for line in lines if line]
        assert rest[-1] == {"error": f"Model {DEFAULT_MODEL_NAME} was unloaded while answering this request."}
    assert wait_until(lambda: srv.runner_pids() == [])  # the runner exits, soon after the reply


def test_prompt_longer_than_the_context_with_truncate_false_is_a_400(server):
    with server.client() as client:
        response = generate(client, messages="word " * 9000, max_tokens=2, truncate=False)
        assert response.status_code == 400
        assert "more than the model's context of 8192, and truncate is false" in response.json()["error"]
        assert generate(client, messages="Hi", max_tokens=2).status_code == 200


def test_runners_exit_with_the_server_even_when_it_is_killed(start_server):
    srv = start_server()
    (runner,) = srv.runner_pids()
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait()
    # The runner sees its socket close and exits: no orphan holding the model's memory.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(runner, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"runner {runner} outlived the killed server")
