"""The `rkllama` command. `serve` runs the server; the other commands talk to it over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = Settings()
    for name in Settings.names():
        value = getattr(args, name, None)
        if value is not None and value is not False:
            setattr(settings, name, Path(value).expanduser() if name == "models_dir" else value)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    print(
        f"RKLLama {__version__} serving on http://{settings.host}:{settings.port}/ (models: {settings.models_dir})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=5)
    return 0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="address to bind (env RKLLAMA_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env RKLLAMA_PORT, default 8080)")
    serve.add_argument(
        "--models", dest="models_dir", help="models directory (env RKLLAMA_MODELS, default ~/RKLLAMA/models)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env RKLLAMA_LOG_LEVEL")
    serve.add_argument("--no-default", action="store_true", help="do not install or load the built-in default model")
    serve.add_argument("--model", help="model to load at start instead of the default (env RKLLAMA_MODEL)")
    serve.add_argument("--api-key", help="require this bearer key on /api/* and /v1/* (env RKLLAMA_API_KEY)")
    serve.add_argument(
        "--max-loaded-models", type=int, help="models kept loaded at once (env RKLLAMA_MAX_LOADED_MODELS, default 1)"
    )
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkllama", description="RKLLama: a local LLM server for Rockchip NPUs and CPUs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args: print(f"rkllama {__version__}") or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
