"""Continuous batching for the llama.cpp engine: several requests decode in one batch.

A decode thread loops: it runs ONE `llama_decode` over the generating sequences' last sampled
tokens, samples each with its own sampler chain, and hands each request its token through a
queue that the request's own thread reads; then it decodes at most one prompt chunk of n_batch
tokens, so a long prompt never stalls the others for more than a chunk.

Each slot remembers the tokens in its part of the cache; a new request takes the free slot
where it gains the most and destroys the least (see `slot_score`) and evaluates only what is
not cached, so multi-turn chats do not re-read their history, also when short side tasks
(titles, tags) arrive beside them.

With `unified` (the default, as llama-server's `-kvu` slots) the sequences share one KV pool
of n_ctx cells instead of a stream each (KV_UNIFIED=0), so NUM_PARALLEL sequences cost one
context of memory, and when a request starts
the caches of idle slots are parked in host RAM (llamacpp_parking) so they take neither room
nor attention time from the running ones. When the pool is full, older requests go first:
the caches of idle slots leave it first; then the running sequence started last is paused (its
cache parked in host RAM, or evaluated again later when no copy can be kept) until another
ends; a prompt that still finds no room waits while older sequences generate. Every answer is
finished whole: never a crash, a cut answer or a corrupted one (a sequence's context never
exceeds the pool, so the oldest always fits).
"""

from __future__ import annotations

import logging
import threading

import llama_cpp
from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

from .llamacpp_images import is_image_token
from .llamacpp_jobs import CANCELLED, LENGTH, STOP, Finished, Job, KvPoolFull
from .llamacpp_parking import ParkingLot
from .llamacpp_slots import Slot, SlotCaches, common_prefix, slot_score
from .llamacpp_threads import StepThreads
from .llamacpp_vision import Projector, causal_off, image_batch

log = logging.getLogger(__name__)

# llama_decode's "no room in the KV cache for this batch"; the cache is left as it was.
NO_KV_SLOT = 1


def _text_run(pending: list[int], chunk: int) -> list[int]:
    """The next tokens to evaluate as text: up to `chunk`, stopping before an image."""
    take = pending[:chunk]
    for i, token in enumerate(take):
        if is_image_token(token):
            return take[:i]
    return take


