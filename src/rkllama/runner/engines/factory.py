"""Picks and creates the engine for a model file. Apart from base.py, so that the seam
(base.py) does not import the concrete engines that import it."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError, LoadSpec


def check_model_file(spec: LoadSpec) -> None:
    """Refuse a file that cannot be a whole model with words, before a native library
    fails on it with none (or crashes)."""
    from .gguf_check import GgufProblem, check_gguf

    path = Path(spec.path)
    advice = "the file is damaged or incomplete; pull it again."
    try:
        if path.stat().st_size == 0:
            raise GgufProblem("is empty (0 bytes)")
        if spec.format == "gguf":
            check_gguf(path)
    except GgufProblem as problem:
        raise EngineError(f"{path.name} {problem}: {advice}") from None
    except OSError as exc:
        raise EngineError(f"{path.name} cannot be read ({exc.strerror}).") from None


def create_engine(spec: LoadSpec) -> Engine:
    """The model file's format picks the engine."""
    check_model_file(spec)
    if spec.format == "gguf":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(spec)
    if spec.format == "rkllm":
        from .rkllm import RkllmEngine

        return RkllmEngine(spec)
    raise EngineError(f"No engine for model format {spec.format!r}.")
