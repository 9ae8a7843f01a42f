"""Embeddings on the rkllm runtime: the last token's hidden state of each input
(RKLLM_INFER_GET_LAST_HIDDEN_LAYER), L2-normalised, one input at a time from a clean KV cache.

A mixin of RkllmEngine (rkllm.py), kept apart so the engine file holds generation only; it uses
the engine's runtime handle, event queue and KV-cache bookkeeping.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

from ...types import EmbedRequest, EmbedResult
from .base import EngineError
from .rkllm_abi import RKLLM_INFER_GET_LAST_HIDDEN_LAYER, RKLLM_INPUT_PROMPT, RKLLM_INPUT_TOKEN


def last_token_vector(result: Any) -> tuple[list[float], int]:
    """Copy the last token's row out of the runtime's hidden-state buffer (valid only
    during the callback)."""
    if not result:
        return [], 0
    layer = result.contents.last_hidden_layer
    if not layer.hidden_states or layer.embd_size <= 0 or layer.num_tokens <= 0:
        return [], 0
    start = (layer.num_tokens - 1) * layer.embd_size
    return list(layer.hidden_states[start : start + layer.embd_size]), layer.num_tokens


class EmbedMixin:
    # Provided by RkllmEngine.
    abi: Any
    lib: Any
    tokenizer: Any
    settings: Any
    _handle: Any
    _events: Any
    _cache_dirty: bool
    _conversation: Any
    _capture_hidden: bool
    _clear_kv_cache: Any

    def embed(self, request: EmbedRequest) -> EmbedResult:
        """The last token's hidden state (RKLLM_INFER_GET_LAST_HIDDEN_LAYER), L2-normalised,
        one input at a time from a clean KV cache."""
        vectors: list[list[float]] = []
        prompt_tokens = 0
        for text in request.inputs:
            vector, tokens = self._hidden_state(text, request.truncate)
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([v / norm for v in vector])
            prompt_tokens += tokens
        return EmbedResult(embeddings=vectors, prompt_tokens=prompt_tokens)

    def _hidden_state(self, text: str, truncate: bool) -> tuple[list[float], int]:
        rk_input = self.abi.Input()
        buffers: list[Any] = []
        if self.abi.has_perf:
            rk_input.role = b"user"
        if self.tokenizer is not None:
            tokens = self.tokenizer.encode(text)
            room = self.settings.max_context_len - 1
            if len(tokens) > room:
                if not truncate:
                    raise EngineError(
                        f"An input is {len(tokens)} tokens, longer than the context, and truncate is false."
                    )
                tokens = tokens[:room]
            array = (ctypes.c_int32 * max(1, len(tokens)))(*tokens)
            buffers.append(array)
            rk_input.input_type = RKLLM_INPUT_TOKEN
            rk_input.token_input.input_ids = array
            rk_input.token_input.n_tokens = len(tokens)
        else:
            encoded = ctypes.create_string_buffer(text.encode("utf-8"))
            buffers.append(encoded)
            rk_input.input_type = RKLLM_INPUT_PROMPT
            rk_input.prompt_input = ctypes.cast(encoded, ctypes.c_char_p)
        infer = self.abi.InferParam()
        infer.mode = RKLLM_INFER_GET_LAST_HIDDEN_LAYER
        if self._cache_dirty:
            self._clear_kv_cache()
        self._conversation = None
        while not self._events.empty():
            self._events.get_nowait()
        self._capture_hidden = True
        try:
            code = self.lib.rkllm_run(self._handle, ctypes.byref(rk_input), ctypes.byref(infer), None)
        finally:
            self._capture_hidden = False
        hidden: tuple[list[float], int] | None = None
        failed = code != 0
        while not self._events.empty():
            event = self._events.get_nowait()
            if event[0] == "hidden" and event[1]:
                hidden = (event[1], event[2])
            elif event[0] in ("error", "internal"):
                failed = True
        if failed or hidden is None:
            raise EngineError(
                f"The rkllm runtime returned no hidden state for the input (rkllm_run returned {code}); "
                "this model or runtime may not support embeddings."
            )
        return hidden
