"""Images for the llama.cpp engine: a thin layer over libmtmd (`llama_cpp.mtmd_cpp`).

A `Projector` loads the model's mmproj GGUF next to its text model. `split` turns a prompt
holding one `marker` per image into pieces: runs of text tokens and `ImageChunk`s.
`encode` runs the vision tower on one image chunk and returns its embeddings
(n_tokens x n_embd float32); `image_batch` turns a piece of them into a batch that the batch
decoder (llamacpp_batch.py) evaluates into a sequence of the text model's KV cache.

How an image goes into the KV cache (what mtmd-helper.cpp's mtmd_helper_decode_image_chunk does):
- positions: plain models give embedding i the position n_past + i; M-RoPE models
  (`uses_mrope`, Qwen-VL) give each embedding 4 positions (t, y, x, z) from
  mtmd_helper_image_get_decoder_pos, laid out section-major in the batch's pos array.
- the sequence then continues at n_past + chunk.n_pos (n_pos < n_tokens for M-RoPE),
  while the image occupies chunk.n_tokens KV cells.
- `non_causal` models (Gemma 3) attend bidirectionally inside an image: causal attention is
  switched off around its decode, and the whole image must fit one batch (n_batch and n_ubatch
  >= n_tokens), else the image would be split across ubatches and attend only partly.
- image batches carry embeddings, not tokens, so they are decoded on their own: one
  llama_decode per piece of n_batch rows, never mixed with other sequences' tokens.

Threads: one mtmd context is not safe to use from two threads at once (encode writes one
shared output buffer), so a Projector serialises its calls with a lock. Encoding uses its own
ggml backend, so it may run in another thread while llama_decode runs on the text context.
Close the Projector before the text model: the mtmd context uses the model's vocab.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from llama_cpp._internals import LlamaModel
from PIL import Image, UnidentifiedImageError

from .base import EngineError, EngineRuntimeError

log = logging.getLogger(__name__)

_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5
_recent_errors: list[str] = []  # libmtmd's last error lines, quoted in our exceptions
_last_level = 0


@llama_cpp.llama_log_callback
def _mtmd_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # libmtmd (and clip) log every tensor at load on stderr by default; keep only problems.
    global _last_level
    if level != _GGML_LOG_CONT:
        _last_level = level
    if _last_level >= _GGML_LOG_WARN:
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            log.warning("mtmd: %s", line)
            if _last_level == _GGML_LOG_ERROR:
                _recent_errors.append(line)
                del _recent_errors[:-4]


mtmd.mtmd_helper_log_set(_mtmd_log, None)  # also sets mtmd's (and clip's) logger


def _native_errors() -> str:
    text = " ".join(_recent_errors)
    _recent_errors.clear()
    return f": {text}" if text else ""


def _image_rgb(data: bytes, index: int) -> tuple[int, int, bytes]:
    """Decodes with Pillow rather than mtmd_helper_bitmap_init_from_buf: that helper takes
    undecodable bytes for audio, or (in builds with video) hands them to ffmpeg."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise EngineError(f"image {index + 1} is not in a known image format") from exc
    except Exception as exc:  # PIL raises many types for broken data
        raise EngineError(f"image {index + 1} could not be decoded: {exc}") from exc
    return rgb.width, rgb.height, rgb.tobytes()


class ImageChunk:
    """One image of a prompt after preprocessing: a native mtmd input chunk this object owns.

    Two chunks are equal when their image bytes (`key`) and token counts are: a cached prefix
    holding an image matches a new prompt holding the same image."""

    def __init__(self, chunk: int, key: int) -> None:
        self.key = key  # stable id of the image content (from a SHA-256 of its bytes)
        self.n_tokens: int = mtmd.mtmd_input_chunk_get_n_tokens(chunk)  # KV cells it occupies
        self.n_pos: int = mtmd.mtmd_input_chunk_get_n_pos(chunk)  # positions it advances
        self._chunk: int | None = chunk
        self._free = weakref.finalize(self, mtmd.mtmd_input_chunk_free, chunk)  # runs at most once

    @property
    def native(self) -> int:
        if self._chunk is None:
            raise EngineRuntimeError("image chunk used after close")
        return self._chunk

    def close(self) -> None:
        self._chunk = None
        self._free()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageChunk) and (self.key, self.n_tokens) == (other.key, other.n_tokens)

    def __hash__(self) -> int:
        return hash((self.key, self.n_tokens))

    def __repr__(self) -> str:
        return f"ImageChunk(key={self.key:#x}, n_tokens={self.n_tokens}, n_pos={self.n_pos})"


