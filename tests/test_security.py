"""Safe to leave running on a network (issue 9, docs/security.md): with an API key every route
but `GET /` needs it; foreign Hosts and Origins change and read nothing; only JSON-typed bodies
are read; bodies have a size limit; the key may come from a file; an open bind warns.

Each test runs the real server; decoy models are hard-linked copies of the default model in
the test's own models dir, so a refused delete is checked by the decoy still being there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from conftest import RkllamaServer, make_models_dir
from rkllama.store.default_model import DEFAULT_MODEL_NAME

KEY = "sec-key-5d1e9b"
BEARER = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MISSING_KEY = "Missing API key: send the header 'Authorization: Bearer <key>'."
# A closed loopback port: a pull that gets as far as the network fails here, never on the internet.
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}


def plant_decoy(models_dir: Path, name: str) -> Path:
    """A second model folder: the default model's files hard-linked under another name."""
    decoy = models_dir / name
    shutil.copytree(models_dir / DEFAULT_MODEL_NAME, decoy, copy_function=os.link)
    return decoy


def vm_peak_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM): catches a body buffered then freed."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def _server(tmp: Path, args: list[str], api_key: str | None = None) -> RkllamaServer:
    models = make_models_dir(tmp / "models")
    return RkllamaServer(models, tmp / "server.log", args=args, env=NO_HUB, api_key=api_key).wait_ready()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    srv = _server(tmp_path_factory.mktemp("keyed"), ["--api-key", KEY, "--max-body-bytes", "100000"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """No key; one extra allowed Host name and one extra Origin; the default body limit."""
    args = ["--allowed-hosts", "board.example", "--origins", "https://app.example"]
    srv = _server(tmp_path_factory.mktemp("open"), args)
    yield srv
    srv.stop()


# --- 1. the API key guards every route ----------------------------------------------------


def _routes(srv: RkllamaServer) -> list[tuple[str, str]]:
    """Every route the app declares (from its OpenAPI schema) plus the docs pages themselves."""
    with srv.client(headers=BEARER) as http:
        schema = http.get("/openapi.json").json()
    routes = [
        (method.upper(), path.replace("{", "").replace("}", ""))
        for path, operations in schema["paths"].items()
        for method in operations
    ]
    return [*routes, ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]


def test_without_the_key_every_route_but_root_is_refused(keyed: RkllamaServer) -> None:
    routes = _routes(keyed)
    expected = {
        ("GET", "/models"), ("GET", "/current_model"), ("POST", "/load_model"), ("POST", "/unload_model"),
        ("POST", "/generate"), ("POST", "/pull"), ("POST", "/rm"), ("DELETE", "/rm"), ("GET", "/api/tags"),
        ("POST", "/api/chat"), ("DELETE", "/api/delete"), ("POST", "/api/pull"), ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/openapi.json"),
    }  # fmt: skip
    assert expected <= set(routes)
    with keyed.client() as http:
        for method, path in routes:
            if (method, path) in {("GET", "/"), ("GET", "/health")}:  # open: they reveal and change nothing
                continue
            response = http.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            message = error["message"] if path.startswith("/v1/") else error
            assert message == MISSING_KEY, (method, path)
        assert http.get("/").json()["message"] == "Welcome to RK-LLama!"
        assert http.head("/").status_code == 200
        wrong = http.get("/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "Invalid API key."}
    assert "without an API key" not in keyed.log()


def test_with_the_key_every_route_is_served(keyed: RkllamaServer) -> None:
    with keyed.client(headers=BEARER) as http:
        for method, path in _routes(keyed):
            if (method, path) == ("POST", "/unload_model"):
                continue  # below, with its own check
            response = http.request(method, path, json={})
            assert response.status_code not in (401, 403, 413, 415), (method, path, response.text)
        assert http.get("/models").json()["models"] == [DEFAULT_MODEL_NAME]
        assert http.get("/docs").headers["content-type"].startswith("text/html")
        assert http.post("/unload_model").json() == {"message": "Model unloaded successfully."}
        loaded = http.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME})
        assert loaded.json() == {"message": f"Model {DEFAULT_MODEL_NAME} loaded successfully."}
        # X-Api-Key, as llama.cpp's server accepts, works too.
        assert http.get("/current_model", headers={"Authorization": "", "X-Api-Key": KEY}).status_code == 200


def test_without_the_key_rm_and_ollama_delete_leave_the_model(keyed: RkllamaServer) -> None:
    decoy = plant_decoy(keyed.models_dir, "Decoy-keyed")
    with keyed.client() as http:
        for method in ("POST", "DELETE"):
            response = http.request(method, "/rm", json={"model": decoy.name})
            assert response.status_code == 401 and response.json() == {"error": MISSING_KEY}
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=keyed.base_url).delete(decoy.name)
    assert refused.value.status_code == 401 and refused.value.error == MISSING_KEY
    assert (decoy / "Modelfile").is_file()
    ollama.Client(host=keyed.base_url, headers=BEARER).delete(decoy.name)
    assert not decoy.exists()


