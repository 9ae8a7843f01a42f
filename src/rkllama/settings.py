"""One settings schema: CLI flags and RKLLAMA_* environment variables both fill it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MODELS_DIR = "~/RKLLAMA/models"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RKLLAMA_{name}", default)


def _env_bool(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Settings:
    host: str = field(default_factory=lambda: _env("HOST", DEFAULT_HOST) or DEFAULT_HOST)
    port: int = field(default_factory=lambda: int(_env("PORT", str(DEFAULT_PORT)) or DEFAULT_PORT))
    models_dir: Path = field(
        default_factory=lambda: Path(_env("MODELS", DEFAULT_MODELS_DIR) or DEFAULT_MODELS_DIR).expanduser()
    )
    log_level: str = field(default_factory=lambda: (_env("LOG_LEVEL", "info") or "info").lower())
    # Skip installing and loading the built-in default model at start.
    no_default: bool = field(default_factory=lambda: _env_bool("NO_DEFAULT"))
    # When set, /api/* and /v1/* require "Authorization: Bearer <key>".
    api_key: str | None = field(default_factory=lambda: _env("API_KEY") or None)
    # Model to load at start instead of the built-in default.
    model: str | None = field(default_factory=lambda: _env("MODEL") or None)
    max_loaded_models: int = field(default_factory=lambda: int(_env("MAX_LOADED_MODELS", "1") or 1))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def display_models_dir(self) -> str:
        """The models dir as users wrote it: ~ for the home directory."""
        home = str(Path.home())
        text = str(self.models_dir)
        return "~" + text[len(home) :] if text.startswith(home + os.sep) else text
