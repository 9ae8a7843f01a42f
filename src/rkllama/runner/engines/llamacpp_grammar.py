"""Grammar-constrained sampling as llama.cpp's own server does it (common_sampler's rejection
sampling): the chain picks a token from the raw logits, the grammar checks only that one token,
and only when it rejects it are all the logits constrained and the chain run again.

Constraining the whole vocabulary (49,152 tokens for SmolLM2) at every step is what the grammar
link first in a chain does; checking one token costs little, and a model following a JSON schema
picks an allowed token most of the time. For greedy sampling the result is the same token; for
random sampling it is drawn from the same constrained distribution (an allowed first pick is
kept, a rejected one is drawn again from the allowed tokens only)."""

from __future__ import annotations

import ctypes
from typing import Protocol

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaSampler, LlamaTokenDataArray


class TokenSampler(Protocol):
    def sample(self, ctx: LlamaContext, idx: int) -> int: ...


class GrammarSampler:
    def __init__(self, chain: LlamaSampler, grammar: LlamaSampler, n_vocab: int) -> None:
        self._chain = chain  # the sampling chain, without the grammar
        self._grammar = grammar  # a chain holding the grammar alone
        self._n_vocab = n_vocab
        self._candidates = LlamaTokenDataArray(n_vocab=n_vocab)
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array(data=ctypes.pointer(self._one), size=1)

    def sample(self, ctx: LlamaContext, idx: int) -> int:
        """Sample at batch row `idx` and accept the token into the grammar and the chain."""
        pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        token = self._pick(logits, constrained=False)
        if not self._allows(token):
            token = self._pick(logits, constrained=True)
        llama_cpp.llama_sampler_accept(self._grammar.sampler, token)
        llama_cpp.llama_sampler_accept(self._chain.sampler, token)
        return token

    def _pick(self, logits: np.ndarray, constrained: bool) -> int:
        self._candidates.copy_logits(logits)
        candidates = self._candidates.candidates
        candidates.selected = -1
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar.sampler, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(candidates))
        return int(self._candidates.candidates_data.id[candidates.selected])

    def _allows(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar.sampler, ctypes.byref(self._one_array))
        return self._one.logit != float("-inf")
