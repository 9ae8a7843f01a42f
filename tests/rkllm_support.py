"""Building the rkllm test double (a stand-in for librkllmrt.so) and the layout program with
`cc`, one per runtime ABI, and a models dir that uses them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rkllama.runner.engines.rkllm_abi import ABI_NUMBERS  # ABI name -> the C header's RKLLM_ABI

DOUBLE_DIR = Path(__file__).parent / "rkllm_double"
# The runtime version each double claims in its version string.
DOUBLE_VERSIONS = {"1.1": "1.1.4", "1.2.0": "1.2.0", "1.2": "1.2.3", "1.3": "1.3.0"}


def compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("the rkllm tests need a C compiler (cc)")
    return cc


def build_double(abi: str, out_dir: Path, *defines: str, name: str | None = None) -> Path:
    out = out_dir / (name or f"librkllmrt-{abi}.so")
    subprocess.run(
        [
            compiler(),
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Werror",
            f"-DRKLLM_ABI={ABI_NUMBERS[abi]}",
            *defines,
            "-o",
            str(out),
            str(DOUBLE_DIR / "rkllm_double.c"),
        ],
        check=True,
    )
    return out


def build_layout_program(abi: str, out_dir: Path) -> Path:
    out = out_dir / f"abi_layout-{abi}"
    subprocess.run(
        [
            compiler(),
            "-Wall",
            "-Werror",
            f"-DRKLLM_ABI={ABI_NUMBERS[abi]}",
            '-DRKLLM_HEADER="rkllm_layout.h"',
            "-o",
            str(out),
            str(DOUBLE_DIR / "abi_layout.c"),
        ],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def rkllm_doubles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One compiled double per ABI: {"1.1": path, "1.2.0": ..., "1.2": ..., "1.3": ...}."""
    out = tmp_path_factory.mktemp("rkllm_double")
    return {abi: build_double(abi, out) for abi in ABI_NUMBERS}


def double_env(library: Path, log: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment a server needs to run .rkllm models on the double."""
    env = {"RKLLAMA_RKLLM_LIB": str(library), "RKLLAMA_RKLLM_PLATFORM": "rk3588"}
    if log is not None:
        env["RKLLM_DOUBLE_LOG"] = str(log)
    env.update(extra)
    return env


def rkllm_models_dir(root: Path, *names: str) -> Path:
    """A models dir holding flat .rkllm files (any bytes: the double only opens them)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"RKLLM test model " + name.encode())
    return root


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
