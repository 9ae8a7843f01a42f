"""Repeat, frequency and presence penalties for the batch decoder, applied to a logits row.

The arithmetic of llama.cpp's penalties sampler (float32, the same order), but that sampler
visits every token of the vocabulary to find the few dozen it changes: 49,152 lookups a token
for the default model, ~0.35 ms of a ~15 ms decode step on the 2-core VM, paid by every
sequence at every step. Here only the recent tokens are touched.
"""

from __future__ import annotations

from collections import Counter, deque

import llama_cpp
import numpy as np

from ...types import SamplingOptions

# Tokens of recent output the penalties look at (llama-cpp-python's default).
PENALTY_LAST_N = 64


class RecentPenalties:
    def __init__(self, options: SamplingOptions, n_vocab: int) -> None:
        self._repeat = np.float32(options.repeat_penalty)
        self._frequency = np.float32(options.frequency_penalty)
        self._presence = np.float32(options.presence_penalty)
        self._n_vocab = n_vocab
        self._recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        self._counts: Counter[int] = Counter()

    @property
    def active(self) -> bool:
        """False when the penalties change nothing (llama.cpp's sampler then skips too)."""
        return not (self._repeat == 1 and self._frequency == 0 and self._presence == 0)

    def apply(self, ctx: llama_cpp.llama_context_p, row: int) -> None:
        """Penalise, in place, the logits of batch row `row` that the sampler chain reads next."""
        if not self._counts:
            return
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self._n_vocab,))
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        picked = logits[ids]
        picked = np.where(picked <= 0, picked * self._repeat, picked / self._repeat)
        picked -= counts * self._frequency + self._presence  # every token here was seen
        logits[ids] = picked

    def accept(self, token: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            self._counts[oldest] -= 1
            if not self._counts[oldest]:
                del self._counts[oldest]
        self._recent.append(token)
        self._counts[token] += 1
