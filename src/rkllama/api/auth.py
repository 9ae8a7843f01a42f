"""The optional API key (`--api-key`, `--api-key-file`, RKLLAMA_API_KEY[_FILE]).

When set, every route but `GET /` (and a health check) needs it, as `Authorization: Bearer
<key>` (what the OpenAI and Ollama clients send) or `X-Api-Key: <key>` (as llama.cpp's
server accepts). guards.py applies it to every request, so a new route cannot forget it."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers

# Routes that stay open with a key set: they reveal and change nothing.
PUBLIC_ROUTES = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("HEAD", "/health")})

MISSING_KEY = "Missing API key: send the header 'Authorization: Bearer <key>'."
INVALID_KEY = "Invalid API key."


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC_ROUTES


def _matches(candidate: str, key: str) -> bool:
    # Constant time: the answer's timing must not reveal how much of a guess was right.
    return hmac.compare_digest(candidate.strip().encode(), key.encode())


def api_key_refusal(headers: Headers, key: str) -> str | None:
    """None when the request carries the key, else the message of the 401."""
    authorization = headers.get("authorization")
    x_api_key = headers.get("x-api-key")
    if not authorization and not x_api_key:
        return MISSING_KEY
    candidates = [x_api_key or ""]
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(token)
    return None if any(_matches(candidate, key) for candidate in candidates if candidate) else INVALID_KEY
