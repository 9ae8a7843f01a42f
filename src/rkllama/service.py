"""`rkllama service install|uninstall`: run the server as a systemd service on a board.

The unit runs `rkllama serve` as a dedicated unprivileged system user, with its models in
/var/lib/rkllama/models (systemd's StateDirectory), its settings in an environment file
(/etc/rkllama/rkllama.env, kept across reinstalls and uninstalls), its log in the journal,
a restart after a failure, and a graceful stop: SIGTERM ends streams with a final chunk and
the runners exit with the server (docs/service.md).

`--root DIR` writes every file under DIR instead of / and touches neither users nor systemctl,
so the files can be inspected or packaged; the tests use it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import RkllamaError

UNIT_NAME = "rkllama.service"
UNIT_DIR = Path("/etc/systemd/system")
ENV_FILE = Path("/etc/rkllama/rkllama.env")
STATE_DIR = Path("/var/lib/rkllama")
DEFAULT_USER = "rkllama"
# SIGTERM first: the server ends streams and stops its runners; past this, systemd kills the rest.
STOP_TIMEOUT_SECONDS = 45
DEVICE_GROUPS = ("video", "render")


class ServiceError(RkllamaError):
    """The service could not be installed or removed; the message says what to do."""


@dataclass(frozen=True)
class ServicePlan:
    user: str
    executable: Path
    env_file: Path = ENV_FILE
    state_dir: Path = STATE_DIR
    host: str = "127.0.0.1"
    port: int = 8080

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


def default_executable() -> Path:
    """The `rkllama` next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("rkllama")
    if beside.is_file():
        return beside
    found = shutil.which("rkllama")
    if found is None:
        raise ServiceError("Cannot find the rkllama command; install RKLLama first (bash scripts/setup.sh).")
    return Path(found)


def unit_text(plan: ServicePlan) -> str:
    return f"""# RKLLama as a systemd service, written by `rkllama service install`.
# Settings: {plan.env_file} (RKLLAMA_* variables, as `rkllama serve --help` lists them).
[Unit]
Description=RKLLama LLM server (Ollama, OpenAI and RKLLama APIs)
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
User={plan.user}
Group={plan.user}
EnvironmentFile={plan.env_file}
ExecStart={shlex.quote(str(plan.executable))} serve
StateDirectory={plan.state_dir.name}
WorkingDirectory={plan.state_dir}
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_SECONDS}
StandardOutput=journal
StandardError=journal
# The server needs its state dir, its settings and the NPU device (RK3588/RK3576), little more.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
{_device_groups_line()}

[Install]
WantedBy=multi-user.target
"""


def _device_groups_line() -> str:
    """The groups that own the NPU and GPU devices on Rockchip boards, those this system has (a
    group that does not exist would stop the service from starting)."""
    present = []
    for group in DEVICE_GROUPS:
        try:
            grp.getgrnam(group)
        except KeyError:
            continue
        present.append(group)
    return f"SupplementaryGroups={' '.join(present)}" if present else "# (no video or render group on this system)"


def env_file_text(plan: ServicePlan) -> str:
    return f"""# RKLLama settings, read by {UNIT_NAME}; `systemctl restart rkllama` applies changes.
# Every setting of `rkllama serve --help` has an RKLLAMA_* variable (README, "Settings").
RKLLAMA_HOST={plan.host}
RKLLAMA_PORT={plan.port}
RKLLAMA_MODELS={plan.models_dir}
RKLLAMA_LOG_LEVEL=info
# Before binding to a network address, set a key (read from a file, so it shows nowhere):
#   install -m 640 -g {plan.user} /dev/stdin /etc/rkllama/api-key <<< "$(openssl rand -hex 24)"
#RKLLAMA_API_KEY_FILE=/etc/rkllama/api-key
# Memory all loaded models may take (a share of RAM, or a size), models kept at once, keep-alive.
#RKLLAMA_MEMORY_BUDGET=80%
#RKLLAMA_MAX_LOADED_MODELS=1
#RKLLAMA_KEEP_ALIVE=5m
"""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (comments and blanks skipped,
    one level of quotes removed)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _under(root: Path | None, path: Path) -> Path:
    return path if root is None else root / path.relative_to("/")


def _run(*command: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ServiceError(f"{command[0]} is not installed; this command needs systemd.") from None
    except subprocess.CalledProcessError as exc:
        raise ServiceError(f"{' '.join(command)} failed: {(exc.stderr or exc.stdout).strip()}") from None


def _ensure_user(user: str, state_dir: Path) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        _run("useradd", "--system", "--user-group", "--home-dir", str(state_dir), "--shell", "/usr/sbin/nologin", user)


def install(plan: ServicePlan, root: Path | None = None, start: bool = True) -> list[Path]:
    """Write the unit (and the env file, if there is none yet); with no root, also create the
    user and enable and start the service. Returns the files written."""
    if root is None and os.geteuid() != 0:
        raise ServiceError("Installing a system service needs root: run it with sudo.")
    unit = _under(root, UNIT_DIR / UNIT_NAME)
    env_file = _under(root, plan.env_file)
    written = []
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(unit_text(plan), encoding="utf-8")
    written.append(unit)
    if not env_file.exists():  # the user's settings survive a reinstall
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text(env_file_text(plan), encoding="utf-8")
        written.append(env_file)
    if root is None:
        _ensure_user(plan.user, plan.state_dir)
        _run("systemctl", "daemon-reload")
        _run("systemctl", "enable", *(["--now"] if start else []), UNIT_NAME)
    return written


def uninstall(root: Path | None = None) -> list[Path]:
    """Stop and disable the service and remove its unit. The env file, the user and the models
    stay (remove them by hand: the message says where)."""
    if root is None and os.geteuid() != 0:
        raise ServiceError("Removing a system service needs root: run it with sudo.")
    unit = _under(root, UNIT_DIR / UNIT_NAME)
    if root is None and unit.exists():
        _run("systemctl", "disable", "--now", UNIT_NAME)
    removed = []
    if unit.exists():
        unit.unlink()
        removed.append(unit)
    if root is None:
        _run("systemctl", "daemon-reload")
    return removed
