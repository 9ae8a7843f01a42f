"""Where a Rockchip runtime library (librkllmrt.so, librknnrt.so) is: the path its setting
names, else the dynamic loader's search, else the folders Rockchip's install guides use."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

from .base import EngineError

SYSTEM_FOLDERS = ("/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu", "/lib")


def find_rockchip_library(env: str, file_name: str, install_hint: str, missing: str) -> str:
    """The library's path (or bare soname, from find_library). `env` names the setting that
    overrides the search; `missing` starts the error when the library is nowhere."""
    configured = os.environ.get(env, "").strip()
    if configured:
        if not Path(configured).is_file():
            raise EngineError(f"{env}={configured} does not exist. {install_hint}")
        return configured
    found = ctypes.util.find_library(file_name.removeprefix("lib").removesuffix(".so"))
    if found:
        return found
    for folder in SYSTEM_FOLDERS:
        candidate = Path(folder) / file_name
        if candidate.is_file():
            return str(candidate)
    raise EngineError(f"{missing} {install_hint}")