class BatchDecoder:
    def __init__(
        self,
        model: LlamaModel,
        n_ctx: int,
        n_parallel: int,
        n_batch: int,
        n_threads: int,
        flash_attn: bool,
        unified: bool = True,
        projector: Projector | None = None,
        park_bytes: int = 0,
    ) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.unified = unified
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx if unified else n_ctx * n_parallel
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_parallel
        # One pool by default, as llama-server: NUM_PARALLEL sequences cost one context. A
        # stream per sequence (KV_UNIFIED=0) costs a context each, but a sequence's attention
        # then never sees where others sit in the cache, so a greedy answer does not depend on
        # what else runs (in one pool it does, in the last bits, and may drift).
        params.kv_unified = unified
        # As `Llama` (NUM_PARALLEL=1) runs: the same numerics, so the same greedy answers.
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self._ctx = LlamaContext(model=model, params=params, verbose=False)
        self._step_threads = StepThreads(n_threads)
        self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._projector = projector
        self._slots = [Slot(seq_id=i) for i in range(n_parallel)]
        # In a shared pool, idle sequences' caches wait in host RAM (see llamacpp_parking).
        lot = ParkingLot(park_bytes) if unified and park_bytes > 0 else None
        self._caches = SlotCaches(self._ctx, self._slots, lot, unified)
        self._clock = 0  # counts jobs started and ended, to age slot caches
        self._started = 0  # jobs started, to order them (older first when the pool is full)
        self._ends = 0  # jobs ended: a paused job resumes after one more has ended
        self._waiting: list[Job] = []
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    # --- the request side -----------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("The model is being unloaded.")
            self._waiting.append(job)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()
        self._batch.close()
        self._ctx.close()

    # --- the decode thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active():
                    self._lock.wait()
                if self._closed:
                    break
                self._assign_waiting()
            self._drop_finished()
            jobs = self._active()
            if jobs:
                try:
                    self._step(jobs)
                except Exception as exc:  # a request must hear of it, not hang
                    log.exception("Batch step failed")
                    self._fail(self._active(), str(exc))
        for slot in self._slots:
            if slot.job is not None:
                self._end(slot, Finished(CANCELLED))
        for job in self._waiting:
            job.out.put(Finished(CANCELLED))

    def _active(self) -> list[tuple[Slot, Job]]:
        return [(slot, slot.job) for slot in self._slots if slot.job is not None]

    def _assign_waiting(self) -> None:
        """Caller holds the lock. Give waiting jobs, in arrival order, the free slot that suits each best."""
        for job in [j for j in self._waiting if j.cancel.is_set()]:
            self._waiting.remove(job)
            job.out.put(Finished(CANCELLED))
        while self._waiting:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                return
            job = self._waiting.pop(0)
            slot = max(free, key=lambda s: (slot_score(s.cached, job.prompt, self._clock - s.last_used), -s.seq_id))
            try:
                self._assign(slot, job)
            except Exception as exc:  # the request must hear of it, not hang; the others go on
                log.exception("Assigning a slot failed")
                self._caches.forget(slot)
                job.out.put(RuntimeError(str(exc)))

    def _assign(self, slot: Slot, job: Job) -> None:
        """Start `job` in `slot`, reusing what the slot's cache (or a longer one) holds of its prompt."""
        self._caches.prepare(slot, job.prompt)
        reuse = common_prefix(slot.cached, job.prompt)
        if reuse == len(job.prompt):
            reuse -= 1  # evaluate at least one token to get fresh logits
        position = reuse
        if job.images is not None:  # reuse whole images only; positions may differ from indices
            reuse = job.images.image_start(job.prompt, reuse)
            position = job.images.position(job.prompt, reuse)
        mem = self._ctx.memory
        if reuse > 0 and not llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, position, -1):
            reuse = position = 0
        if reuse == 0:
            llama_cpp.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
        slot.cached = job.prompt[:reuse]
        self._touch(slot)
        self._started += 1
        job.order = self._started
        job.cached, job.n_past = reuse, position
        job.pending = job.prompt[reuse:]
        slot.job = job

    def _drop_finished(self) -> None:
        for slot, job in self._active():
            if job.cancel.is_set():
                self._end(slot, Finished(CANCELLED))
            elif job.abandoned.is_set():
                self._end(slot, Finished(STOP))

    def _end(self, slot: Slot, message: Finished | Exception) -> None:
        assert slot.job is not None
        slot.job.out.put(message)
        slot.job = None
        self._ends += 1
        self._touch(slot)

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock

    def _step(self, jobs: list[tuple[Slot, Job]]) -> None:
        """One token for every generating sequence, then one prompt chunk (the oldest
        request's), each one decode."""
        self._resume_paused(jobs)
        generating = [(slot, job) for slot, job in jobs if job.prompt_done and job.paused_at is None]
        if generating:
            self._step_threads.run(self._ctx.ctx, len(generating), lambda: self._decode(generating, 1))
        # After the tokens: a job may have paused to make room for them.
        prompting = sorted(
            ((slot, job) for slot, job in jobs if slot.job is job and not job.prompt_done and job.paused_at is None),
            key=lambda sj: sj[1].order,
        )
        if prompting:
            # A prompt chunk goes alone, in n_batch pieces as when it runs by itself: mixed
            # with other sequences, llama.cpp splits it unevenly and, deep into a long
            # context, the answer then drifts from the one the request gets alone.
            slot, job = prompting[0]
            # Older sequences hold cells they will free when they end: then the prompt may wait.
            others_running = any(
                s is not slot and s.cached and not s.parked for s, j in self._active() if j.paused_at is None
            )
            if is_image_token(job.pending[0]):
                self._decode_image(slot, job, others_running)
            else:
                chunk = prompting[:1]
                self._step_threads.run_chunk(self._ctx.ctx, lambda: self._decode(chunk, self.n_batch, others_running))

    def _decode(self, jobs: list[tuple[Slot, Job]], chunk: int, others_running: bool = False) -> None:
        """Evaluate up to `chunk` pending tokens of each job; sample those now complete.
        In sequence order: with split streams llama.cpp puts only runs of consecutive sequence
        ids in one ubatch."""
        ordered = sorted(jobs, key=lambda sj: sj[0].seq_id)
        while ordered:
            code = self._try_decode(ordered, chunk)
            if code == 0:
                return
            if code != NO_KV_SLOT or not self.unified:
                self._fail(ordered, f"llama_decode failed with code {code}")
                return
            if self._make_room(min(job.order for _, job in ordered)):
                ordered = [(s, j) for s, j in ordered if j.paused_at is None]
                continue
            if chunk > 1 and others_running:
                return  # the prompt waits for room: the older sequences end in time
            # Nothing newer holds cells, yet the oldest does not fit: its context exceeds the pool.
            for slot, job in ordered:
                self._caches.forget(slot)
                self._end(
                    slot,
                    KvPoolFull(
                        f"The KV cache pool ({self.n_ctx} tokens, shared by NUM_PARALLEL sequences with KV_UNIFIED) "
                        f"has no room for this request after {job.generated} tokens. Load the model with a "
                        "larger NUM_CTX, or send a shorter prompt."
                    ),
                )
            return

    def _make_room(self, order: int) -> bool:
        """Free pool cells for the jobs from `order` on: idle caches first, else pause the
        newest job started after it that holds cells. True if anything was freed."""
        if self._caches.drop_idle():
            return True
        holders = [
            (slot, job)
            for slot, job in self._active()
            if job.order > order and job.paused_at is None and slot.cached and not slot.parked
        ]
        if not holders:
            return False
        slot, job = max(holders, key=lambda sj: sj[1].order)
        job.pause(self._ends, list(slot.cached))
        parked = self._caches.park_running(slot)
        if not parked:
            self._caches.forget(slot)
        log.warning(
            "KV pool full: pausing the sequence in slot %d after %d tokens until another ends (%s)",
            slot.seq_id,
            job.generated,
            "its cache parked in host RAM" if parked else "its cache to be evaluated again",
        )
        return True

    def _resume_paused(self, jobs: list[tuple[Slot, Job]]) -> None:
        """Resume, oldest first, the paused jobs for which another job has ended since (or that
        nothing else runs beside): from their parked cache when it fits back into the pool, else
        by evaluating their tokens again as a prompt (which waits for room as prompts do)."""
        paused = sorted(((s, j) for s, j in jobs if j.paused_at is not None), key=lambda sj: sj[1].order)
        for slot, job in paused:
            others = any(j.paused_at is None for _, j in jobs)
            if others and job.paused_at == self._ends:
                continue
            if slot.parked and self._unpark(slot, job):
                job.paused_at, job.paused_tokens = None, []
                continue
            if slot.parked and others:  # no room yet: wait for the next end
                job.paused_at = self._ends
                continue
            self._caches.forget(slot)
            job.evaluate_again()

    def _unpark(self, slot: Slot, job: Job) -> bool:
        """Bring a paused job's parked cache back into the pool, pausing newer jobs for room."""
        while not self._caches.unpark_running(slot):
            if not slot.parked or not self._make_room(job.order):
                return False
        return True

    def _try_decode(self, jobs: list[tuple[Slot, Job]], chunk: int) -> int:
        """One llama_decode over the jobs' next tokens; the jobs move on only when it succeeds
        (a failed decode leaves llama.cpp's cache as it was)."""
        batch = self._batch.batch
        n = 0
        takes: list[list[int]] = []
        for slot, job in jobs:
            take = _text_run(job.pending, chunk)
            for i, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = job.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                n += 1
            if len(take) == len(job.pending):
                batch.logits[n - 1] = True
            takes.append(take)
        batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            return code
        index = 0
        sample_at: list[tuple[Slot, Job, int]] = []
        for (slot, job), take in zip(jobs, takes, strict=True):
            index += len(take)
            slot.cached.extend(take)
            job.n_past += len(take)
            job.pending = job.pending[len(take) :]
            if not job.pending:
                sample_at.append((slot, job, index - 1))
        self._sample(sample_at)
        return 0

    def _sample(self, sample_at: list[tuple[Slot, Job, int]]) -> None:
        """Sample the jobs whose prompt or last token was just evaluated, at batch row `at`."""
        for slot, job, at in sample_at:
            job.prompt_done = True
            if job.penalties is not None:
                job.penalties.apply(self._ctx.ctx, at)
            token = job.sampler.sample(self._ctx, at)
            if job.penalties is not None:
                job.penalties.accept(token)
            if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
                self._end(slot, Finished(STOP))
                continue
            job.generated += 1
            job.out.put(token)
            if job.generated >= job.limit:
                self._end(slot, Finished(LENGTH))
            else:
                job.pending = [token]

    def _decode_image(self, slot: Slot, job: Job, others_running: bool) -> None:
        """Evaluate the next piece (n_batch rows) of the image chunk the job's prompt is at, as
        an embeddings batch of its own (libmtmd's way: embeddings and tokens do not share a
        batch, and a chunk may need non-causal attention). A reused prefix always ends at an
        image's start, so row 0 comes first and fixes the image's KV position."""
        assert self._projector is not None and job.images is not None
        chunk, row0 = job.images.rows(job.pending[0])
        if row0 == 0:
            job.image_pos0 = job.n_past
        last = len(job.pending) == chunk.chunk.n_tokens - row0  # the prompt ends with this image
        piece = image_batch(
            self._projector, chunk.chunk, chunk.embeddings, job.image_pos0, slot.seq_id, row0, self.n_batch, last
        )
        with causal_off(self._ctx.ctx, self._projector.non_causal):
            code = llama_cpp.llama_decode(self._ctx.ctx, piece.batch)
        if code != 0:
            if code == NO_KV_SLOT and self.unified and (self._make_room(job.order) or others_running):
                return  # retried at the next step, once there is room
            self._fail([(slot, job)], f"llama_decode failed with code {code} on an image")
            return
        take = piece.n_tokens
        slot.cached.extend(job.pending[:take])
        job.pending = job.pending[take:]
        if row0 + take == chunk.chunk.n_tokens:
            job.n_past = job.image_pos0 + chunk.chunk.n_pos
        if last and not job.pending:
            self._sample([(slot, job, take - 1)])

    def _fail(self, jobs: list[tuple[Slot, Job]], reason: str) -> None:
        """A failed step leaves the cache of these sequences unknown: forget them."""
        log.error("%s (%d sequences)", reason, len(jobs))
        for slot, _ in jobs:
            self._caches.forget(slot)
            if slot.job is not None:
                self._end(slot, RuntimeError(reason))
