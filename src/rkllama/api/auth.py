"""The optional API key of the Ollama and OpenAI dialects (`--api-key`, RKLLAMA_API_KEY).

When set, every /api/* and /v1/* request must carry `Authorization: Bearer <key>`. The
native API and `/` stay open, as the RKLLama spec has no authentication."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import Unauthorized
from .common import app_state


async def require_api_key(request: Request) -> None:
    key = app_state(request).settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token:
        raise Unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'.")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("Invalid API key.")
