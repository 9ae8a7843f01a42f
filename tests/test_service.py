"""`rkllama service install|uninstall` (issue 11): the unit systemd would run, checked by
systemd itself (`systemd-analyze verify`), and its environment file read the way systemd reads
it, then served by the real server. `--root` keeps every file in a temp dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, make_models_dir
from faults_support import wait_until
from rkllama.service import read_env_file
from rkllama.store.default_model import DEFAULT_MODEL_NAME

UNIT = Path("etc/systemd/system/rkllama.service")
ENV = Path("etc/rkllama/rkllama.env")


def rkllama(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rkllama", *args], capture_output=True, text=True, timeout=120)


def test_the_generated_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "the service tests need systemd-analyze (Debian's systemd package; scripts/setup.sh installs it)"
    done = rkllama("service", "install", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"wrote {tmp_path / UNIT}", f"wrote {tmp_path / ENV}"]
    unit = (tmp_path / UNIT).read_text()
    executable = Path(sys.executable).with_name("rkllama")
    for line in (
        f"ExecStart={executable} serve",
        "User=rkllama",
        "EnvironmentFile=/etc/rkllama/rkllama.env",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "StandardOutput=journal",
        "WantedBy=multi-user.target",
    ):
        assert line in unit.splitlines(), line
    verify = subprocess.run([analyze, "verify", str(tmp_path / UNIT)], capture_output=True, text=True, timeout=120)
    # verify exits 0 on mere warnings (an unknown key, a bad value): none may be printed either.
    assert verify.returncode == 0 and verify.stderr.strip() == "" and verify.stdout.strip() == "", verify


def test_the_env_file_round_trips_into_the_server_settings(tmp_path: Path) -> None:
    port = free_port()
    assert rkllama("service", "install", "--root", str(tmp_path), "--bind-port", str(port)).returncode == 0
    env_file = tmp_path / ENV
    models = make_models_dir(tmp_path / "var/lib/rkllama/models")
    key_file = tmp_path / "api-key"
    key_file.write_text("board-key\n")
    # What a user does: point at their own paths, and uncomment the key and the keep-alive.
    text = env_file.read_text().replace("RKLLAMA_MODELS=/var/lib/rkllama/models", f"RKLLAMA_MODELS={models}")
    text = text.replace("#RKLLAMA_API_KEY_FILE=/etc/rkllama/api-key", f"RKLLAMA_API_KEY_FILE={key_file}")
    text = text.replace("#RKLLAMA_KEEP_ALIVE=5m", 'RKLLAMA_KEEP_ALIVE="10m"')
    env_file.write_text(text)
    settings = read_env_file(env_file)
    assert settings["RKLLAMA_PORT"] == str(port) and settings["RKLLAMA_KEEP_ALIVE"] == "10m"
    # As systemd starts it: `rkllama serve` with no flags, the file's variables in its environment.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RKLLAMA_")} | settings
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "serve"], env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).json()["models"] == [DEFAULT_MODEL_NAME]
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        assert wait_until(serving, 120), (tmp_path / "serve.log").read_text()
        assert httpx.get(f"{base}/models").status_code == 401  # the key file is in force
        listed = httpx.get(f"{base}/models", headers={"Authorization": "Bearer board-key"})
        assert listed.json() == {"models": [DEFAULT_MODEL_NAME]}  # from the file's models dir
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_a_reinstall_keeps_the_settings_and_uninstall_removes_only_the_unit(tmp_path: Path) -> None:
    assert rkllama("service", "install", "--root", str(tmp_path)).returncode == 0
    env_file = tmp_path / ENV
    env_file.write_text(env_file.read_text() + "RKLLAMA_MAX_LOADED_MODELS=2\n")
    again = rkllama("service", "install", "--root", str(tmp_path), "--bind-port", "9999")
    assert again.stdout.splitlines() == [f"wrote {tmp_path / UNIT}"]  # the env file is the user's now
    assert "RKLLAMA_MAX_LOADED_MODELS=2" in env_file.read_text() and "9999" not in env_file.read_text()
    removed = rkllama("service", "uninstall", "--root", str(tmp_path))
    assert removed.returncode == 0 and removed.stdout.splitlines()[0] == f"removed {tmp_path / UNIT}"
    assert not (tmp_path / UNIT).exists() and env_file.exists()


@pytest.mark.parametrize("user", ["Root!", "a b", "9lives"])
def test_a_bad_user_name_is_refused_with_a_message(tmp_path: Path, user: str) -> None:
    done = rkllama("service", "install", "--root", str(tmp_path), "--user", user)
    assert done.returncode == 1
    assert f"--user {user!r} is not a valid user name" in done.stderr
    assert not (tmp_path / UNIT).exists()
