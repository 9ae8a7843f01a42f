"""What a support question needs to know: this version, the engines and the hardware.

Reported by `GET /api/version` (beside Ollama's `version`) and `rkllama version`. Nothing here
loads a model or a native library: the rkllm runtime's version is read from its file.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from . import __version__
from .runner.engines.rkllm_library import describe_runtime


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def system_info() -> dict[str, Any]:
    """The app computes it once at start (AppState.system): it does not change while it runs."""
    llama_cpp = _package_version("llama-cpp-python")
    rkllm = describe_runtime()
    return {
        "version": __version__,
        "engines": {
            "llama.cpp": {"available": llama_cpp is not None, "llama_cpp_python": llama_cpp},
            "rkllm": {"available": rkllm["library"] is not None and rkllm["soc"] is not None, **rkllm},
        },
        "soc": rkllm["soc"],
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
