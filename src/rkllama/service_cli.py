"""The `rkllama service` commands (service.py does the work)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .service import DEFAULT_USER, ENV_FILE, STATE_DIR, UNIT_NAME, ServiceError, ServicePlan, default_executable
from .service import install as install_service
from .service import uninstall as uninstall_service

_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _plan(args: argparse.Namespace) -> ServicePlan:
    if not _USER_NAME.match(args.user):
        raise ServiceError(f"--user {args.user!r} is not a valid user name (lowercase letters, digits, _ and -).")
    executable = Path(args.executable) if args.executable else default_executable()
    return ServicePlan(user=args.user, executable=executable.absolute(), host=args.bind_host, port=args.bind_port)


def _install(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else None
    for path in install_service(_plan(args), root=root, start=not args.no_start):
        print(f"wrote {path}")
    if root is None:
        state = "enabled" if args.no_start else "enabled and started"
        print(f"{UNIT_NAME} {state}; logs: journalctl -u rkllama -f; settings: {ENV_FILE}")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    root = Path(args.root) if args.root else None
    removed = uninstall_service(root=root)
    print(f"removed {removed[0]}" if removed else f"{UNIT_NAME} was not installed")
    print(f"Kept: the settings in {ENV_FILE}, the models in {STATE_DIR}/models and the user {DEFAULT_USER}.")
    return 0


def add_service_parser(commands: argparse._SubParsersAction) -> None:
    service = commands.add_parser("service", help="install or remove RKLLama as a systemd service (needs root)")
    actions = service.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help=f"write {UNIT_NAME} and {ENV_FILE}, then enable and start it")
    install.add_argument(
        "--user", default=DEFAULT_USER, help=f"system user the server runs as (default {DEFAULT_USER})"
    )
    install.add_argument("--executable", help="the rkllama command to run (default: this installation's)")
    install.add_argument("--bind-host", default="127.0.0.1", help="RKLLAMA_HOST written to a new env file")
    install.add_argument("--bind-port", type=int, default=8080, help="RKLLAMA_PORT written to a new env file")
    install.add_argument("--no-start", action="store_true", help="enable the service without starting it now")
    install.add_argument("--root", help="write the files under this directory; no user, no systemctl")
    install.set_defaults(func=_install)
    uninstall = actions.add_parser("uninstall", help=f"stop, disable and remove {UNIT_NAME}")
    uninstall.add_argument("--root", help="remove the files under this directory; no systemctl")
    uninstall.set_defaults(func=_uninstall)