Piece = list[int] | ImageChunk  # a run of text tokens, or one image


class Projector:
    """An mtmd context: the vision projector of one text model."""

    def __init__(self, model: LlamaModel, mmproj_path: str, n_threads: int) -> None:
        self._model = model  # kept alive: the mtmd context reads its vocab
        self._lock = threading.Lock()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = max(1, n_threads)
        params.print_timings = False
        params.warmup = False  # the first image pays the graph allocation instead of every load
        _recent_errors.clear()
        ctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), model.model, params)
        if not ctx:
            raise EngineError(f"could not load the vision projector {mmproj_path}{_native_errors()}")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise EngineError(f"{mmproj_path} is not a vision projector (no image encoder)")
        self._ctx: int | None = ctx
        self._free = weakref.finalize(self, mtmd.mtmd_free, ctx)
        self.marker: str = mtmd.mtmd_default_marker().decode()  # what a prompt holds where an image goes
        self.uses_mrope: bool = mtmd.mtmd_decode_use_mrope(ctx)
        self.non_causal: bool = mtmd.mtmd_decode_use_non_causal(ctx, None)
        self.n_embd: int = llama_cpp.llama_model_n_embd_inp(model.model)

    @property
    def _native(self) -> int:
        if self._ctx is None:
            raise EngineRuntimeError("vision projector used after close")
        return self._ctx

    def split(self, prompt_text: str, images: list[bytes], add_special: bool) -> list[Piece]:
        """Tokenizes a prompt holding one marker per image (special tokens parsed, like a chat
        template's), in order; adjacent text is one piece."""
        n_markers = prompt_text.count(self.marker)
        if n_markers != len(images):
            raise EngineError(f"the prompt has {n_markers} image marker(s) but {len(images)} image(s) came with it")
        bitmaps: list[int] = []
        try:
            for i, data in enumerate(images):  # one by one: those made are freed if a later one fails
                bitmaps.append(self._bitmap(data, i))
            with self._lock:
                return self._tokenize(prompt_text, images, bitmaps, add_special)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, data: bytes, index: int) -> int:
        width, height, rgb = _image_rgb(data, index)
        bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
        if not bitmap:
            raise EngineRuntimeError(f"image {index + 1}: mtmd_bitmap_init failed")
        # The id mtmd keeps with the chunk (like mtmd_helper_bitmap_init_from_buf's).
        mtmd.mtmd_bitmap_set_id(bitmap, hashlib.sha256(data).hexdigest().encode())
        return bitmap

    def _tokenize(self, prompt_text: str, images: list[bytes], bitmaps: list[int], add_special: bool) -> list[Piece]:
        text = prompt_text.encode()
        inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=add_special, parse_special=True)
        chunks = mtmd.mtmd_input_chunks_init()
        if not chunks:
            raise EngineRuntimeError("mtmd_input_chunks_init failed")
        try:
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            code = mtmd.mtmd_tokenize(self._native, chunks, ctypes.byref(inp), array, len(bitmaps))
            if code == 1:
                raise EngineError(f"the prompt's image markers do not match its {len(images)} image(s)")
            if code != 0:
                raise EngineError(f"the image(s) could not be preprocessed (mtmd_tokenize: {code}){_native_errors()}")
            keys = iter(_image_key(data) for data in images)
            return _pieces(chunks, keys)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """The image's embeddings, (n_tokens, n_embd) float32, a copy (mtmd reuses its buffer)."""
        with self._lock:
            code = mtmd.mtmd_encode_chunk(self._native, chunk.native)
            if code != 0:
                raise EngineRuntimeError(f"encoding the image failed (mtmd_encode_chunk: {code}){_native_errors()}")
            out = mtmd.mtmd_get_output_embd(self._native)
            size = chunk.n_tokens * self.n_embd
            return np.ctypeslib.as_array(out, shape=(size,)).reshape(chunk.n_tokens, self.n_embd).copy()

    def close(self) -> None:
        self._ctx = None
        self._free()


