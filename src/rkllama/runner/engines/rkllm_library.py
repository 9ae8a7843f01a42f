"""Finding Rockchip's runtime library, telling which ABI it speaks, and checking the SoC.

Settings (environment of the server, inherited by its runner processes):
- RKLLAMA_RKLLM_LIB: path of librkllmrt.so (default: the system library path).
- RKLLAMA_RKLLM_ABI: 1.1, 1.2.0, 1.2 or 1.3 (or a full version such as 1.2.3) when the
  library's version cannot be detected or should not be trusted.
- RKLLAMA_RKLLM_PLATFORM: the SoC (rk3588, rk3576, rk3562, rv1126b) instead of reading the
  device tree; for containers without /proc/device-tree, and for tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .base import EngineError
from .rkllm_abi import ABI_VERSIONS
from .rockchip_library import find_rockchip_library

LIB_ENV = "RKLLAMA_RKLLM_LIB"
ABI_ENV = "RKLLAMA_RKLLM_ABI"
PLATFORM_ENV = "RKLLAMA_RKLLM_PLATFORM"
LIBRARY_NAME = "librkllmrt.so"
SUPPORTED_SOCS = ("rk3588", "rk3576", "rk3562", "rv1126b")
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
INSTALL_HINT = (
    f"Install {LIBRARY_NAME} from https://github.com/airockchip/rknn-llm "
    "(rkllm-runtime/Linux/librkllm_api/aarch64) into /usr/lib, or set "
    f"{LIB_ENV} to its path. See docs/rkllm.md."
)

# Released runtime versions (rknn-llm tags), for telling its version apart from other bare strings.
KNOWN_RELEASES = {"1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4", "1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.3.0"}
# The runtime logs "rkllm-runtime version: 1.2.1, ..." from a string inside the library.
_VERSION_IN_LOG = re.compile(rb"rkllm-runtime version:? ?v?(\d+\.\d+\.\d+)")
# Otherwise a bare version string ("1.2.1" or "1.2.1b1", maybe with a build suffix).
_BARE_VERSION = re.compile(rb"\x00v?(1\.\d{1,2}\.\d{1,2})(?:b\d+)?(?:[ (][^\x00]{0,80})?\x00")


@dataclass
class RkllmLibrary:
    path: str
    lib: ctypes.CDLL
    abi: str
    version: str | None  # the version string found in the library, if any


def abi_for_version(version: str) -> str | None:
    """Map a runtime version ("1.2.3") or ABI name ("1.2") to the ABI it speaks."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(b\d+)?", version.strip())
    if not match:
        return None
    major, minor, patch, beta = int(match[1]), int(match[2]), match[3], match[4]
    if (major, minor, patch) == (1, 2, "1") and beta:
        return "1.2.0"  # 1.2.1b1 still had 1.2.0's void callback and no perf stats
    if (major, minor) == (1, 1):
        return "1.1"
    if (major, minor) == (1, 2):
        if patch is None:
            return "1.2"
        return "1.2.0" if int(patch) == 0 else "1.2"
    if (major, minor) == (1, 3):
        return "1.3"
    return None


def detect_platform() -> str:
    override = os.environ.get(PLATFORM_ENV, "").strip().lower()
    if override:
        if override not in SUPPORTED_SOCS:
            raise EngineError(
                f"{PLATFORM_ENV}={override!r} is not a supported Rockchip SoC; use one of {', '.join(SUPPORTED_SOCS)}."
            )
        return override
    try:
        compatible = DEVICE_TREE_COMPATIBLE.read_bytes().decode("ascii", errors="replace").lower()
    except OSError:
        compatible = ""
    for entry in compatible.split("\x00"):
        vendor, _, chip = entry.partition(",")
        for soc in SUPPORTED_SOCS:
            # "rockchip,rk3588" and "rockchip,rk3588s" are both RK3588-class chips.
            if vendor == "rockchip" and chip.startswith(soc):
                return soc
    seen = compatible.replace("\x00", " ").strip() or f"no {DEVICE_TREE_COMPATIBLE}"
    raise EngineError(
        f"rkllm models need a Rockchip NPU ({', '.join(s.upper() for s in SUPPORTED_SOCS)}); this machine is "
        f"not one ({seen}). If it is, set {PLATFORM_ENV} to its SoC."
    )


