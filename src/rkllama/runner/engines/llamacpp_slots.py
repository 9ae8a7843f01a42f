"""Which slot of the batch decoder a new prompt takes: the cache it continues, or the one
worth least."""

from __future__ import annotations


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
