"""What a support question needs (issue 11): `GET /api/version` and `rkllama version` name the
version, the engines, the rkllm runtime (read from the library file, here the C double's) and
the SoC."""

from __future__ import annotations

import subprocess
import sys

from rkllama import __version__
from rkllm_support import DOUBLE_VERSIONS, build_double, double_env


def test_api_version_reports_the_engines_the_rkllm_runtime_and_the_soc(start_server, tmp_path):
    library = build_double("1.3", tmp_path)
    srv = start_server(env=double_env(library))
    with srv.client() as http:
        info = http.get("/api/version").json()
    assert info["version"] == __version__  # what Ollama's clients and Open WebUI read
    rkllm = info["engines"]["rkllm"]
    assert rkllm == {
        "available": True,
        "library": str(library),
        "version": DOUBLE_VERSIONS["1.3"],
        "abi": "1.3",
        "soc": "rk3588",
    }
    assert info["engines"]["llama.cpp"]["available"] is True and info["soc"] == "rk3588"
    cli = subprocess.run(
        [sys.executable, "-m", "rkllama", "version", "--host", srv.base_url], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0] == f"rkllama {__version__}"
    assert f"server {__version__} at {srv.base_url}" in lines
    assert f"  rkllm engine: {library} (runtime {DOUBLE_VERSIONS['1.3']}, ABI 1.3)" in lines
    assert any(line.startswith("  SoC: rk3588;") for line in lines)


def test_without_the_runtime_the_version_says_where_to_look(server):
    with server.client() as http:
        rkllm = http.get("/api/version").json()["engines"]["rkllm"]
    assert rkllm["available"] is False and rkllm["library"] is None
    cli = subprocess.run(
        [sys.executable, "-m", "rkllama", "version", "--host", server.base_url], capture_output=True, text=True
    )
    assert "  rkllm engine: librkllmrt.so not found (docs/rkllm.md)" in cli.stdout.splitlines()
