"""A small HTTP client for a running RKLLama server, used by the `rkllama` CLI.

It speaks the native API (model names as the server's /models lists them) and reads the
Ollama endpoints /api/tags and /api/ps for details (size, format, dates), falling back to the
native endpoints when a server does not have them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from .settings import DEFAULT_PORT

PULL_ERROR_PREFIX = "Error during download: "


class ClientError(Exception):
    """A failure the CLI prints as one line."""


class Unreachable(ClientError):
    pass


class ServerError(ClientError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def server_url(host: str | None = None) -> str:
    """`--host`, else RKLLAMA_HOST, else 127.0.0.1; `host`, `host:port` or a URL."""
    raw = (host or os.environ.get("RKLLAMA_HOST") or "127.0.0.1").strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    hostname = parts.hostname or "127.0.0.1"
    if hostname in {"0.0.0.0", "::"}:  # a bind-all address: talk to this machine
        hostname = "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    port = parts.port or int(os.environ.get("RKLLAMA_PORT") or DEFAULT_PORT)
    return f"{parts.scheme}://{hostname}:{port}"


@dataclass
class ModelRow:
    name: str
    size: int | None = None
    format: str | None = None
    modified: str | None = None  # ISO 8601
    expires: str | None = None  # ISO 8601, for loaded models


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):  # the OpenAI shape
            error = error.get("message")
        if error:
            return str(error)
    return f"HTTP {response.status_code}"


def _native_name(listed: str, names: list[str]) -> str:
    """Map an Ollama name (`x:latest`, a flat file without suffix) to the server's own name."""
    bare = listed.removesuffix(":latest")
    for name in names:
        if name in (listed, bare) or (name.endswith((".gguf", ".rkllm")) and name.rsplit(".", 1)[0] == bare):
            return name
    return bare


class RkllamaClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RkllamaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------
    def _unreachable(self, exc: httpx.HTTPError) -> Unreachable:
        return Unreachable(
            f"cannot reach the RKLLama server at {self.base_url} ({type(exc).__name__}). "
            "Start it with `rkllama serve`, or point --host / RKLLAMA_HOST at it."
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise ServerError(_error_message(response), response.status_code)
        return response

    def _stream_lines(self, path: str, payload: dict[str, Any]) -> Iterator[str]:
        try:
            with self._http.stream("POST", path, json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServerError(_error_message(response), response.status_code)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    # --- models -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.request("GET", "/models").json().get("models", []))

    def models(self) -> list[ModelRow]:
        names = self.names()
        try:
            tags = self.request("GET", "/api/tags").json().get("models", [])
        except ServerError as exc:
            if exc.status != 404:
                raise
            return [ModelRow(name) for name in names]  # a server without the Ollama API
        rows = {name: ModelRow(name) for name in names}
        for tag in tags:
            name = _native_name(str(tag.get("name", "")), names)
            rows[name] = ModelRow(
                name=name,
                size=tag.get("size"),
                format=(tag.get("details") or {}).get("format"),
                modified=tag.get("modified_at"),
            )
        return [rows[name] for name in sorted(rows, key=str.lower)]

    def current_model(self) -> str | None:
        try:
            return self.request("GET", "/current_model").json().get("model_name")
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise

    def loaded(self) -> list[ModelRow]:
        try:
            listed = self.request("GET", "/api/ps").json().get("models", [])
        except ServerError as exc:
            if exc.status != 404:
                raise
            current = self.current_model()
            return [ModelRow(current)] if current else []
        names = self.names()
        return [
            ModelRow(
                name=_native_name(str(item.get("name", "")), names),
                size=item.get("size"),
                format=(item.get("details") or {}).get("format"),
                expires=item.get("expires_at"),
            )
            for item in listed
        ]

    def load(self, name: str) -> str | None:
        """Make `name` the current model, unloading another one first. Returns the one unloaded."""
        if name not in self.names():  # checked first, so a typo never unloads the current model
            raise ServerError(f"Model {name} not found in the models directory.", 404)
        current = self.current_model()
        if current == name:
            return None
        if current is not None:
            self.request("POST", "/unload_model")
        self.request("POST", "/load_model", json={"model_name": name})
        return current

    def unload(self) -> str:
        current = self.current_model()
        if current is None:
            raise ServerError("No model is currently loaded.", 400)
        self.request("POST", "/unload_model")
        return current

    def delete(self, name: str) -> str:
        return str(self.request("POST", "/rm", json={"model": name}).json().get("message", ""))

    def server_info(self) -> dict[str, Any] | None:
        """GET /api/version: the server's version, engines and SoC; None if it does not answer."""
        try:
            return self.request("GET", "/api/version").json()
        except ClientError:
            return None

    # --- streams ----------------------------------------------------------------------------
    def pull(self, ref: str) -> Iterator[str]:
        """The lines of POST /pull; a failure after the start arrives as a last error line."""
        try:
            yield from (line for line in self._stream_lines("/pull", {"model": ref}) if line)
        except ServerError as exc:
            raise ServerError(str(exc).removeprefix(PULL_ERROR_PREFIX), exc.status) from None

    def chat(
        self,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        on_usage: Callable[[dict[str, Any]], None] | None = None,
    ) -> Iterator[str]:
        """Stream the reply to `messages` from the current model, piece by piece;
        `on_usage` gets the final chunk's token counts."""
        payload = {"messages": messages, "stream": True, **options}
        for line in self._stream_lines("/generate", payload):
            if not line.strip():
                continue
            chunk = json.loads(line)
            if "error" in chunk:
                raise ServerError(str(chunk["error"]), 500)
            for choice in chunk.get("choices", []):
                if choice.get("content"):
                    yield choice["content"]
            usage = chunk.get("usage") or {}
            if on_usage is not None and usage.get("prompt_tokens") is not None:
                on_usage(usage)
