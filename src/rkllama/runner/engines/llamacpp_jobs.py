"""What the batch decoder (llamacpp_batch) runs: one request's sequence, and how it ends."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from .llamacpp_grammar import TokenSampler
from .llamacpp_images import PromptImages
from .llamacpp_penalties import RecentPenalties

# What a request's queue receives: sampled token ids, then one Finished (or an Exception).
LENGTH, STOP, CANCELLED = "length", "stop", "cancelled"


class KvPoolFull(RuntimeError):
    """A sequence found no room in the shared KV pool, and nothing newer could make way for it."""


@dataclass
class Finished:
    reason: str


@dataclass
class Job:
    """One request's sequence, as the decode thread sees it."""

    prompt: list[int]
    sampler: TokenSampler
    limit: int  # tokens to generate at most (> 0)
    cancel: threading.Event
    out: queue.Queue[int | Finished | Exception] = field(default_factory=queue.Queue)
    # Set by the reader when it stops early (a stop string): the slot is freed at the next step.
    abandoned: threading.Event = field(default_factory=threading.Event)
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next
    n_past: int = 0  # KV positions of this sequence already in the cache
    cached: int = 0  # prompt tokens reused from the slot's cache (set when a slot is assigned)
    generated: int = 0
    prompt_done: bool = False
    # The request's images (their placeholders sit in `prompt`), and the KV position where
    # the image chunk being evaluated starts.
    images: PromptImages | None = None
    image_pos0: int = 0
    # Repeat/frequency/presence penalties, when they change anything (the chain's first link).
    penalties: RecentPenalties | None = None
    # When it started, on the decoder's count of jobs started: older jobs go first when the
    # pool is full.
    order: int = 0
    # Paused for room in a full pool: the decoder's count of ended jobs when it paused (it
    # resumes once another has ended), and the tokens its cache held then (evaluated again if
    # its parked copy is gone).
    paused_at: int | None = None
    paused_tokens: list[int] = field(default_factory=list)

    def pause(self, ends: int, tokens: list[int]) -> None:
        self.paused_at = ends
        self.paused_tokens = tokens

    def evaluate_again(self) -> None:
        """Resume a paused job whose cache is gone: everything it held is evaluated again, as
        a prompt; its sampler has seen none of it twice, so the answer goes on as it would."""
        self.pending = self.paused_tokens + self.pending
        self.n_past = 0
        self.prompt_done = False
        self.paused_at = None
        self.paused_tokens = []