def _find_library_path() -> str:
    return find_rockchip_library(
        LIB_ENV, LIBRARY_NAME, INSTALL_HINT, f"The Rockchip runtime library {LIBRARY_NAME} was not found."
    )


def _version_in_file(path: str) -> str | None:
    resolved = path if os.path.isabs(path) else None
    if resolved is None:
        return None
    try:
        data = Path(resolved).read_bytes()
    except OSError:
        return None
    logged = _VERSION_IN_LOG.search(data)
    if logged:
        return logged[1].decode()
    # A bare "1.2.13" may be a bundled library's (zlib): only released runtime versions count,
    # and only when they agree on one ABI.
    bare = {m[1].decode() for m in _BARE_VERSION.finditer(data)} & KNOWN_RELEASES
    abis = {abi_for_version(v) for v in bare}
    return sorted(bare)[-1] if len(abis) == 1 else None


def _abi_from_symbols(lib: ctypes.CDLL) -> str:
    """The lowest ABI the exported functions allow: 1.2.0 added rkllm_clear_kv_cache,
    1.2.1 added rkllm_set_function_tools; 1.3.0 added no function."""
    if hasattr(lib, "rkllm_set_function_tools"):
        return "1.2"
    if hasattr(lib, "rkllm_clear_kv_cache"):
        return "1.2.0"
    return "1.1"


def _detect_abi(path: str, lib: ctypes.CDLL) -> tuple[str, str | None]:
    override = os.environ.get(ABI_ENV, "").strip()
    if override:
        abi = abi_for_version(override)
        if abi is None:
            raise EngineError(
                f"{ABI_ENV}={override!r} is not a supported rkllm ABI; use one of {', '.join(ABI_VERSIONS)}."
            )
        return abi, None
    if not hasattr(lib, "rkllm_init") or not hasattr(lib, "rkllm_run"):
        raise EngineError(f"{path} does not export rkllm_init/rkllm_run: it is not the rkllm runtime. {INSTALL_HINT}")
    floor = _abi_from_symbols(lib)
    version = _version_in_file(path)
    if version is not None:
        abi = abi_for_version(version)
        if abi is None:
            raise EngineError(
                f"{path} is rkllm runtime {version}, which RKLLama does not know. Supported: 1.1.x, 1.2.x, 1.3.0. "
                f"If its interface matches one of them, set {ABI_ENV} (one of {', '.join(ABI_VERSIONS)})."
            )
        if ABI_VERSIONS.index(abi) < ABI_VERSIONS.index(floor):
            raise EngineError(
                f"{path} says it is rkllm runtime {version} but exports functions of a newer one; "
                f"set {ABI_ENV} to its interface version."
            )
        return abi, version
    if floor == "1.2":
        # 1.2.1-1.2.3 and 1.3.0 export the same functions; only the version string tells them apart.
        raise EngineError(
            f"Cannot tell whether {path} is rkllm runtime 1.2.x or 1.3.x (no version string found). "
            f"Set {ABI_ENV}=1.2 or {ABI_ENV}=1.3."
        )
    return floor, None


def load_library() -> RkllmLibrary:
    path = _find_library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise EngineError(f"Cannot load the Rockchip runtime library {path}: {exc}. {INSTALL_HINT}") from None
    if not os.path.isabs(path):
        # find_library returns a bare soname; the loaded file is where its version string is.
        path = _loaded_path(lib) or path
    abi, version = _detect_abi(path, lib)
    return RkllmLibrary(path=path, lib=lib, abi=abi, version=version)


def _loaded_path(lib: ctypes.CDLL) -> str | None:
    """Where the dynamic loader found `lib` (from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return None
    name = os.path.basename(lib._name)
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and os.path.basename(fields[-1]).startswith(name.split(".so")[0]):
            return fields[-1]
    return None


def describe_runtime() -> dict[str, str | None]:
    """What `rkllama version` and /api/version report of the rkllm runtime, without loading it:
    the library found (or None), its version and ABI as read from the file, and the SoC."""
    try:
        path = _find_library_path()
    except EngineError:
        path = None
    version = _version_in_file(path) if path else None
    try:
        soc = detect_platform()
    except EngineError:
        soc = None
    return {
        "library": path,
        "version": version,
        "abi": abi_for_version(version) if version else None,
        "soc": soc,
    }
