"""Checking the images a client sends, before any model sees them.

Every dialect hands its images here as base64 text (Ollama's `images`, the payload of an
OpenAI `data:` URL) or as fetched bytes (an `http(s)` URL, when the setting allows it).
An image is decoded once with Pillow, so that undecodable data, an unsupported format or a
picture over the pixel limit gets a 400 naming the image, not a crash in a native library.
Engines then receive PNG or JPEG bytes (base64 inside the runner's JSON), formats that both
llama.cpp's image loader and our rkllm preprocessing read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import BadRequest

# Formats a client may send; anything else is refused by name.
ACCEPTED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
# Formats passed on as they are; the others are re-encoded as PNG.
PASSED_FORMATS = {"PNG", "JPEG"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class ImageRules:
    """The settings an image is checked against (docs/vision.md, docs/limits.md)."""

    max_pixels: int
    max_bytes: int


def check_image_b64(data: object, where: str, rules: ImageRules) -> str:
    """A client's base64 image as the base64 of a PNG or JPEG an engine can read."""
    if not isinstance(data, str):
        raise BadRequest(f"'{where}' must be a base64 string, got {type(data).__name__}.")
    text = data.strip()
    if text.lower().startswith("data:"):  # Ollama clients sometimes send a whole data URL
        text = data_url_payload(text, where)
    if len(text) * 3 // 4 > rules.max_bytes:
        raise _too_big(where, rules)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{where}' is not valid base64 image data.") from None
    return base64.b64encode(check_image_bytes(raw, where, rules)).decode("ascii")


def check_images_b64(images: list[object] | None, where: str, rules: ImageRules) -> list[str] | None:
    """A list of a client's base64 images, each checked (`where.i` names it); None if empty."""
    return [check_image_b64(image, f"{where}.{i}", rules) for i, image in enumerate(images)] if images else None


def data_url_payload(url: str, where: str) -> str:
    """The base64 payload of a `data:image/...;base64,...` URL."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise BadRequest(f"'{where}' must be a base64 data URL: data:image/png;base64,<data>.")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadRequest(f"'{where}' is a data URL of type {mime!r}; only images are accepted.")
    return url[match.end() :]


def check_image_bytes(raw: bytes, where: str, rules: ImageRules) -> bytes:
    """Decode the whole image (within the pixel limit) and return PNG or JPEG bytes."""
    if not raw:
        raise BadRequest(f"'{where}' is empty: no image data.")
    if len(raw) > rules.max_bytes:
        raise _too_big(where, rules)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice the limit raises) about decompression bombs; our
            # own pixel limit, checked from the header before decoding, is what applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            kind = image.format or "unknown"
            if kind not in ACCEPTED_FORMATS:
                raise BadRequest(f"'{where}' is a {kind} image; send PNG, JPEG, WebP, GIF or BMP.")
            width, height = image.size
            if width * height > rules.max_pixels:
                raise BadRequest(
                    f"'{where}' is {width}x{height} pixels ({width * height}); at most {rules.max_pixels} pixels "
                    "are allowed (setting RKLLAMA_MAX_IMAGE_PIXELS). Scale it down and send it again."
                )
            image.load()  # decodes everything: truncated or corrupt data fails here, not in an engine
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(f"'{where}' is not an image this server reads: send PNG, JPEG, WebP, GIF or BMP.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"'{where}' could not be decoded as an image: {exc}.") from None
    if kind in PASSED_FORMATS and image.mode in ("RGB", "L", "RGBA", "P"):
        return raw
    out = io.BytesIO()
    image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
    return out.getvalue()


def _too_big(where: str, rules: ImageRules) -> BadRequest:
    return BadRequest(
        f"'{where}' is larger than {rules.max_bytes} bytes (setting RKLLAMA_MAX_IMAGE_BYTES). "
        "Scale it down or compress it and send it again."
    )
