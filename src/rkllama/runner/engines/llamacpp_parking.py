"""Idle sequences' KV caches, parked in host RAM while they wait for their next turn.

In one shared KV pool (KV_UNIFIED) every step's attention runs up to the highest cell in use,
so a conversation cached beside the running ones costs them time at every token, and holds
pool cells a new prompt may need. llama-server moves idle slots out of its pool into a host-RAM
prompt cache (`--cache-idle-slots`, `--cache-ram`); this does the same with llama.cpp's
per-sequence state calls: an idle sequence's cells are copied out when another request starts,
and copied back when a request continues them. The copies are bounded by a byte budget; past it the least
recently parked go (their conversation is then evaluated again, as without a cache).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict

import llama_cpp


class ParkingLot:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._parked: OrderedDict[int, bytes] = OrderedDict()  # key -> a sequence's state
        self.used = 0

    def park(self, ctx: llama_cpp.llama_context_p, seq_id: int, key: int, protect: int | None = None) -> bool:
        """Copy sequence `seq_id` out of the pool under `key`, making room by dropping the
        least recently used states but `protect`. False if it does not fit (nothing is kept
        then). The caller frees the pool cells."""
        self.drop(key)
        size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
        kept = len(self._parked.get(protect, b"")) if protect is not None else 0
        if not 0 < size <= self.budget - kept:
            return False
        while self.used + size > self.budget:
            self.drop(next(k for k in self._parked if k != protect))
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id)
        if written == 0:
            return False
        self._parked[key] = bytes(buffer)[:written]
        self.used += written
        return True

    def holds(self, key: int) -> bool:
        return key in self._parked

    def restore(self, ctx: llama_cpp.llama_context_p, key: int, seq_id: int) -> bool:
        """Copy the state parked under `key` into sequence `seq_id` (which must be empty). It
        stays parked: another sequence may borrow it too. False if it is gone or the pool has no
        room for it."""
        state = self._parked.get(key)
        if state is None:
            return False
        self._parked.move_to_end(key)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return llama_cpp.llama_state_seq_set_data(ctx, buffer, len(state), seq_id) != 0

    def drop(self, key: int) -> None:
        state = self._parked.pop(key, None)
        if state is not None:
            self.used -= len(state)
