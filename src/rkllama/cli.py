"""The `rkllama` command. `serve` runs the server; the other commands talk to it over HTTP
(`--host` / RKLLAMA_HOST). Errors print one line saying what to do next, and exit 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .client import PULL_ERROR_PREFIX, ClientError, RkllamaClient, ServerError, server_url
from .errors import RkllamaError
from .service_cli import add_service_parser
from .settings import Settings, comma_list, read_api_key_file
from .store.pull_spec import parse_pull_spec

_PATH_SETTINGS = {"models_dir", "api_key_file"}


def _serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .server import serve_app

    settings = Settings()
    for name in Settings.names():
        value = getattr(args, name, None)
        if value is not None and value is not False:
            setattr(settings, name, Path(value).expanduser() if name in _PATH_SETTINGS else value)
    settings.resolve_api_key()
    try:
        settings.kv_budget_bytes()
    except ValueError as exc:
        raise RkllamaError(f"--kv-cache-budget: {exc}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    print(
        f"RKLLama {__version__} serving on http://{settings.host}:{settings.port}/ (models: {settings.models_dir})",
        file=sys.stderr,
        flush=True,
    )
    serve_app(app, settings)
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
    serve.add_argument("--api-key", help="require this bearer key on every route but GET / (env RKLLAMA_API_KEY)")
    serve.add_argument(
        "--api-key-file", help="read the API key from this file, so it does not show in `ps` (env RKLLAMA_API_KEY_FILE)"
    )
    serve.add_argument(
        "--allowed-hosts",
        type=comma_list,
        help="Host header names to serve besides loopback names, IP addresses and the bind address;"
        " comma-separated, '*' for any (env RKLLAMA_ALLOWED_HOSTS)",
    )
    serve.add_argument(
        "--origins",
        type=comma_list,
        help="browser origins allowed besides local ones, e.g. https://app.example,chrome-extension://*;"
        " '*' for any (env RKLLAMA_ORIGINS)",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, help="largest request body, in bytes (env RKLLAMA_MAX_BODY_BYTES, default 32 MiB)"
    )
    serve.add_argument(
        "--runner-timeout",
        type=float,
        help="seconds a busy model runner may send nothing before it is killed; 0: never "
        "(env RKLLAMA_RUNNER_TIMEOUT, default 60)",
    )
    serve.add_argument(
        "--unload-grace",
        type=float,
        help="seconds an unload waits for requests in flight to finish (env RKLLAMA_UNLOAD_GRACE, default 30)",
    )
    serve.add_argument(
        "--max-loaded-models", type=int, help="models kept loaded at once (env RKLLAMA_MAX_LOADED_MODELS, default 1)"
    )
    serve.add_argument(
        "--memory-budget",
        help="memory all loaded models may take together: a share of available RAM (80%%, 0.8) or a size "
        "(6GiB) (env RKLLAMA_MEMORY_BUDGET, default 80%%)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        help="requests that may wait for a model at once; more get a 503 (env RKLLAMA_MAX_QUEUE, default 512)",
    )
    serve.add_argument(
        "--keep-alive",
        help="how long a model loaded for an Ollama/OpenAI request stays loaded when idle, e.g. 5m, 1h, -1 "
        "for good (env RKLLAMA_KEEP_ALIVE, default 5m)",
    )
    serve.add_argument(
        "--context-length",
        type=int,
        help="context for models without NUM_CTX (env RKLLAMA_CONTEXT_LENGTH; default: the trained context)",
    )
    serve.add_argument(
        "--kv-cache-budget",
        help="memory one model's KV cache may take by default, e.g. 2GiB (env RKLLAMA_KV_CACHE_BUDGET; "
        "default: a quarter of RAM)",
    )
    serve.set_defaults(func=_serve)


def _client_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else RKLLAMA_API_KEY, else the file in RKLLAMA_API_KEY_FILE (as the server reads it)."""
    key_file = os.environ.get("RKLLAMA_API_KEY_FILE")
    if args.api_key or os.environ.get("RKLLAMA_API_KEY") or not key_file:
        return args.api_key or os.environ.get("RKLLAMA_API_KEY")
    return read_api_key_file(Path(key_file).expanduser())


def _client(args: argparse.Namespace) -> RkllamaClient:
    return RkllamaClient(server_url(args.host), api_key=_client_api_key(args))


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return "-"


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    # The server reports "kept loaded for good" as a far-future expiry, as Ollama does.
    if moment.year >= datetime.now().year + 50:
        return "forever"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    _table(
        ["NAME", "SIZE", "FORMAT", "MODIFIED"],
        [[m.name, _human_size(m.size), m.format or "-", _when(m.modified)] for m in models],
    )
    return 0


def _ps(args: argparse.Namespace) -> int:
    with _client(args) as client:
        loaded = client.loaded()
    _table(
        ["NAME", "SIZE", "FORMAT", "UNTIL"],
        [[m.name, _human_size(m.size), m.format or "-", _when(m.expires)] for m in loaded],
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    console = Console(stderr=True)
    done = False
    with (
        _client(args) as client,
        Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=console, transient=False
        ) as bar,
    ):
        task = None
        for line in client.pull(args.model):
            if line.startswith(PULL_ERROR_PREFIX):
                raise ServerError(line.removeprefix(PULL_ERROR_PREFIX), 400)
            if line.startswith("Downloading "):
                task = bar.add_task(line.removesuffix("..."), total=100)
            elif line.endswith("%") and line[:-1].isdigit() and task is not None:
                bar.update(task, completed=int(line[:-1]))
                done = line == "100%"
    if not done:
        raise ClientError("the download ended before 100%; run the same pull again to resume it.")
    name = parse_pull_spec(args.model).ref.model_name
    print(f"Pulled {name}. Chat with it: rkllama run {name}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.model)
    print(f"Deleted {args.model}")
    return 0


def _load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        previous = client.load(args.model)
    if previous:
        print(f"Unloaded {previous}")
    print(f"Loaded {args.model}")
    return 0


def _unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"Unloaded {client.unload()}")
    return 0