def test_key_from_a_file_works_and_stays_out_of_the_command_line(start_server, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    srv = start_server(args=["--api-key-file", str(key_file)], api_key=KEY)
    assert KEY.encode() not in Path(f"/proc/{srv.process.pid}/cmdline").read_bytes()
    with srv.client() as http:
        assert http.get("/current_model").json() == {"error": MISSING_KEY}
        assert http.get("/current_model", headers=BEARER).json() == {"model_name": DEFAULT_MODEL_NAME}
    # The `rkllama` client commands read the same file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKLLAMA_API_KEY")}
    command = [sys.executable, "-m", "rkllama", "list", "--host", srv.base_url]
    listed = subprocess.run(command, capture_output=True, text=True, env={**env, "RKLLAMA_API_KEY_FILE": str(key_file)})
    assert listed.returncode == 0 and DEFAULT_MODEL_NAME in listed.stdout, listed.stderr
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "API key" in refused.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"key_file": None}, "Cannot read the API key file"),
        ({"key_file": ""}, "is empty; write the key in it"),
        ({"args": ["--max-body-bytes", "0"]}, "--max-body-bytes must be positive, got 0."),
        ({"env": {"RKLLAMA_MAX_BODY_BYTES": "lots"}}, "RKLLAMA_MAX_BODY_BYTES must be a whole number, got 'lots'."),
    ],
    ids=["key-file-missing", "key-file-empty", "body-limit-zero", "body-limit-not-a-number"],
)
def test_a_bad_security_setting_stops_the_start(tmp_path: Path, setting: dict, message: str) -> None:
    args = setting.get("args", [])
    if "key_file" in setting:
        key_file = tmp_path / "key"
        if setting["key_file"] is not None:
            key_file.write_text(setting["key_file"])
        args = ["--api-key-file", str(key_file)]
    command = [
        sys.executable,
        "-m",
        "rkllama",
        "serve",
        "--no-default",
        "--port",
        "0",
        "--models",
        str(tmp_path),
        *args,
    ]
    env = {**os.environ, **setting.get("env", {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_open_bind_without_a_key_warns(start_server) -> None:
    # Bound to every interface, but the test only talks to 127.0.0.1.
    srv = start_server(args=["--host", "0.0.0.0"])
    assert "Serving on 0.0.0.0 without an API key: anyone who can reach this address" in srv.log()


# --- 2. cross-site requests -----------------------------------------------------------------


def test_text_plain_or_form_bodies_from_a_page_do_not_delete(open_server: RkllamaServer) -> None:
    decoy = plant_decoy(open_server.models_dir, "Decoy-types")
    body = f'{{"model": "{decoy.name}"}}'
    with open_server.client() as http:
        response = http.post("/rm", content=body, headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        assert response.json() == {
            "error": "The request body must be JSON (got Content-Type 'text/plain'); "
            "send it with the header 'Content-Type: application/json'."
        }
        # A form post from a page (it carries an Origin, here an allowed one) is refused too.
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://localhost:5173"}
        response = http.post("/rm", content=body, headers=form)
        assert response.status_code == 415 and "'application/x-www-form-urlencoded'" in response.json()["error"]
        assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert (decoy / "Modelfile").is_file()
    shutil.rmtree(decoy)


def test_spec_curl_examples_work_as_written(open_server: RkllamaServer) -> None:
    """The spec's examples through the real curl (only the address and model names changed),
    and Ollama's docs style `curl -d` with no Content-Type."""
    decoy = plant_decoy(open_server.models_dir, "Decoy-curl")
    url = open_server.base_url

    def curl(*args: str) -> tuple[int, str]:
        command = ["curl", "-s", "-w", "\n%{http_code}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body

    assert curl("-X", "GET", f"{url}/models")[0] == 200
    assert curl("-X", "GET", f"{url}/current_model") == (200, f'{{"model_name":"{DEFAULT_MODEL_NAME}"}}')
    assert curl("-X", "POST", f"{url}/unload_model")[0] == 200
    load = ["-X", "POST", f"{url}/load_model", "-H", "Content-Type: application/json"]
    assert curl(*load, "-d", f'{{"model_name": "{DEFAULT_MODEL_NAME}"}}')[0] == 200
    # max_tokens added only to keep the test short.
    generate = ["-X", "POST", f"{url}/generate", "-H", "Content-Type: application/json"]
    status, body = curl(*generate, "-d", '{"messages": "Hello, how are you?", "stream": false, "max_tokens": 2}')
    assert status == 200 and '"rkllm_chat"' in body
    pull = ["-X", "POST", f"{url}/pull", "-H", "Content-Type: application/json"]
    status, body = curl(*pull, "-d", '{"model": "hf/username/repo/file.rkllm"}')
    assert status in (200, 400) and "must be JSON" not in body and "API key" not in body
    remove = ["-X", "DELETE", f"{url}/rm", "-H", "Content-Type: application/json"]
    assert curl(*remove, "-d", f'{{"model": "{decoy.name}"}}')[0] == 200
    assert not decoy.exists()
    assert curl("-X", "GET", f"{url}/")[0] == 200
    ollama_style = f'{{"model": "{DEFAULT_MODEL_NAME}", "prompt": "Hi", "stream": false, '
    ollama_style += '"options": {"num_predict": 2}}'
    status, body = curl(f"{url}/api/generate", "-d", ollama_style)
    assert status == 200 and '"done":true' in body


def test_foreign_host_is_refused(open_server: RkllamaServer) -> None:
    decoy = plant_decoy(open_server.models_dir, "Decoy-host")
    port = open_server.port
    with open_server.client() as http:
        for method, path, body in (("GET", "/models", None), ("POST", "/rm", {"model": decoy.name})):
            response = http.request(method, path, json=body, headers={"Host": f"evil.example:{port}"})
            assert response.status_code == 403
            assert response.json()["error"].startswith("Host 'evil.example:")
            assert "--allowed-hosts" in response.json()["error"]
        response = http.get("/v1/models", headers={"Host": "evil.example"})
        assert response.status_code == 403 and "--allowed-hosts" in response.json()["error"]["message"]
        allowed = ("localhost", "board.example", "192.168.7.20", "[::1]", "host.docker.internal", "rock5b.local")
        for host in (f"{name}:{port}" for name in allowed):
            assert http.get("/models", headers={"Host": host}).status_code == 200, host
    assert (decoy / "Modelfile").is_file()
    shutil.rmtree(decoy)


def test_foreign_origin_cannot_change_state(open_server: RkllamaServer) -> None:
    decoy = plant_decoy(open_server.models_dir, "Decoy-origin")
    with open_server.client() as http:
        for origin in ("http://evil.example", "null", "http://localhost.evil.example"):
            response = http.post("/rm", json={"model": decoy.name}, headers={"Origin": origin})
            assert response.status_code == 403
            assert response.json() == {
                "error": f"Requests from the web page at origin '{origin}' are refused. "
                f"To allow that origin, start the server with --origins {origin} (RKLLAMA_ORIGINS)."
            }
            assert "access-control-allow-origin" not in response.headers
        unload = http.post("/unload_model", headers={"Origin": "http://evil.example"})
        assert unload.status_code == 403
        # A foreign page's reads are refused too, not only left unreadable by the browser.
        read = http.get("/api/tags", headers={"Origin": "http://evil.example"})
        assert read.status_code == 403 and "'http://evil.example' are refused" in read.json()["error"]
        assert http.get("/current_model").json() == {"model_name": DEFAULT_MODEL_NAME}
    assert (decoy / "Modelfile").is_file()
    shutil.rmtree(decoy)


def test_preflight_answers_allowed_origins_with_themselves(open_server: RkllamaServer) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    with open_server.client() as http:
        for origin in ("http://localhost:5173", "http://127.0.0.1", "https://app.example", "vscode-webview://abc"):
            response = http.options("/api/chat", headers={"Origin": origin, **ask})
            assert response.status_code == 200, origin
            assert response.headers["access-control-allow-origin"] == origin
            assert "POST" in response.headers["access-control-allow-methods"]
        foreign = http.options("/api/chat", headers={"Origin": "https://evil.example", **ask})
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
        assert "'https://evil.example' are refused" in foreign.json()["error"]
        simple = http.get("/api/tags", headers={"Origin": "http://localhost:3000"})
        assert simple.headers["access-control-allow-origin"] == "http://localhost:3000"
        # The server's own pages (e.g. /docs on a LAN address) are same-origin.
        own = f"http://board.example:{open_server.port}"
        same = http.get("/api/version", headers={"Origin": own, "Host": f"board.example:{open_server.port}"})
        assert same.status_code == 200


# --- 4. body size limit ---------------------------------------------------------------------


def test_a_streamed_100_mb_body_is_refused_without_buffering_it(open_server: RkllamaServer) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"a" * (1 << 20)
        yield b'"}]}'

    before = vm_peak_kib(open_server.process.pid)
    with open_server.client() as http:
        response = http.post("/api/chat", content=body(), headers=JSON)
        assert response.status_code == 413
        assert response.json()["error"].startswith("The request body is larger than the limit of 33554432 bytes")
        assert "--max-body-bytes" in response.json()["error"]
        assert http.get("/models").status_code == 200
    # At most the 32 MiB limit is read before the refusal; reading 100 MB took 200+ MB.
    assert vm_peak_kib(open_server.process.pid) - before < 80 * 1024


def test_a_declared_length_over_the_limit_is_refused_up_front(open_server: RkllamaServer) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(40):
            yield b"a" * (1 << 20)

    before = vm_peak_kib(open_server.process.pid)
    headers = {**JSON, "Content-Length": str(40 << 20)}
    with open_server.client() as http:
        response = http.post("/v1/chat/completions", content=body(), headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("The request body is larger than the limit")
    assert vm_peak_kib(open_server.process.pid) - before < 16 * 1024


def test_the_body_limit_is_a_setting(keyed: RkllamaServer) -> None:
    big = {"model": DEFAULT_MODEL_NAME, "prompt": "a" * 200_000}
    with keyed.client() as http:
        assert http.post("/api/generate", json=big).status_code == 401  # the key comes first
        response = http.post("/api/generate", json=big, headers=BEARER)
        assert response.status_code == 413
        assert response.json()["error"].startswith("The request body is larger than the limit of 100000 bytes")
