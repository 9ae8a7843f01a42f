"""Fetching the http(s) image URLs of OpenAI image parts, when RKLLAMA_IMAGE_URLS allows it.

Off by default: a server that fetches what a client names can be pointed at hosts only it
can reach. When on, each fetch is bounded in bytes (RKLLAMA_MAX_IMAGE_BYTES) and time, and
the image is checked like any other (images.py)."""

from __future__ import annotations

import base64

import httpx

from ..errors import BadRequest
from ..images import check_image_bytes
from ..settings import RequestLimits
from ..types import GenerateRequest

FETCH_TIMEOUT_SECONDS = 20.0


def is_remote(image: str) -> bool:
    # Checked images are base64 of PNG/JPEG ("iVBOR...", "/9j/..."): never "http".
    return image.startswith(("http://", "https://"))


async def fetch_remote_images(request: GenerateRequest, limits: RequestLimits) -> None:
    """Replace every http(s) URL among the request's images by the checked image it names."""
    remote = [m for m in request.messages or [] if any(is_remote(i) for i in m.images or [])]
    if not remote:
        return
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=True, max_redirects=3) as client:
        for message in remote:
            message.images = [await _fetch(client, i, limits) if is_remote(i) else i for i in message.images or []]


async def _fetch(client: httpx.AsyncClient, url: str, limits: RequestLimits) -> str:
    rules = limits.image_rules()
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise BadRequest(f"The image URL {url} answered HTTP {response.status_code}.")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > rules.max_bytes:
                    raise BadRequest(
                        f"The image at {url} is larger than {rules.max_bytes} bytes (setting RKLLAMA_MAX_IMAGE_BYTES)."
                    )
    except httpx.HTTPError as exc:
        raise BadRequest(f"The image URL {url} could not be fetched: {exc}.") from None
    return base64.b64encode(check_image_bytes(bytes(data), url, rules)).decode("ascii")
