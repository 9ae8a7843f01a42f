"""The ctypes mirror of rkllm.h against C: every struct size and field offset, per runtime
ABI, and the library/ABI/SoC detection against compiled doubles."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from rkllama.runner.engines import rkllm_library
from rkllama.runner.engines.base import EngineError
from rkllama.runner.engines.rkllm_abi import ABI_VERSIONS, build_abi
from rkllm_support import (
    ABI_NUMBERS,
    DOUBLE_VERSIONS,
    build_double,
    build_layout_program,
    compiler,
    rkllm_doubles,
)

__all__ = ["rkllm_doubles"]  # the fixture, imported for pytest


def c_layout(abi: str, out_dir: Path) -> list[list[str]]:
    program = build_layout_program(abi, out_dir)
    output = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    return [line.split() for line in output.splitlines()]


def ctypes_offset(struct: type[ctypes.Structure], path: str) -> int:
    """Offset of a field, following dotted paths into nested structs."""
    total = 0
    for part in path.split("."):
        total += getattr(struct, part).offset
        struct = {name: kind for name, kind, *_ in struct._fields_}.get(part)  # type: ignore[assignment]
    return total


@pytest.mark.parametrize("abi", ABI_VERSIONS)
def test_every_struct_and_field_matches_c(abi: str, tmp_path: Path) -> None:
    structs = build_abi(abi).structs()
    lines = c_layout(abi, tmp_path)
    c_structs = {line[1] for line in lines if line[0] == "S"}
    assert c_structs == set(structs), "the same structs exist in C and in the mirror"
    checked = 0
    for line in lines:
        if line[0] == "S":
            assert ctypes.sizeof(structs[line[1]]) == int(line[2]), f"sizeof({line[1]})"
        else:
            _, struct, field, offset = line
            assert ctypes_offset(structs[struct], field) == int(offset), f"offsetof({struct}, {field})"
        checked += 1
    assert checked > 50


def test_layouts_differ_where_the_releases_changed() -> None:
    # From 1.2.0 on the reserved bytes shrink as fields are added: ExtendParam stays 120 bytes.
    sizes = {abi: ctypes.sizeof(build_abi(abi).ExtendParam) for abi in ABI_VERSIONS}
    assert sizes == {"1.1": 116, "1.2.0": 120, "1.2": 120, "1.3": 120}
    assert build_abi("1.2.0").Param.top_p.offset == build_abi("1.1").Param.top_p.offset + 4  # n_keep
    assert build_abi("1.2").Input.input_type.offset == 12  # after role and enable_thinking
    assert build_abi("1.2.0").Input.input_type.offset == 0
    assert build_abi("1.3").InferParam.max_new_tokens.offset == 36
    assert build_abi("1.1").Callback is None and build_abi("1.3").Callback is not None


def test_multimodal_input_changed_in_1_2_1_and_1_3() -> None:
    # 1.1/1.2.0: prompt, image_embed, n_image_tokens; 1.2.1 adds n_image, image_width/height;
    # 1.3 nests them (with the markers) in `image` and adds `video`. The union grows with it.
    sizes = {abi: ctypes.sizeof(build_abi(abi).MultiModalInput) for abi in ABI_VERSIONS}
    assert sizes == {"1.1": 24, "1.2.0": 24, "1.2": 48, "1.3": 144}
    assert build_abi("1.3").MultiModalInput.video.offset == 8 + 64
    # Before 1.3 the image markers are RKLLMParam fields; 1.3 dropped them.
    assert all(hasattr(build_abi(abi).Param, "img_start") for abi in ("1.1", "1.2.0", "1.2"))
    assert not hasattr(build_abi("1.3").Param, "img_start")


@pytest.mark.parametrize("abi", ABI_VERSIONS)
def test_double_exports_every_function_of_its_abi(abi: str, rkllm_doubles: dict[str, Path]) -> None:
    lib = ctypes.CDLL(str(rkllm_doubles[abi]))
    functions = build_abi(abi).functions
    assert all(hasattr(lib, name) for name in functions)
    build_abi(abi).bind(lib)
    default = lib.rkllm_createDefaultParam()  # a struct returned by value
    assert default.max_context_len == 512 and abs(default.top_p - 0.9) < 1e-6


@pytest.mark.parametrize("abi", ABI_VERSIONS)
def test_library_abi_is_detected(abi: str, rkllm_doubles: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(rkllm_doubles[abi]))
    monkeypatch.delenv("RKLLAMA_RKLLM_ABI", raising=False)
    library = rkllm_library.load_library()
    assert (library.abi, library.version) == (abi, DOUBLE_VERSIONS[abi])


def test_abi_override_wins(rkllm_doubles: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(rkllm_doubles["1.2"]))
    monkeypatch.setenv("RKLLAMA_RKLLM_ABI", "1.2.1")
    assert rkllm_library.load_library().abi == "1.2"
    monkeypatch.setenv("RKLLAMA_RKLLM_ABI", "2.0")
    with pytest.raises(EngineError, match="RKLLAMA_RKLLM_ABI='2.0' is not a supported"):
        rkllm_library.load_library()


def test_unknown_runtime_version_is_refused(tmp_path: Path, monkeypatch) -> None:
    future = build_double("1.3", tmp_path, '-DDOUBLE_VERSION="1.4.0"', name="future.so")
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(future))
    monkeypatch.delenv("RKLLAMA_RKLLM_ABI", raising=False)
    with pytest.raises(EngineError, match=r"runtime 1\.4\.0, which RKLLama does not know.*RKLLAMA_RKLLM_ABI"):
        rkllm_library.load_library()
    monkeypatch.setenv("RKLLAMA_RKLLM_ABI", "1.3")
    assert rkllm_library.load_library().abi == "1.3"


def test_without_version_string_symbols_decide_or_the_user_must(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RKLLAMA_RKLLM_ABI", raising=False)
    old = build_double("1.2.0", tmp_path, "-DDOUBLE_NO_VERSION", name="old.so")
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(old))
    assert rkllm_library.load_library().abi == "1.2.0"
    new = build_double("1.3", tmp_path, "-DDOUBLE_NO_VERSION", name="new.so")
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(new))
    with pytest.raises(EngineError, match="Set RKLLAMA_RKLLM_ABI=1.2 or RKLLAMA_RKLLM_ABI=1.3"):
        rkllm_library.load_library()


def test_bare_version_strings_count_only_when_they_are_runtime_releases(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RKLLAMA_RKLLM_ABI", raising=False)
    bare = build_double("1.3", tmp_path, "-DDOUBLE_NO_VERSION", "-DDOUBLE_BARE_VERSIONS", name="bare.so")
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(bare))
    library = rkllm_library.load_library()
    assert (library.abi, library.version) == ("1.3", "1.3.0")


def test_missing_library_names_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(tmp_path / "nowhere" / "librkllmrt.so"))
    with pytest.raises(EngineError, match="does not exist. Install librkllmrt.so from"):
        rkllm_library.load_library()


def test_not_the_runtime_is_refused(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "other.c"
    source.write_text("int other_function(void) { return 0; }\n")
    other = tmp_path / "librkllmrt.so"
    subprocess.run([compiler(), "-shared", "-fPIC", "-o", str(other), str(source)], check=True)
    monkeypatch.setenv("RKLLAMA_RKLLM_LIB", str(other))
    monkeypatch.delenv("RKLLAMA_RKLLM_ABI", raising=False)
    with pytest.raises(EngineError, match="does not export rkllm_init/rkllm_run: it is not the rkllm runtime"):
        rkllm_library.load_library()


@pytest.mark.parametrize(
    ("compatible", "soc"),
    [
        (b"radxa,rock-5b\x00rockchip,rk3588\x00", "rk3588"),
        (b"xunlong,orangepi-5\x00rockchip,rk3588s\x00", "rk3588"),
        (b"rockchip,rk3576-evb\x00rockchip,rk3576\x00", "rk3576"),
        (b"rockchip,rv1126b\x00", "rv1126b"),
    ],
)
def test_soc_is_read_from_the_device_tree(compatible: bytes, soc: str, tmp_path: Path, monkeypatch) -> None:
    tree = tmp_path / "compatible"
    tree.write_bytes(compatible)
    monkeypatch.delenv("RKLLAMA_RKLLM_PLATFORM", raising=False)
    monkeypatch.setattr(rkllm_library, "DEVICE_TREE_COMPATIBLE", tree)
    assert rkllm_library.detect_platform() == soc


def test_other_boards_are_refused(tmp_path: Path, monkeypatch) -> None:
    tree = tmp_path / "compatible"
    tree.write_bytes(b"raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    monkeypatch.delenv("RKLLAMA_RKLLM_PLATFORM", raising=False)
    monkeypatch.setattr(rkllm_library, "DEVICE_TREE_COMPATIBLE", tree)
    with pytest.raises(EngineError, match="brcm,bcm2712.*set RKLLAMA_RKLLM_PLATFORM"):
        rkllm_library.detect_platform()
    monkeypatch.setenv("RKLLAMA_RKLLM_PLATFORM", "rk3399")
    with pytest.raises(EngineError, match="'rk3399' is not a supported Rockchip SoC"):
        rkllm_library.detect_platform()


def test_abi_numbers_cover_every_version() -> None:
    assert set(ABI_NUMBERS) == set(ABI_VERSIONS)
    assert rkllm_library.abi_for_version("1.1.2") == "1.1"
    assert rkllm_library.abi_for_version("1.2.0") == "1.2.0"
    assert rkllm_library.abi_for_version("1.2.1b1") == "1.2.0"  # the beta kept 1.2.0's callback
    assert rkllm_library.abi_for_version("1.3.0") == "1.3"
    assert rkllm_library.abi_for_version("1.0.1") is None
