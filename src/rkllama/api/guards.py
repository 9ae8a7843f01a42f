"""Checks every request passes before any route, as ASGI middleware, so that a new route
cannot forget them (docs/security.md). Outermost first:

1. HostOriginGuard: the Host header must be a name we serve (DNS rebinding), and a browser
   Origin must be allowed (a foreign web page changes and reads nothing).
2. Starlette's CORSMiddleware: answers preflights from allowed origins, with that origin.
3. RequestGuard: the API key, JSON-typed bodies on mutating requests, the body size limit.

Refusals are JSON in the error shape of the route's dialect, with a message saying what to do."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import Settings, SettingsError
from .auth import api_key_refusal, is_public
from .origins import AccessPolicy, is_loopback_bind

log = logging.getLogger("rkllama")

# (path, status, message) -> the error response in the shape of the path's dialect.
ErrorRenderer = Callable[[str, int, str], Response]

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class HostOriginGuard:
    def __init__(self, app: ASGIApp, policy: AccessPolicy, render: ErrorRenderer) -> None:
        self.app = app
        self.policy = policy
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        origin = headers.get("origin")
        message = None
        if not self.policy.allows_host(host):
            message = (
                f"Host '{host}' is not served here (it could be a DNS-rebinding page). Use an IP address or"
                " localhost, or allow the name with --allowed-hosts (RKLLAMA_ALLOWED_HOSTS)."
            )
        elif origin is not None and not self.policy.allows_origin(origin, host):
            message = (
                f"Requests from the web page at origin '{origin}' are refused. To allow that origin, start the"
                f" server with --origins {origin} (RKLLAMA_ORIGINS)."
            )
        if message is None:
            await self.app(scope, receive, send)
        else:
            await self.render(scope["path"], 403, message)(scope, receive, send)


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def content_type_refusal(headers: Headers) -> str | None:
    """A web page can POST text/plain or a form without a preflight: only JSON-typed bodies
    are read. Scripts and `curl -d` (no Origin) may also send no type or the form type."""
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if "origin" not in headers and media in ("", "application/x-www-form-urlencoded"):
        return None
    got = f"Content-Type '{media}'" if media else "no Content-Type"
    return f"The request body must be JSON (got {got}); send it with the header 'Content-Type: application/json'."


def body_too_large(limit: int) -> str:
    return (
        f"The request body is larger than the limit of {limit} bytes ({limit / 2**20:.3g} MiB); send a smaller"
        " body, or raise the limit with --max-body-bytes (RKLLAMA_MAX_BODY_BYTES)."
    )


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, render: ErrorRenderer) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.render = render

    def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        method, path = scope["method"], scope["path"]
        if self.api_key and not is_public(method, path):
            message = api_key_refusal(headers, self.api_key)
            if message:
                response = self.render(path, 401, message)
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        if method in MUTATING_METHODS and _has_body(headers):
            message = content_type_refusal(headers)
            if message:
                return self.render(path, 415, message)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self.render(path, 413, body_too_large(self.max_body_bytes))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive (chunked bodies declare no length): past the limit,
        the route's read fails with 413 before the rest is buffered."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, body_too_large(self.max_body_bytes))
            return message

        return counted


def warn_about_exposure(settings: Settings) -> None:
    if not is_loopback_bind(settings.host) and not settings.api_key:
        log.warning(
            "Serving on %s without an API key: anyone who can reach this address can pull, delete and load"
            " models and generate. Set one with --api-key-file (RKLLAMA_API_KEY_FILE) or --api-key, or bind"
            " to 127.0.0.1.",
            settings.host,
        )
    if "*" in settings.origins:
        log.warning("--origins '*': any web page the user opens can use this server.")
    if "*" in settings.allowed_hosts:
        log.warning("--allowed-hosts '*': any Host name is served; DNS-rebinding pages can read replies.")


def install_guards(app: FastAPI, settings: Settings, render: ErrorRenderer) -> None:
    """Add the three layers; Starlette runs the last added first."""
    if settings.max_body_bytes <= 0:
        raise SettingsError(f"--max-body-bytes must be positive, got {settings.max_body_bytes}.")
    policy = AccessPolicy.build(settings.host, settings.allowed_hosts, settings.origins)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, render=render)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if policy.any_origin else [],
        allow_origin_regex=policy.cors_regex(),
        allow_methods=["*"],
        allow_headers=["*"],
        # Allowed origins only: a page the user allowed may reach a server on the private network.
        allow_private_network=True,
    )
    app.add_middleware(HostOriginGuard, policy=policy, render=render)
    warn_about_exposure(settings)
