"""The `rkllama` CLI run as subprocesses against a real server (and the hub emulator for pull)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RkllamaServer, free_port, make_models_dir
from hub_emulator import HubEmulator
from rkllama import __version__
from rkllama.store.default_model import DEFAULT_MODEL_NAME

HF_TOKEN = "hf_cli_test_token"


def rkllama(
    srv: RkllamaServer | None, *args: str, stdin: str | None = None, host: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m rkllama ...` with RKLLAMA_HOST pointing at the server."""
    env = {**os.environ, "RKLLAMA_HOST": host or (srv.base_url if srv else "")}
    env.pop("RKLLAMA_PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "rkllama", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error, alone on stderr but for a pull's progress bar."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Downloading ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def generate_count(srv: RkllamaServer) -> int:
    return srv.log().count('"POST /generate HTTP/1.1" 200')


USAGE = re.compile(r"^prompt eval count: +(\d+) token\(s\)\r?\neval count: +(\d+) token\(s\)", re.MULTILINE)


def turn_counts(text: str) -> list[tuple[int, int]]:
    """(prompt tokens, reply tokens) of each reply, from `run --verbose`."""
    return [(int(prompt), int(reply)) for prompt, reply in USAGE.findall(text)]


def assert_history_sent(counts: list[tuple[int, int]]) -> None:
    """Turn 2's prompt holds turn 1's question and answer: it is longer than both together."""
    (first_prompt, first_reply), (second_prompt, _) = counts[:2]
    assert first_reply > 0
    assert second_prompt > first_prompt + first_reply, counts


@pytest.fixture(scope="module")
def hub() -> Iterator[HubEmulator]:
    with HubEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def cli_server(hub: HubEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RkllamaServer]:
    """A private server (these tests load, unload and delete models) whose hub is the emulator."""
    root = tmp_path_factory.mktemp("cli")
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": HF_TOKEN, "HF_HOME": str(root / "hf-home")}
    srv = RkllamaServer(make_models_dir(root / "models"), root / "server.log", env=env).wait_ready()
    yield srv
    srv.stop()


def test_version_prints_client_and_server(server: RkllamaServer) -> None:
    result = rkllama(server, "version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"rkllama {__version__}" and lines[4] == f"server {__version__} at {server.base_url}"
    # The engines and the machine, for the client and then for the server (the same machine here).
    assert lines[1].startswith("llama.cpp engine: llama-cpp-python ") and lines[3].startswith("SoC: ")
    assert lines[5:8] == [f"  {line}" for line in lines[1:4]]


def test_list_shows_name_size_format_modified(server: RkllamaServer) -> None:
    result = rkllama(server, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "FORMAT", "MODIFIED"]
    row = next(r for r in rows if r.startswith(DEFAULT_MODEL_NAME + " "))
    cells = row.split()
    assert cells[1:4] == [cells[1], "MB", "gguf"] and float(cells[1]) > 50  # ~105 MB
    assert len(cells) == 6  # date and time


def test_ps_shows_the_loaded_model(server: RkllamaServer) -> None:
    result = rkllama(server, "ps")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "FORMAT", "UNTIL"]
    assert [r.split()[0] for r in rows] == [DEFAULT_MODEL_NAME]
    assert rows[0].split()[-1] == "forever"  # the default model has no keep-alive deadline


def test_host_flag_wins_and_unreachable_server_is_one_line(server: RkllamaServer) -> None:
    closed = f"127.0.0.1:{free_port()}"
    error = one_line_error(rkllama(server, "list", "--host", closed))
    assert f"cannot reach the RKLLama server at http://{closed}" in error and "rkllama serve" in error
    # RKLLAMA_HOST alone is honoured too.
    error = one_line_error(rkllama(None, "ps", host=closed))
    assert f"http://{closed}" in error


def test_pull_list_rm(hub: HubEmulator, cli_server: RkllamaServer) -> None:
    data = os.urandom(2 * 1024 * 1024)
    hub.add_file("test-user/cli-repo", "cli-model.gguf", data)

    pulled = rkllama(cli_server, "pull", "hf/test-user/cli-repo/cli-model.gguf")
    assert pulled.returncode == 0, pulled.stderr
    assert "Pulled cli-model." in pulled.stdout
    assert (cli_server.models_dir / "cli-model" / "cli-model.gguf").read_bytes() == data

    listed = rkllama(cli_server, "list")
    assert any(line.split()[0] == "cli-model" for line in listed.stdout.splitlines()[1:])

    removed = rkllama(cli_server, "rm", "cli-model")
    assert removed.returncode == 0, removed.stderr
    assert not (cli_server.models_dir / "cli-model").exists()
    assert "cli-model" not in rkllama(cli_server, "list").stdout


def test_pull_errors_are_one_line(hub: HubEmulator, cli_server: RkllamaServer) -> None:
    hub.add_repo("test-user/cli-repo")
    error = one_line_error(rkllama(cli_server, "pull", "hf/test-user/cli-repo/missing.gguf"))
    assert "File missing.gguf not found in test-user/cli-repo" in error
    hub.add_file("test-user/cli-repo", "broken.gguf", os.urandom(1024 * 1024))
    hub.corrupt("broken.gguf")
    error = one_line_error(rkllama(cli_server, "pull", "hf/test-user/cli-repo/broken.gguf"))
    assert "checksum mismatch" in error
    assert not (cli_server.models_dir / "broken").exists()


def test_rm_and_load_of_unknown_models_are_one_line(cli_server: RkllamaServer) -> None:
    assert "cannot be found" in one_line_error(rkllama(cli_server, "rm", "no-such-model"))
    assert "not found" in one_line_error(rkllama(cli_server, "load", "no-such-model"))


def test_unload_then_load(cli_server: RkllamaServer) -> None:
    unloaded = rkllama(cli_server, "unload")
    try:
        assert unloaded.returncode == 0, unloaded.stderr
        assert unloaded.stdout.strip() == f"Unloaded {DEFAULT_MODEL_NAME}"
        assert rkllama(cli_server, "ps").stdout.splitlines()[1:] == []
        assert "No model is currently loaded" in one_line_error(rkllama(cli_server, "unload"))
    finally:
        loaded = rkllama(cli_server, "load", DEFAULT_MODEL_NAME)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == f"Loaded {DEFAULT_MODEL_NAME}"
    assert rkllama(cli_server, "ps").stdout.splitlines()[1].split()[0] == DEFAULT_MODEL_NAME


def test_run_one_shot_prompt(cli_server: RkllamaServer) -> None:
    before = generate_count(cli_server)
    result = rkllama(cli_server, "run", DEFAULT_MODEL_NAME, "Say", "hello", "--max-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert generate_count(cli_server) == before + 1


def test_run_sends_each_turn_with_the_history_until_bye(cli_server: RkllamaServer) -> None:
    before = generate_count(cli_server)
    result = rkllama(
        cli_server,
        *("run", DEFAULT_MODEL_NAME, "--verbose", "--max-tokens", "12", "--temperature", "0"),
        stdin="Tell me about cats.\nHi\n/bye\nNot sent\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert generate_count(cli_server) == before + 2  # the line after /bye is never sent
    counts = turn_counts(result.stderr)
    assert len(counts) == 2, result.stderr
    assert_history_sent(counts)


def test_run_one_shot_prompt_sends_no_history(cli_server: RkllamaServer) -> None:
    """`run MODEL PROMPT` twice: two fresh conversations, so the same prompt size."""
    args = ("run", DEFAULT_MODEL_NAME, "Tell", "me", "about", "cats.", "--verbose", "--max-tokens", "12")
    first, second = (turn_counts(rkllama(cli_server, *args).stderr) for _ in range(2))
    assert len(first) == len(second) == 1
    assert first[0][0] == second[0][0]


def test_run_ends_at_end_of_input(cli_server: RkllamaServer) -> None:
    before = generate_count(cli_server)
    result = rkllama(cli_server, "run", DEFAULT_MODEL_NAME, "--max-tokens", "4", stdin="Hi\n\nThanks\n")
    assert result.returncode == 0, result.stderr
    assert generate_count(cli_server) == before + 2  # blank lines are skipped; EOF (Ctrl-D) leaves


def test_run_unknown_model_is_one_line(cli_server: RkllamaServer) -> None:
    error = one_line_error(rkllama(cli_server, "run", "no-such-model", "hi"))
    assert "no-such-model" in error


def test_serve_help_still_works(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rkllama", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    for command in ("serve", "list", "pull", "rm", "run", "ps", "load", "unload", "version"):
        assert command in result.stdout


def test_run_on_a_terminal_prompts_keeps_the_history_and_leaves_with_ctrl_d(cli_server: RkllamaServer) -> None:
    """`run` as a person uses it: stdin and stdout are a terminal (a pseudo-terminal here)."""
    before = generate_count(cli_server)
    controller, terminal = pty.openpty()
    env = {**os.environ, "RKLLAMA_HOST": cli_server.base_url, "TERM": "dumb"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rkllama", "run", DEFAULT_MODEL_NAME, "--max-tokens", "12", "--verbose"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    output = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal output
        while output.count(marker) < count:
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, output
            output += os.read(controller, 4096)

    try:
        read_until(b">>> ", 1)
        os.write(controller, b"Tell me about cats.\n")
        read_until(b">>> ", 2)  # the reply streamed, then a new prompt
        os.write(controller, b"Hi\n")
        read_until(b">>> ", 3)
        os.write(controller, b"\x04")  # Ctrl-D
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert generate_count(cli_server) == before + 2
    assert_history_sent(turn_counts(output.decode(errors="replace")))
