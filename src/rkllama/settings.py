"""One settings schema: CLI flags and RKLLAMA_* environment variables both fill it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .context_size import default_kv_budget, parse_size
from .errors import RkllamaError
from .images import ImageRules
from .memory import parse_memory_budget

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MODELS_DIR = "~/RKLLAMA/models"
# Generous: a chat with a few base64 images fits; one request cannot fill the memory.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_QUEUE = 512
# 4096 x 4096: larger than any vision encoder's input; decoding one costs at most ~64 MB.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
DEFAULT_KEEP_ALIVE = "5m"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RKLLAMA_{name}", default)


def _env_bool(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


class SettingsError(RkllamaError):
    """A setting that cannot be used; the server does not start."""


def comma_list(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: the form of list settings in flags and the environment."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def read_api_key_file(path: Path) -> str:
    """The file holds the key alone on one line; surrounding whitespace is ignored."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"Cannot read the API key file {path}: {exc}.") from None
    if not key:
        raise SettingsError(f"The API key file {path} is empty; write the key in it.")
    if "\n" in key:
        raise SettingsError(f"The API key file {path} holds more than one line; write only the key in it.")
    return key


def _env_int(name: str, default: int) -> int:
    text = _env(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"RKLLAMA_{name} must be a whole number, got {text!r}.") from None
    if value < 1:
        raise SettingsError(f"RKLLAMA_{name} must be at least 1, got {value}.")
    return value


@dataclass
class RequestLimits:
    """The largest request a client may send; each over its bound is a 400 (docs/limits.md)."""

    # Tokens one reply may ask for (max_tokens, num_predict); the context bounds it further.
    max_tokens: int = field(default_factory=lambda: _env_int("MAX_TOKENS", 2**20))
    # Characters of prompt: all messages' text together, or one embedding input.
    max_prompt_chars: int = field(default_factory=lambda: _env_int("MAX_PROMPT_CHARS", 4 * 2**20))
    max_messages: int = field(default_factory=lambda: _env_int("MAX_MESSAGES", 4096))
    # OpenAI's own limits on embedding inputs and tools.
    max_embed_inputs: int = field(default_factory=lambda: _env_int("MAX_EMBED_INPUTS", 2048))
    max_tools: int = field(default_factory=lambda: _env_int("MAX_TOOLS", 128))
    max_stop_strings: int = field(default_factory=lambda: _env_int("MAX_STOP_STRINGS", 32))
    max_stop_chars: int = field(default_factory=lambda: _env_int("MAX_STOP_CHARS", 256))
    max_images: int = field(default_factory=lambda: _env_int("MAX_IMAGES", 16))
    # One image: its pixels (width x height, checked before decoding) and its encoded bytes.
    max_image_pixels: int = field(default_factory=lambda: _env_int("MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))
    max_image_bytes: int = field(default_factory=lambda: _env_int("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES))
    # Let OpenAI image_url parts name http(s) URLs that the server fetches. Off: a server
    # must not be made to fetch arbitrary URLs for a client (docs/vision.md).
    image_urls: bool = field(default_factory=lambda: _env_bool("IMAGE_URLS"))

    def image_rules(self) -> ImageRules:
        return ImageRules(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)


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
    # When set, every route but GET / requires "Authorization: Bearer <key>" (docs/security.md).
    api_key: str | None = field(default_factory=lambda: _env("API_KEY") or None)
    # A file holding the key, so it need not show in `ps` or the environment.
    api_key_file: Path | None = field(
        default_factory=lambda: Path(_env("API_KEY_FILE") or "").expanduser() if _env("API_KEY_FILE") else None
    )
    # Host header names served besides loopback names, IP addresses and the bind address; "*" for any.
    allowed_hosts: list[str] = field(default_factory=lambda: comma_list(_env("ALLOWED_HOSTS")))
    # Browser origins allowed besides the local ones (like OLLAMA_ORIGINS); "*" for any.
    origins: list[str] = field(default_factory=lambda: comma_list(_env("ORIGINS")))
    max_body_bytes: int = field(default_factory=lambda: _env_int("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
    # Model to load at start instead of the built-in default.
    model: str | None = field(default_factory=lambda: _env("MODEL") or None)
    max_loaded_models: int = field(default_factory=lambda: int(_env("MAX_LOADED_MODELS", "1") or 1))
    # Memory all loaded models may take together: "80%" or "0.8" of the memory available at
    # start, or a size ("6GiB"); None: 80% (memory.py).
    memory_budget: str | None = field(default_factory=lambda: _env("MEMORY_BUDGET") or None)
    # Requests that may wait for a model at once (as OLLAMA_MAX_QUEUE); more get a 503.
    max_queue: int = field(default_factory=lambda: _env_int("MAX_QUEUE", DEFAULT_MAX_QUEUE))
    # How long a model loaded for an Ollama/OpenAI request stays loaded when idle (Ollama's
    # duration syntax; a negative value: for good), unless a request's keep_alive says otherwise.
    keep_alive: str = field(default_factory=lambda: _env("KEEP_ALIVE") or DEFAULT_KEEP_ALIVE)
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Context length for models whose Modelfile sets no NUM_CTX; None: the trained context
    # (within the KV cache budget). See context_size.py.
    context_length: int | None = field(default_factory=lambda: int(_env("CONTEXT_LENGTH") or 0) or None)
    # Bytes the KV cache of one model may take by default ("4GiB", "512M", MiB); None: a quarter of memory.
    kv_cache_budget: str | None = field(default_factory=lambda: _env("KV_CACHE_BUDGET") or None)

    # A busy runner that sends nothing (no token, no heartbeat) for this many seconds is hung:
    # it is killed and its requests get a 504. 0 turns the watchdog off.
    runner_timeout: float = field(default_factory=lambda: float(_env("RUNNER_TIMEOUT", "60") or 60))
    # How long an unload waits for requests in flight to finish before stopping them.
    unload_grace: float = field(default_factory=lambda: float(_env("UNLOAD_GRACE", "30") or 30))
    # The longest message a runner may send (bytes); longer is a protocol error.
    runner_max_message_bytes: int = field(
        default_factory=lambda: int(_env("RUNNER_MAX_MESSAGE_BYTES", str(2**24)) or 2**24)
    )

    def kv_budget_bytes(self) -> int:
        return parse_size(self.kv_cache_budget) if self.kv_cache_budget else default_kv_budget()

    def memory_budget_bytes(self) -> int:
        try:
            return parse_memory_budget(self.memory_budget)
        except ValueError as exc:
            raise SettingsError(f"--memory-budget (RKLLAMA_MEMORY_BUDGET): {exc}.") from None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def resolve_api_key(self) -> None:
        """Read the key from api_key_file, if given; a missing or empty file stops the start."""
        if self.api_key_file is None:
            return
        if self.api_key:
            raise SettingsError("Give the API key once: --api-key (RKLLAMA_API_KEY) or --api-key-file, not both.")
        self.api_key = read_api_key_file(self.api_key_file)

    @property
    def display_models_dir(self) -> str:
        """The models dir as users wrote it: ~ for the home directory."""
        home = str(Path.home())
        text = str(self.models_dir)
        return "~" + text[len(home) :] if text.startswith(home + os.sep) else text