def _image_key(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def _pieces(chunks: int, keys: Iterator[int]) -> list[Piece]:
    pieces: list[Piece] = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        kind = mtmd.mtmd_input_chunk_get_type(chunk)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            run = np.ctypeslib.as_array(tokens, shape=(n.value,)).tolist() if n.value else []
            if pieces and isinstance(pieces[-1], list):
                pieces[-1].extend(run)
            elif run:
                pieces.append(run)
        elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            # Owned copies: the chunks list is freed right after.
            pieces.append(ImageChunk(mtmd.mtmd_input_chunk_copy(chunk), next(keys)))
        else:
            raise EngineRuntimeError(f"unexpected mtmd chunk type {kind}")
    return pieces


@dataclass
class ImageBatch:
    """A llama_batch over some rows of an image's embeddings; valid while this object lives
    (the batch points into the arrays it keeps)."""

    batch: llama_cpp.llama_batch
    n_tokens: int
    _keep: list[object] = field(default_factory=list, repr=False)


def image_positions(projector: Projector, chunk: ImageChunk, n_past: int) -> np.ndarray:
    """Positions of the image's embeddings: shape (1, n_tokens), or (4, n_tokens) for M-RoPE
    (rows t, y, x, z as llama.cpp's section-major pos array wants them)."""
    if not projector.uses_mrope:
        return np.arange(n_past, n_past + chunk.n_tokens, dtype=np.int32).reshape(1, -1)
    image = mtmd.mtmd_input_chunk_get_tokens_image(chunk.native)
    rel = (mtmd.mtmd_decoder_pos * chunk.n_tokens)()
    mtmd.mtmd_helper_image_get_decoder_pos(image, n_past, rel)
    return np.array([[p.t for p in rel], [p.y for p in rel], [p.x for p in rel], [p.z for p in rel]], dtype=np.int32)


def image_batch(
    projector: Projector,
    chunk: ImageChunk,
    embd: np.ndarray,
    n_past: int,
    seq_id: int,
    start: int,
    n_batch: int,
    logits_last: bool = False,
) -> ImageBatch:
    """Rows [start, start + n_batch) of the image's embeddings as one batch for llama_decode;
    `n_past` is the KV position of the image's first row. The sequence continues at
    n_past + chunk.n_pos after the last row. With `projector.non_causal` the caller wraps the
    decode in `causal_off(ctx)`, and n_batch must hold the whole image."""
    if embd.shape != (chunk.n_tokens, projector.n_embd) or embd.dtype != np.float32:
        raise EngineRuntimeError(f"embeddings of shape {embd.shape} do not fit the image ({chunk.n_tokens} tokens)")
    if projector.non_causal and n_batch < chunk.n_tokens:
        raise EngineError(f"an image of {chunk.n_tokens} tokens needs a batch size (NUM_BATCH) of at least that")
    n = min(n_batch, chunk.n_tokens - start)
    rows = np.ascontiguousarray(embd[start : start + n])
    positions = image_positions(projector, chunk, n_past)
    pos = np.ascontiguousarray(positions[:, start : start + n]).reshape(-1)  # section-major
    seq = ctypes.c_int32(seq_id)
    n_seq_id = (ctypes.c_int32 * n)(*([1] * n))
    seq_ids = (ctypes.POINTER(ctypes.c_int32) * n)(*([ctypes.pointer(seq)] * n))
    logits = (ctypes.c_int8 * n)()
    if logits_last and start + n == chunk.n_tokens:
        logits[n - 1] = 1
    batch = llama_cpp.llama_batch(
        n_tokens=n,
        token=None,
        embd=rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        pos=pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
        n_seq_id=n_seq_id,
        seq_id=seq_ids,
        logits=logits,
    )
    return ImageBatch(batch, n, [rows, pos, seq, n_seq_id, seq_ids, logits])


@contextmanager
def causal_off(ctx: llama_cpp.llama_context_p, enabled: bool = True) -> Iterator[None]:
    """Bidirectional attention for the decodes inside (an image of a `non_causal` model)."""
    if enabled:
        llama_cpp.llama_set_causal_attn(ctx, False)
    try:
        yield
    finally:
        if enabled:
            llama_cpp.llama_set_causal_attn(ctx, True)
