"""Names never escape the models dir: every escape attempt, sent to every route that takes a
model name (native, Ollama, OpenAI), aims at decoys this test made outside the models dir in
tmp_path. Each answer is a 4xx with a JSON message; the decoys keep their bytes and mtimes,
nothing outside is listed, loaded or deleted, and no answer carries a decoy's secret text."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from conftest import RkllamaServer, make_models_dir
from hub_emulator import HubEmulator
from rkllama.store.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, packaged_default_model

SECRET = "SECRET-TEXT-7f3a9c"
CHAT = [{"role": "user", "content": "hi"}]


@dataclass
class Planted:
    models: Path
    outside: Path  # the decoys: never to be touched
    checksums: dict[str, str]  # of every decoy file, taken when planted


def _plant(root: Path) -> Planted:
    """A models dir with the default model, plus links and dot-names aimed at decoys outside."""
    outside = root / "outside"
    (outside / "decoy-model").mkdir(parents=True)
    # Real, loadable models; copies, so no link count they share with the models dir changes their ctime.
    shutil.copyfile(packaged_default_model(), outside / "decoy.gguf")
    shutil.copyfile(packaged_default_model(), outside / "decoy-model" / "decoy.gguf")
    (outside / "secret-Modelfile").write_text(f"{SECRET}\n")
    (outside / "decoy-model" / "Modelfile").write_text(f'FROM="decoy.gguf"\nSYSTEM="{SECRET}"\n')
    (outside / "digests.json").write_text(f'{{"{SECRET}": "x"}}')
    models = make_models_dir(root / "models")
    (models / "link.gguf").symlink_to(outside / "decoy.gguf")
    (models / "linkdir").symlink_to(outside / "decoy-model")
    (models / "inner").mkdir()
    (models / "inner" / "inner.gguf").symlink_to(outside / "decoy.gguf")
    (models / "evil").mkdir()
    os.link(packaged_default_model(), models / "evil" / "weights.gguf")
    (models / "evil" / "Modelfile").symlink_to(outside / "secret-Modelfile")
    os.link(packaged_default_model(), models / ".hidden.gguf")
    (models / ".hiddendir").mkdir()
    os.link(packaged_default_model(), models / ".hiddendir" / "model.gguf")
    (models / ".digests.json").symlink_to(outside / "digests.json")
    return Planted(models=models, outside=outside, checksums=_checksums(outside))


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _fingerprint(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Size, mtime and ctime of everything under `folder`: any write or rename changes them."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return out


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return _plant(tmp_path_factory.mktemp("escapes"))


@pytest.fixture(scope="module")
def escapes_server(
    planted: Planted, hub: HubEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RkllamaServer]:
    """Nothing loaded, so /load_model reaches the name; pulls go to the hub emulator."""
    log_dir = tmp_path_factory.mktemp("escapes-log")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(log_dir / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    srv = RkllamaServer(planted.models, log_dir / "server.log", args=["--no-default"], env=env)
    yield srv.wait_ready(expect_model=False)
    srv.stop()


def _names(planted: Planted) -> dict[str, str]:
    decoy = planted.outside / "decoy.gguf"
    return {
        "dotdot": "../outside/decoy.gguf",
        "dotdot-deep": "SmolLM2-135M-Instruct/../../outside/decoy.gguf",
        "encoded-dotdot": "%2e%2e%2foutside%2fdecoy.gguf",
        "half-encoded": "..%2foutside%2fdecoy.gguf",
        "backslashes": "..\\outside\\decoy.gguf",
        "absolute-file": str(decoy),
        "absolute-folder": str(planted.outside / "decoy-model"),
        "symlinked-file": "link.gguf",
        "symlinked-folder": "linkdir",
        "folder-with-symlinked-model": "inner",
        "symlinked-modelfile": "evil",
        "nul-byte": f"{DEFAULT_MODEL_NAME}\x00/../../outside/decoy.gguf",
        "nul-only": "\x00",
        "10000-characters": "m" * 10_000,
        "dot-file": ".hidden.gguf",
        "dot-folder": ".hiddendir",
        "digest-cache": ".digests.json",
        "dot": ".",
        "dotdot-alone": "..",
        "one-dot-leaders": "\u2024\u2024/outside/decoy.gguf",
        "fullwidth-stops-division-slash": "\uff0e\uff0e\u2215outside\u2215decoy.gguf",
        "one-dot-leader-hidden": "\u2024hidden.gguf",
        "fullwidth-solidus": f"{DEFAULT_MODEL_NAME}\uff0f..\uff0f..\uff0foutside",
    }


Route = Callable[[httpx.Client, str], httpx.Response]

ROUTES: dict[str, Route] = {
    "native load_model": lambda c, n: c.post("/load_model", json={"model_name": n}),
    "native rm POST": lambda c, n: c.post("/rm", json={"model": n}),
    "native rm DELETE": lambda c, n: c.request("DELETE", "/rm", json={"model": n}),
    "native pull": lambda c, n: c.post("/pull", json={"model": n}),
    "native pull hf path": lambda c, n: c.post("/pull", json={"model": f"hf/test-user/repo/{n}"}),
    "ollama show": lambda c, n: c.post("/api/show", json={"model": n}),
    "ollama delete": lambda c, n: c.request("DELETE", "/api/delete", json={"model": n}),
    "ollama copy source": lambda c, n: c.post("/api/copy", json={"source": n, "destination": "escaped-copy"}),
    "ollama copy destination": lambda c, n: c.post("/api/copy", json={"source": DEFAULT_MODEL_NAME, "destination": n}),
    "ollama create model": lambda c, n: c.post("/api/create", json={"model": n, "from": DEFAULT_MODEL_NAME}),
    "ollama create from": lambda c, n: c.post("/api/create", json={"model": "escaped-create", "from": n}),
    "ollama create FROM": lambda c, n: c.post(
        "/api/create", json={"model": "escaped-create", "modelfile": f"FROM {n}"}
    ),
    "ollama pull": lambda c, n: c.post("/api/pull", json={"model": n}),
    "ollama chat": lambda c, n: c.post("/api/chat", json={"model": n, "messages": CHAT, "stream": False}),
    "ollama generate": lambda c, n: c.post("/api/generate", json={"model": n, "prompt": "hi", "stream": False}),
    "ollama embed": lambda c, n: c.post("/api/embed", json={"model": n, "input": "hi"}),
    "ollama embeddings": lambda c, n: c.post("/api/embeddings", json={"model": n, "prompt": "hi"}),
    # Dots encoded too, or the client would resolve `.` and `..` away before sending.
    "openai model": lambda c, n: c.get("/v1/models/" + quote(n, safe="").replace(".", "%2E")),
    "openai chat": lambda c, n: c.post("/v1/chat/completions", json={"model": n, "messages": CHAT}),
    "openai completions": lambda c, n: c.post("/v1/completions", json={"model": n, "prompt": "hi"}),
    "openai embeddings": lambda c, n: c.post("/v1/embeddings", json={"model": n, "input": "hi"}),
}


def _message(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def _listed(client: httpx.Client) -> dict[str, list[str]]:
    return {
        "/models": sorted(client.get("/models").json()["models"]),
        "/api/tags": sorted(m["name"] for m in client.get("/api/tags").json()["models"]),
        "/v1/models": sorted(m["id"] for m in client.get("/v1/models").json()["data"]),
    }


ONLY_THE_REAL_MODEL = {
    "/models": [DEFAULT_MODEL_NAME],
    "/api/tags": [f"{DEFAULT_MODEL_NAME}:latest"],
    "/v1/models": [DEFAULT_MODEL_NAME],
}


@pytest.mark.parametrize("kind", list(_names(Planted(Path("/x"), Path("/y"), {}))))
def test_escape_attempts_are_refused_on_every_route(kind: str, planted: Planted, escapes_server: RkllamaServer) -> None:
    name = _names(planted)[kind]
    decoys = _fingerprint(planted.outside)
    inside = sorted(os.listdir(planted.models))
    with escapes_server.client() as client:
        for route, send in ROUTES.items():
            response = send(client, name)
            where = f"{route} with {kind}"
            assert 400 <= response.status_code < 500, (where, response.status_code, response.text[:300])
            message = _message(response)
            assert isinstance(message, str) and message.strip(), where
            assert SECRET not in response.text, where
            # Paths are shown relative to the models dir; the client's own name may be echoed (cut short).
            if str(planted.models) not in name:
                assert str(planted.models) not in response.text, (where, message)
            assert len(response.text) < 2000, (where, len(response.text))
        assert _listed(client) == ONLY_THE_REAL_MODEL
        assert client.get("/current_model").json() == {"error": "No model is currently loaded."}
        assert client.get("/api/ps").json() == {"models": []}
    assert _fingerprint(planted.outside) == decoys
    assert sorted(os.listdir(planted.models)) == inside
    assert escapes_server.runner_pids() == []


def test_refusals_say_why(planted: Planted, escapes_server: RkllamaServer) -> None:
    """The messages of the refusals above name the actual problem."""
    cases = {
        ("/load_model", "model_name", "m" * 10_000): "longer than 255 bytes",
        ("/load_model", "model_name", ".hidden.gguf"): "hidden",
        ("/load_model", "model_name", "../outside/decoy.gguf"): "one file or folder name",
        ("/load_model", "model_name", "\u2024hidden.gguf"): "hidden",
        ("/load_model", "model_name", "a\x00b"): "control or invisible character",
        ("/load_model", "model_name", "link.gguf"): "points outside the models directory",
        ("/load_model", "model_name", "linkdir"): "points outside the models directory",
        ("/load_model", "model_name", "inner"): "points outside the models directory",
        ("/load_model", "model_name", "evil"): "evil/Modelfile points outside the models directory",
        ("/rm", "model", "m" * 300): "longer than 255 bytes",
        ("/rm", "model", ".hiddendir"): "hidden",
        ("/rm", "model", "evil"): "evil/Modelfile points outside the models directory",
        ("/api/show", "model", "m" * 300): "longer than 255 bytes",
        ("/api/show", "model", ".digests.json"): "hidden",
        ("/api/show", "model", "evil"): "model 'evil' not found",
        ("/api/show", "model", "link.gguf"): "model 'link.gguf' not found",
        ("/api/copy", "destination", "m" * 300): "longer than 255 bytes",
        ("/api/create", "model", "m" * 300): "longer than 255 bytes",
        ("/api/create", "model", ".sneaky"): "hidden",
        ("/api/pull", "model", "hf/test-user/repo/" + "m" * 300 + ".gguf"): "longer than 255 bytes",
        ("/api/pull", "model", "hf/test-user/repo/.hidden.gguf"): "hidden",
        ("/v1/chat/completions", "model", "m" * 300): "longer than 255 bytes",
    }
    with escapes_server.client() as client:
        for (path, field, name), expected in cases.items():
            body: dict[str, object] = {field: name}
            if path == "/api/copy":
                body["source"] = DEFAULT_MODEL_NAME
            if path == "/api/create":
                body["from"] = DEFAULT_MODEL_NAME
            if path == "/v1/chat/completions":
                body["messages"] = CHAT
            response = client.post(path, json=body)
            assert response.status_code in (400, 404), (path, name[:20], response.text[:300])
            assert expected in _message(response), (path, name[:20], _message(response))


def test_a_huge_name_is_cut_short_in_answers_and_the_log(planted: Planted, escapes_server: RkllamaServer) -> None:
    huge = "n" * 500_000
    with escapes_server.client() as client:
        for path, body in [
            ("/rm", {"model": huge}),
            ("/load_model", {"model_name": huge}),
            ("/api/copy", {"source": DEFAULT_MODEL_NAME, "destination": huge}),
            ("/api/create", {"model": huge, "from": DEFAULT_MODEL_NAME}),
            ("/api/show", {"model": huge}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 400, (path, response.text[:300])
            assert "longer than 255 bytes" in _message(response) and len(response.text) < 500, path
    log = escapes_server.log()
    assert "n" * 1000 not in log
    assert "Traceback" not in log


def test_symlinks_pointing_inside_the_models_dir_are_models(start_server, tmp_path: Path) -> None:
    models = make_models_dir(tmp_path / "models")
    (models / "alias.gguf").symlink_to(Path(DEFAULT_MODEL_NAME) / DEFAULT_MODEL_FILE)
    (models / "alias-folder").symlink_to(DEFAULT_MODEL_NAME)
    srv = start_server(models_dir=models, args=["--no-default"], expect_model=False)
    with srv.client() as client:
        assert client.get("/models").json() == {"models": ["alias-folder", "alias.gguf", DEFAULT_MODEL_NAME]}
        loaded = client.post("/load_model", json={"model_name": "alias.gguf"})
        assert loaded.json() == {"message": "Model alias.gguf loaded successfully."}
        assert client.post("/unload_model").status_code == 200
        shown = client.post("/api/show", json={"model": "alias-folder"})
        assert f"FROM {DEFAULT_MODEL_FILE}" in shown.json()["modelfile"]
        # Deleting a link deletes the link, never what it points to.
        assert client.post("/rm", json={"model": "alias-folder"}).json() == {
            "message": "The model has been successfully deleted."
        }
    assert not os.path.lexists(models / "alias-folder")
    assert (models / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE).is_file()


def test_default_model_is_not_installed_through_a_link_to_elsewhere(start_server, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text(SECRET)
    before = _fingerprint(outside)
    models = tmp_path / "models"
    models.mkdir()
    (models / DEFAULT_MODEL_NAME).symlink_to(outside)
    srv = start_server(models_dir=models, expect_model=False)
    with srv.client() as client:
        assert client.get("/models").json() == {"models": []}
    assert _fingerprint(outside) == before
    assert "links elsewhere; the default model is not installed" in srv.log()


def test_pull_never_writes_through_a_linked_staging_folder(
    planted: Planted, hub: HubEmulator, escapes_server: RkllamaServer, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging = planted.models / ".pulls"
    staging.symlink_to(elsewhere)
    hub.add_file("test-user/staged", "staged.gguf", os.urandom(64 * 1024))
    try:
        with escapes_server.client() as client:
            native = client.post("/pull", json={"model": "hf/test-user/staged/staged.gguf"})
            ollama = client.post("/api/pull", json={"model": "hf/test-user/staged/staged.gguf", "stream": False})
    finally:
        staging.unlink()
    assert native.status_code == 400 and ".pulls in the models directory is not a folder" in native.json()["error"]
    assert ollama.status_code == 400 and ".pulls in the models directory is not a folder" in ollama.json()["error"]
    assert list(elsewhere.iterdir()) == []
    assert not (planted.models / "staged").exists()


def test_decoys_keep_their_bytes_after_all_attempts(planted: Planted, escapes_server: RkllamaServer) -> None:
    """Runs last: every decoy still has the checksum it had when planted."""
    assert _checksums(planted.outside) == planted.checksums
