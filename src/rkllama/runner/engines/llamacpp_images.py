"""A request's images as the llama.cpp engine's prompt carries them.

The prompt stays a list of ints, so that fitting it into the context, choosing a slot and
reusing a cached prefix work as for text. Each image becomes what libmtmd makes of it (text
tokens around one or more image chunks; see llamacpp_vision.py), and each row of an image
chunk's embeddings a negative placeholder id that encodes which chunk and which row it is.
The same picture gives the same placeholders in every request, so a second turn about an
image finds it in the KV cache and evaluates none of it again; the batch decoder turns a
run of placeholders into one embeddings batch.

Chat messages carry their images as markers in their text (`marker(i)`: a per-request nonce,
so a user's text can never name an image); tokenizing a rendered prompt splits at them.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...types import ChatMessage
from .base import EngineError
from .llamacpp_vision import ImageChunk, Projector

ROW_BITS = 20  # rows of one chunk: up to ~1M embeddings
CHUNK_BITS = 40
# Images whose mtmd chunks and embeddings are kept for later requests (a few MB each).
CACHED_IMAGES = 16


def placeholder(chunk_id: int, row: int) -> int:
    return -(1 + ((chunk_id << ROW_BITS) | row))


def split_placeholder(token: int) -> tuple[int, int]:
    """(chunk id, row) of a placeholder."""
    value = -token - 1
    return value >> ROW_BITS, value & ((1 << ROW_BITS) - 1)


def is_image_token(token: int) -> bool:
    return token < 0


@dataclass
class EncodedChunk:
    """One image chunk of a cached image, encoded at most once."""

    chunk: ImageChunk
    chunk_id: int
    embeddings: Any = None  # float32 (n_tokens, n_embd), filled by ImageCache.encode


@dataclass
class CachedImage:
    tokens: list[int]  # text tokens and placeholders, what one image becomes in a prompt
    chunks: dict[int, EncodedChunk] = field(default_factory=dict)  # by chunk id


class ImageCache:
    """The images this model saw lately: their mtmd chunks and, once encoded, embeddings.
    Shared by the request threads; libmtmd's encoder runs one image at a time."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector
        self._images: OrderedDict[bytes, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def image(self, data: bytes) -> CachedImage:
        key = hashlib.sha256(data).digest()
        with self._lock:
            cached = self._images.get(key)
            if cached is not None:
                self._images.move_to_end(key)
                return cached
        cached = self._expand(key, data)
        with self._lock:
            self._images[key] = cached
            while len(self._images) > CACHED_IMAGES:
                self._images.popitem(last=False)  # chunks in use stay alive with their requests
        return cached

    def _expand(self, key: bytes, data: bytes) -> CachedImage:
        pieces = self.projector.split(self.projector.marker, [data], add_special=False)
        tokens: list[int] = []
        chunks: dict[int, EncodedChunk] = {}
        for index, piece in enumerate(pieces):
            if isinstance(piece, list):
                tokens.extend(piece)
                continue
            chunk_id = int.from_bytes(hashlib.sha256(key + index.to_bytes(4, "little")).digest()[:5], "little")
            chunks[chunk_id] = EncodedChunk(piece, chunk_id)
            tokens.extend(placeholder(chunk_id, row) for row in range(piece.n_tokens))
        return CachedImage(tokens, chunks)

    def encode(self, chunk: EncodedChunk) -> None:
        with self._encode_lock:
            if chunk.embeddings is None:
                chunk.embeddings = self.projector.encode(chunk.chunk)


class PromptImages:
    """The images of one request: markers for its messages, and what the decoder needs."""

    def __init__(self, cache: ImageCache, images: list[str]) -> None:
        self.cache = cache
        self._nonce = secrets.token_hex(8)
        self._marker = re.compile(rf"<__rkllama_image_{self._nonce}_(\d+)__>")
        self.data = [base64.b64decode(image) for image in images]
        self.chunks: dict[int, EncodedChunk] = {}

    def marker(self, index: int) -> str:
        return f"<__rkllama_image_{self._nonce}_{index}__>"

    def with_markers(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """Messages whose images are markers before their text (as Ollama places them)."""
        out, index = [], 0
        for message in messages:
            if not message.images:
                out.append(message)
                continue
            markers = "".join(self.marker(index + i) for i in range(len(message.images)))
            index += len(message.images)
            out.append(ChatMessage(**{**message.__dict__, "content": markers + message.content, "images": None}))
        return out

    def raw_prompt(self, prompt: str) -> str:
        """A raw prompt's images go before its text."""
        return "".join(self.marker(i) for i in range(len(self.data))) + prompt

    def tokenize(self, text: str, tokenize_text: Callable[[str, bool], list[int]]) -> list[int]:
        """The prompt's tokens with each marker replaced by its image's tokens and placeholders.
        `tokenize_text(text, first)` tokenizes the text between markers (BOS only when first)."""
        parts = self._marker.split(text)
        tokens: list[int] = []
        for position, part in enumerate(parts):
            if position % 2 == 0:
                if part or position == 0:
                    tokens.extend(tokenize_text(part, position == 0))
                continue
            image = self.cache.image(self.data[int(part)])
            self.chunks.update(image.chunks)
            tokens.extend(image.tokens)
        return tokens

    def encode(self, prompt: list[int]) -> None:
        """Encode the images the prompt holds (each cached image once), in the request's
        thread, so the decode thread only copies embeddings and never stalls the others."""
        seen = {split_placeholder(t)[0] for t in prompt if is_image_token(t)}
        for chunk_id in seen:
            self.cache.encode(self.chunks[chunk_id])

    # --- what the batch decoder asks ----------------------------------------------------
    def rows(self, token: int) -> tuple[EncodedChunk, int]:
        chunk_id, row = split_placeholder(token)
        chunk = self.chunks.get(chunk_id)
        if chunk is None or chunk.embeddings is None:
            raise EngineError("An image of this request was not encoded.")
        return chunk, row

    def image_start(self, prompt: list[int], index: int) -> int:
        """`index`, moved back to the start of the image chunk it falls inside (a cached
        prefix is reused up to a whole image, never into one)."""
        if 0 <= index < len(prompt) and is_image_token(prompt[index]):
            return index - split_placeholder(prompt[index])[1]
        return index

    def position(self, prompt: list[int], index: int) -> int:
        """The KV position of prompt entry `index` (at an image start, or text): image
        chunks advance the position by their n_pos, which M-RoPE models make smaller."""
        shift = 0
        for token in prompt[:index]:
            if is_image_token(token):
                chunk_id, row = split_placeholder(token)
                chunk = self.chunks[chunk_id].chunk
                if row == chunk.n_tokens - 1:  # counted once per image, at its last row
                    shift += chunk.n_tokens - chunk.n_pos
        return index - shift


def drop_partial_images(tokens: list[int], keep: int) -> list[int]:
    """A prompt cut from the front (after its first `keep` tokens) never starts inside an
    image chunk: the rest of a cut image goes too."""
    start = keep
    while start < len(tokens) and is_image_token(tokens[start]) and split_placeholder(tokens[start])[1] != 0:
        start += 1
    return tokens if start == keep else tokens[:keep] + tokens[start:]
