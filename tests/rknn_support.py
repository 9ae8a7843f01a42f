"""The rknn test double (a stand-in for librknnrt.so), its layout program, and its fake
`.rknn` vision encoders: a one-line text file giving the input size, the image tokens and
the embedding width (tests/rknn_double/rknn_double.c says what it computes)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from rkllm_support import compiler

RKNN_DIR = Path(__file__).parent / "rknn_double"


def build_rknn_double(out_dir: Path) -> Path:
    out = out_dir / "librknnrt.so"
    source = RKNN_DIR / "rknn_double.c"
    subprocess.run([compiler(), "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out), str(source)], check=True)
    return out


def build_rknn_layout_program(out_dir: Path) -> Path:
    out = out_dir / "rknn_layout"
    define = '-DRKNN_HEADER="rknn_layout.h"'
    subprocess.run(
        [compiler(), "-Wall", "-Werror", define, "-o", str(out), str(RKNN_DIR / "rknn_layout.c")], check=True
    )
    return out


@pytest.fixture(scope="session")
def rknn_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rknn_double(tmp_path_factory.mktemp("rknn_double"))


@dataclass(frozen=True)
class FakeEncoder:
    path: Path
    height: int
    width: int
    tokens: int  # image tokens per image
    embed: int  # floats per token and output
    outputs: int = 1

    def token_values(self, rgb: tuple[int, int, int]) -> list[float]:
        """What the double gives one token of a solid-colour image (every run of values has the
        colour's mean), for each output in turn: one token's row of the joined embedding."""
        mean = sum(rgb) / 3 / 255
        return [mean + 0.001 * d + 0.1 * o for o in range(self.outputs) for d in range(self.embed)]

    def embedding_sum(self, rgb: tuple[int, int, int]) -> float:
        return self.tokens * sum(self.token_values(rgb))


def write_fake_encoder(
    path: Path, height: int = 8, width: int = 8, tokens: int = 4, embed: int = 16, fmt: str = "nhwc", outputs: int = 1
) -> FakeEncoder:
    path.write_text(f"RKNN-DOUBLE h={height} w={width} c=3 fmt={fmt} tokens={tokens} embed={embed} outputs={outputs}\n")
    return FakeEncoder(path, height, width, tokens, embed, outputs)
