"""The batch decoder's slots: which one a new prompt takes (the cache it continues, or the one
worth least), and where each slot's cache is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp._internals import LlamaContext

from .llamacpp_parking import ParkingLot

# A prefix held by another slot is copied when it saves at least this many tokens of prompt
# evaluation (a whole-stream copy costs about as much as evaluating a few dozen tokens). In a
# unified pool a donor's cells are shared, not copied, so there any saving is worth it.
MIN_BORROWED_TOKENS = 64


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def slot_score(cached: list[int], prompt: list[int], age: int) -> tuple[int, float]:
    """How good a free slot is for a prompt (higher is better); `age` counts the slot events
    (jobs started or ended) since the slot was last used.

    A slot whose cache the prompt mostly continues (it reuses more tokens than it throws away:
    a follow-up turn) wins, the most reused first; so does one that holds the whole prompt (the
    same request again, or a regenerated answer: what it throws away is an earlier answer to
    this very prompt). Otherwise the prompt takes the slot whose
    cache is worth least: empty first, then the fewest tokens thrown away per unit of age. So
    a short side task (a title, tags, follow-up suggestions) takes an empty or short slot and a
    long conversation's cache survives it, while of two long caches the staler one goes.
    (llama-server takes the best prefix match above a similarity, else the least recently used
    slot, which evicts a conversation whenever side tasks ended after it.)"""
    reused = common_prefix(cached, prompt)
    thrown = len(cached) - reused
    if reused > thrown or (prompt and reused == len(prompt)):
        return (1, float(reused))
    return (0, -thrown / (1 + age))


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    job: Any = None  # the Job it runs (llamacpp_batch), None when idle
    parked: bool = False  # its cache waits in host RAM, not in the pool (see llamacpp_parking)
    last_used: int = 0  # when it last started or ended a job, on the decoder's event clock


class SlotCaches:
    """Where each slot's cached tokens are: in the context's KV memory, parked in host RAM
    (a shared pool with a parking lot), or nowhere (`cached` is then empty)."""

    def __init__(self, ctx: LlamaContext, slots: list[Slot], lot: ParkingLot | None, unified: bool) -> None:
        self._ctx = ctx
        self._slots = slots
        self._lot = lot
        self._unified = unified

    def prepare(self, slot: Slot, prompt: list[int]) -> None:
        """Before `slot` takes `prompt`: take a longer prefix from another slot if one holds it
        (sharing a unified pool's cells first, before idle caches leave it), park the other idle
        caches out of a shared pool, and bring the slot's own parked cache back into the pool."""
        if self._unified:
            self._borrow_prefix(slot, prompt, in_pool=True)
        self.park_idle(keep=slot)
        self._borrow_prefix(slot, prompt, in_pool=False)
        self._unpark(slot)

    def forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
        if slot.parked:
            self._forget_parked(slot)
        slot.cached = []

    def _borrow_prefix(self, slot: Slot, prompt: list[int], in_pool: bool) -> None:
        """Copy into `slot` the cache of another slot (busy or idle; `in_pool`: only one whose
        cache is in a unified pool) that holds a longer prefix of `prompt`, so a system prompt
        shared by many requests is evaluated once, not once per slot. With a stream per
        sequence llama.cpp copies whole streams (done before the next decode; the copy's tail
        is then dropped); in a unified pool it only shares the cells, and a parked donor's state
        is copied back from host RAM."""
        own = common_prefix(slot.cached, prompt)
        donors = [s for s in self._slots if s is not slot and not (in_pool and s.parked)]
        donor = max(donors, key=lambda s: common_prefix(s.cached, prompt), default=None)
        least = 1 if in_pool else MIN_BORROWED_TOKENS
        if donor is None or common_prefix(donor.cached, prompt) < own + least:
            return
        self.forget(slot)
        if donor.parked:
            assert self._lot is not None
            if not self._lot.restore(self._ctx.ctx, donor.seq_id, slot.seq_id):
                self.forget(slot)  # no room in the pool: evaluated afresh
                return
        else:
            llama_cpp.llama_memory_seq_cp(self._ctx.memory, donor.seq_id, slot.seq_id, -1, -1)
        slot.cached = list(donor.cached)  # trimmed to the prompt's prefix by the caller

    def park_idle(self, keep: Slot | None = None) -> bool:
        """Move the caches of idle slots (but `keep`) out of a shared pool into host RAM, as a
        new request starts: they no longer take room or attention time from the running ones.
        What does not fit the budget is dropped. True if any pool cells were freed."""
        if self._lot is None:
            return False
        freed = False
        protect = keep.seq_id if keep is not None and keep.parked else None
        for slot in self._slots:
            if slot is keep or slot.job is not None or not slot.cached or slot.parked:
                continue
            if self._lot.park(self._ctx.ctx, slot.seq_id, slot.seq_id, protect):
                llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
                slot.parked = True
            else:
                self.forget(slot)
            freed = True
        for slot in self._slots:  # states dropped to make room for others are gone
            if slot.parked and not self._lot.holds(slot.seq_id):
                self._forget_parked(slot)
        return freed

    def drop_idle(self) -> bool:
        """Free the pool cells that only idle slots' caches hold (parked when they fit the
        budget, else dropped). True if any were freed."""
        if self._lot is not None:
            return self.park_idle()
        idle = [slot for slot in self._slots if slot.job is None and slot.cached]
        for slot in idle:
            self.forget(slot)
        return bool(idle)

    def park_running(self, slot: Slot) -> bool:
        """Move a paused running slot's cache out of a shared pool into host RAM, to make room
        for older sequences (the pool cells are freed). False if there is no parking lot or
        the copy does not fit its budget; the cache is then left in the pool."""
        if self._lot is None or not self._lot.park(self._ctx.ctx, slot.seq_id, slot.seq_id):
            return False
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, slot.seq_id, -1, -1)
        slot.parked = True
        return True

    def unpark_running(self, slot: Slot) -> bool:
        """Bring a paused slot's parked cache back into the pool, after moving idle caches out.
        False if there is no room yet (it stays parked) or its copy is gone (it is forgotten)."""
        self.park_idle(keep=slot)
        return slot.parked and self._restore_own(slot)

    def _restore_own(self, slot: Slot) -> bool:
        assert self._lot is not None
        if not self._lot.holds(slot.seq_id):
            self._forget_parked(slot)
            return False
        if not self._lot.restore(self._ctx.ctx, slot.seq_id, slot.seq_id):
            return False
        self._lot.drop(slot.seq_id)
        slot.parked = False
        return True

    def _unpark(self, slot: Slot) -> None:
        """Bring the slot's parked cache back into the pool (or forget it if there is no room)."""
        if not slot.parked:
            return
        if not self._restore_own(slot):
            self.forget(slot)

    def _forget_parked(self, slot: Slot) -> None:
        assert self._lot is not None
        self._lot.drop(slot.seq_id)
        slot.parked = False
        slot.cached = []