def _version(args: argparse.Namespace) -> int:
    from .system_info import system_info

    print(f"rkllama {__version__}")
    _print_engines(system_info())
    with _client(args) as client:
        remote = client.server_info()
    if remote:
        print(f"server {remote.get('version')} at {client.base_url}")
        if "engines" in remote:
            _print_engines(remote, indent="  ")
    return 0


def _print_engines(info: dict[str, Any], indent: str = "") -> None:
    """The lines a support question needs: each engine, the rkllm runtime and the SoC."""
    engines = info.get("engines", {})
    llama = engines.get("llama.cpp", {})
    print(f"{indent}llama.cpp engine: llama-cpp-python {llama.get('llama_cpp_python') or 'not installed'}")
    rkllm = engines.get("rkllm", {})
    if rkllm.get("library"):
        print(
            f"{indent}rkllm engine: {rkllm['library']} (runtime {rkllm.get('version') or 'version unknown'}, "
            f"ABI {rkllm.get('abi') or 'unknown'})"
        )
    else:
        print(f"{indent}rkllm engine: librkllmrt.so not found (docs/rkllm.md)")
    print(
        f"{indent}SoC: {info.get('soc') or 'not a supported Rockchip board'}; {info.get('machine')}, "
        f"Python {info.get('python')}"
    )


def _options(args: argparse.Namespace) -> dict[str, object]:
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    return {key: value for key, value in options.items() if value is not None}


def _print_usage(usage: dict[str, Any]) -> None:
    """`--verbose`: the token counts of a reply, on stderr, as `ollama run --verbose` shows them."""
    print(f"prompt eval count:    {usage.get('prompt_tokens')} token(s)", file=sys.stderr)
    print(f"eval count:           {usage.get('completion_tokens')} token(s)", file=sys.stderr)
    print(f"eval rate:            {usage.get('tokens_per_second')} tokens/s", file=sys.stderr)


def _reply(client: RkllamaClient, messages: list[dict[str, str]], options: dict[str, object], verbose: bool) -> str:
    """Print the reply as it streams; Ctrl-C stops it and keeps what was said."""
    parts: list[str] = []
    usage: dict[str, Any] = {}
    try:
        for piece in client.chat(messages, options, on_usage=usage.update):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    print()
    if verbose and usage:
        _print_usage(usage)
    return "".join(parts)


def _prompts(interactive: bool) -> Iterator[str]:
    """User turns: typed at a `>>> ` prompt on a terminal, else one per stdin line."""
    if not interactive:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input(">>> ")
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
        except EOFError:
            print()
            return


def _run(args: argparse.Namespace) -> int:
    options = _options(args)
    with _client(args) as client:
        client.load(args.model)
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        if args.prompt:
            _reply(client, [*messages, {"role": "user", "content": " ".join(args.prompt)}], options, args.verbose)
            return 0
        for prompt in _prompts(sys.stdin.isatty()):
            if prompt.strip() in {"/bye", "/exit"}:
                break
            if not prompt.strip():
                continue
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": _reply(client, messages, options, args.verbose)})
    return 0


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--host", help="server address: host, host:port or URL (env RKLLAMA_HOST, default 127.0.0.1:8080)"
    )
    parent.add_argument("--api-key", help="bearer key, if the server requires one (env RKLLAMA_API_KEY)")
    return parent


def add_client_parsers(commands: argparse._SubParsersAction) -> None:
    parent = _client_parent()

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[parent], help=help_text)
        sub.set_defaults(func=func)
        return sub

    command("list", _list, "list the models in the models directory")
    command("ps", _ps, "list the loaded models")
    pull = command("pull", _pull, "download a model from Hugging Face")
    pull.add_argument("model", help="hf/username/repo/file.gguf (or .rkllm), optionally +<vision file> or +none")
    command("rm", _rm, "delete a model").add_argument("model")
    command("load", _load, "load a model (unloading the current one)").add_argument("model")
    command("unload", _unload, "unload the current model")
    command("version", _version, "print the client's and the server's version")
    run = command("run", _run, "chat with a model in the terminal (/bye or Ctrl-D to leave)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="answer this prompt and exit")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--max-tokens", type=int, help="longest reply, in tokens")
    run.add_argument("--temperature", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--verbose", action="store_true", help="after each reply, print its token counts (stderr)")


_HINTS = {404: " (see `rkllama list`)", 409: " (try again when it is done)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rkllama", description="RKLLama: a local LLM server for Rockchip NPUs and CPUs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_client_parsers(commands)
    add_service_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ServerError as exc:
        print(f"Error: {exc}{_HINTS.get(exc.status, '')}", file=sys.stderr)
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
    except RkllamaError as exc:  # raised locally, e.g. a malformed pull path
        print(f"Error: {exc.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
