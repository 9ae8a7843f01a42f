"""The rkllm engine: `.rkllm` models on a Rockchip NPU through librkllmrt.so and ctypes.

`rkllm_run` blocks and reports through a callback on the runtime's thread, so it runs on a
worker thread and the callback hands copies of each result to the generator through a
queue. A cancelled request calls `rkllm_abort`. This all happens in the model's runner
subprocess: a crash inside the vendor library ends that process, not the server.

KV cache: without tokenizer files the runtime applies its own template and keeps the
conversation (`keep_history`), so a request that only adds one user/tool turn to the
previous conversation and its reply is sent alone; any other request clears the cache
first. With tokenizer files the whole rendered conversation is sent as tokens from a
clean cache every time, because what the runtime keeps of its own reply is not known.
How a request becomes an input is rkllm_conversation.py; embeddings are rkllm_embed.py.

Images: a model whose folder names a `.rknn` encoder (VISION_ENCODER) loads it with
rkllm_vision.py; an image request is sent as RKLLM_INPUT_MULTIMODAL (rkllm_multimodal.py).
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import RkllamaError
from ...store.modelfile import Modelfile
from ...types import (
    ChatMessage,
    DoneEvent,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    TokenEvent,
    Usage,
)
from .base import EngineError, EngineRuntimeError, LoadSpec
from .prompt_fit import FittedPrompt
from .rkllm_abi import (
    RKLLM_INFER_GENERATE,
    RKLLM_RUN_ERROR,
    RKLLM_RUN_FINISH,
    RKLLM_RUN_GET_LAST_HIDDEN_LAYER,
    RKLLM_RUN_NORMAL,
    RKLLM_RUN_WAITING,
    LLMHandle,
    build_abi,
)
from .rkllm_conversation import ConversationMixin, PreparedInput
from .rkllm_embed import EmbedMixin, last_token_vector
from .rkllm_library import detect_platform, load_library
from .rkllm_multimodal import fill_image_markers
from .rkllm_params import fill_init_param, init_settings, run_sampling
from .rkllm_prompt import ModelTokenizer, load_tokenizer
from .rkllm_vision import ImageEncoder
from .textstream import TextAssembler

# While waiting for the runtime, how often to look at the cancel flag (seconds), and how
# often to repeat rkllm_abort if the run has not ended yet.
POLL_SECONDS = 0.05
ABORT_REPEAT_SECONDS = 1.0


@dataclass
class _RunOutcome:
    completion_tokens: int = 0
    perf: tuple[float, int, float, int] | None = None  # prefill ms, prefill tokens, generate ms, tokens
    error: bool = False
    return_code: int = 0
    first_token_at: float | None = None


class RkllmEngine(ConversationMixin, EmbedMixin):
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.modelfile = Modelfile(spec.modelfile)
        self.platform = detect_platform()
        self.library = load_library()
        self.abi = build_abi(self.library.abi)
        try:
            self.abi.bind(self.library.lib)
        except AttributeError as exc:
            raise EngineError(
                f"{self.library.path} lacks a function of rkllm runtime {self.abi.version} ({exc}); "
                "set RKLLAMA_RKLLM_ABI to the version it really is."
            ) from None
        self.lib = self.library.lib
        self.settings = init_settings(spec, self.platform)
        self.tokenizer = self._load_tokenizer()
        # The .rknn encoder loads first: before 1.3 its markers are init-time settings.
        self.vision = ImageEncoder(spec.vision_path, self.modelfile) if spec.vision_path else None
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._handle = LLMHandle()
        try:
            self._init_runtime()
        except BaseException:
            if self.vision is not None:
                self.vision.close()
            raise
        self._conversation: list[ChatMessage] | None = None  # what the runtime's KV cache holds
        self._tools: str | None = None  # the tools last given to rkllm_set_function_tools
        self._cache_dirty = False
        self._capture_hidden = False  # embed: the callback copies hidden states instead of text
        self.info = ModelInfo(
            engine="rkllm",
            context_length=self.settings.max_context_len,
            metadata={
                "general.architecture": "rkllm",
                "rkllm.abi": self.abi.version,
                "rkllm.runtime_version": self.library.version or "",
                "rkllm.library": self.library.path,
                "rkllm.platform": self.platform,
                "rkllm.prompt": "tokenizer" if self.tokenizer else "runtime template",
                **(self._vision_metadata() if self.vision else {}),
            },
            threads=self.settings.enabled_cpus_num,
        )

    # --- loading --------------------------------------------------------------------
    def _vision_metadata(self) -> dict[str, Any]:
        assert self.vision is not None
        return {
            "rkllm.vision_encoder": Path(self.vision.path).name,
            "rknn.runtime_version": self.vision.version,
            "rknn.library": self.vision.model.library_path,
            "rkllm.image_size": f"{self.vision.width}x{self.vision.height}",
            "rkllm.image_tokens": self.vision.n_tokens,
        }

    def _load_tokenizer(self) -> ModelTokenizer | None:
        folder = Path(self.spec.path).parent
        # A folder model is named after its folder; a flat file's parent is the models dir.
        if folder.name != self.spec.name:
            return None
        return load_tokenizer(folder)

    def _init_runtime(self) -> None:
        param = self.lib.rkllm_createDefaultParam()
        fill_init_param(self.abi, param, self.spec.path, self.settings)
        if self.vision is not None:
            fill_image_markers(self.abi, param, self.vision.markers)
        self._param = param  # the runtime may keep pointers into it
        self._callback = self.abi.ResultCallback(self._on_result)
        if self.abi.Callback is not None:
            self._callbacks = self.abi.Callback()
            self._callbacks.result_callback = self._callback
            code = self.lib.rkllm_init(ctypes.byref(self._handle), ctypes.byref(param), ctypes.byref(self._callbacks))
        else:
            code = self.lib.rkllm_init(ctypes.byref(self._handle), ctypes.byref(param), self._callback)
        if code != 0 or not self._handle.value:
            raise EngineError(
                f"rkllm_init failed (code {code}) for {Path(self.spec.path).name}: the model may be converted for "
                f"another runtime version (this is {self.library.version or self.abi.version}) or another SoC "
                f"(this is {self.platform}); the runner log has the runtime's own message."
            )
        template = [self.modelfile.get(k) for k in ("SYSTEM_PROMPT", "PROMPT_PREFIX", "PROMPT_POSTFIX")]
        if any(v is not None for v in template):
            if not self.abi.has_keep_history:
                self.close()
                raise EngineError("SYSTEM_PROMPT/PROMPT_PREFIX/PROMPT_POSTFIX need rkllm runtime 1.2.0 or newer.")
            self.lib.rkllm_set_chat_template(self._handle, *((v or "").encode() for v in template))

    # --- the runtime's callback (on its thread) --------------------------------------
    def _on_result(self, result: Any, _userdata: Any, state: int) -> int | None:
        try:
            if self._capture_hidden and state in (RKLLM_RUN_NORMAL, RKLLM_RUN_GET_LAST_HIDDEN_LAYER):
                self._events.put(("hidden", *last_token_vector(result)))
            elif state == RKLLM_RUN_NORMAL:
                text = result.contents.text if result else None
                self._events.put(("token", ctypes.string_at(text) if text else b""))
            elif state == RKLLM_RUN_WAITING:
                # The token ended inside a UTF-8 character; the runtime sends it whole with
                # the next NORMAL result (as the vendor's demos assume), so no text here.
                self._events.put(("waiting",))
            elif state == RKLLM_RUN_FINISH:
                perf = None
                if self.abi.PerfStat is not None and result:
                    p = result.contents.perf
                    perf = (p.prefill_time_ms, p.prefill_tokens, p.generate_time_ms, p.generate_tokens)
                self._events.put(("finish", perf))
            elif state == RKLLM_RUN_ERROR:
                self._events.put(("error",))
        except Exception as exc:  # never let an exception unwind into C
            self._events.put(("internal", repr(exc)))
        return 0 if self.abi.has_perf else None

    # --- the KV cache ---------------------------------------------------------------
    def _clear_kv_cache(self) -> None:
        if not self.abi.has_keep_history:
            return
        if self.abi.has_perf:
            self.lib.rkllm_clear_kv_cache(self._handle, 0, None, None)
        else:
            self.lib.rkllm_clear_kv_cache(self._handle, 0)
        self._cache_dirty = False

    def _infer_params(self, request: GenerateRequest, limit: int, keep_history: bool) -> tuple[Any, list[Any]]:
        infer = self.abi.InferParam()
        infer.mode = RKLLM_INFER_GENERATE
        keep_alive: list[Any] = []
        if self.abi.has_keep_history:
            infer.keep_history = 1 if keep_history else 0
        if self.abi.has_run_sampling:
            sampling = run_sampling(self.abi, request.options, self.settings)
            keep_alive.append(sampling)
            infer.sampling_params = ctypes.pointer(sampling)
            infer.max_new_tokens = limit
        return infer, keep_alive

    def _limit(self, request: GenerateRequest) -> int:
        wanted = request.options.max_tokens
        if wanted is None or wanted < 0:
            wanted = self.settings.max_new_tokens
        if not self.abi.has_run_sampling and self.settings.max_new_tokens > 0:
            wanted = min(wanted, self.settings.max_new_tokens)  # fixed at init before 1.3
        return wanted

    # --- the seam -------------------------------------------------------------------
    def generate(self, request: GenerateRequest, cancel: threading.Event) -> Iterator[TokenEvent | DoneEvent]:
        limit = self._limit(request)
        if limit == 0:
            yield DoneEvent(finish_reason="length", usage=Usage())
            return
        try:
            prepared = self._prepare(request)
        except RkllamaError as exc:  # e.g. the chat template rejected the messages
            raise EngineError(exc.message) from None
        infer, keep_alive = self._infer_params(request, limit, prepared.keep_history)
        if prepared.clear_first:
            self._clear_kv_cache()
        self._conversation = None
        # With keep_history=0 the runtime keeps nothing of this run.
        self._cache_dirty = prepared.keep_history
        while not self._events.empty():  # nothing of an earlier run may leak in
            self._events.get_nowait()

        started = time.perf_counter()
        worker = threading.Thread(target=self._run, args=(prepared, infer, keep_alive), name="rkllm_run", daemon=True)
        worker.start()
        assembler = TextAssembler(
            request.options.stop if request.options.stop is not None else self.settings.sampling.stop
        )
        outcome = _RunOutcome()
        reply: list[str] = []
        ended_early = False  # we stopped it: stop string, token limit or cancel
        last_abort = 0.0
        try:
            while True:
                if (cancel.is_set() or ended_early) and time.monotonic() - last_abort > ABORT_REPEAT_SECONDS:
                    self.lib.rkllm_abort(self._handle)
                    last_abort = time.monotonic()
                try:
                    event = self._events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                kind = event[0]
                if kind in ("token", "waiting"):
                    if ended_early or cancel.is_set():
                        continue
                    if outcome.completion_tokens >= limit:  # the runtime ran past max_new_tokens
                        ended_early = True
                        continue
                    if outcome.first_token_at is None:
                        outcome.first_token_at = time.perf_counter()
                    outcome.completion_tokens += 1
                    if kind == "token":
                        piece = assembler.feed(event[1])
                        if piece:
                            reply.append(piece)
                            yield TokenEvent(piece)
                    # From 1.3 on the runtime stops at the per-run max_new_tokens by itself.
                    at_limit = outcome.completion_tokens >= limit and not self.abi.has_run_sampling
                    if assembler.stopped or at_limit:
                        ended_early = True
                elif kind == "finish":
                    outcome.perf = event[1]
                elif kind == "error":
                    outcome.error = True
                elif kind == "internal":
                    outcome.error = True
                elif kind == "returned":
                    outcome.return_code = event[1]
                    break
        finally:
            if worker.is_alive():  # the consumer went away: stop the run before returning
                self.lib.rkllm_abort(self._handle)
                worker.join()
        # After an abort the runtime may end the run with an error of its own: not the client's problem.
        if (outcome.error or outcome.return_code != 0) and not (ended_early or cancel.is_set()):
            raise EngineRuntimeError(
                "The rkllm runtime reported an error during generation "
                f"(RKLLM_RUN_ERROR, rkllm_run returned {outcome.return_code}); see the runner log for its message."
            )
        if not cancel.is_set():
            tail = assembler.flush()
            if tail:
                reply.append(tail)
                yield TokenEvent(tail)
        finish = self._finish_reason(cancel, assembler, outcome, limit)
        if prepared.messages is not None and not ended_early and not cancel.is_set():
            # The runtime stopped by itself: its cache holds exactly this conversation.
            self._conversation = [*prepared.messages, ChatMessage(role="assistant", content="".join(reply))]
        yield DoneEvent(finish_reason=finish, usage=self._usage(prepared, outcome, started))

    def _run(self, prepared: PreparedInput, infer: Any, keep_alive: list[Any]) -> None:
        try:
            code = self.lib.rkllm_run(self._handle, ctypes.byref(prepared.struct), ctypes.byref(infer), None)
        except Exception:  # ctypes argument errors: report as a failed run
            code = -1
        self._events.put(("returned", int(code)))

    @staticmethod
    def _finish_reason(
        cancel: threading.Event, assembler: TextAssembler, outcome: _RunOutcome, limit: int
    ) -> FinishReason:
        if cancel.is_set():
            return "cancelled"
        if assembler.stopped:
            return "stop"
        return "length" if outcome.completion_tokens >= limit else "stop"

    def _usage(self, prepared: PreparedInput, outcome: _RunOutcome, started: float) -> Usage:
        fitted = prepared.fitted or FittedPrompt([])
        trimmed = {"dropped_messages": fitted.dropped_messages, "truncated_tokens": fitted.truncated_tokens}
        if outcome.perf is not None:
            prefill_ms, prefill_tokens, generate_ms, _ = outcome.perf
            # Completion tokens are those the client got: the runtime may run on after an abort.
            return Usage(
                prompt_tokens=prefill_tokens,
                completion_tokens=outcome.completion_tokens,
                prompt_ms=prefill_ms,
                generate_ms=generate_ms,
                **trimmed,
            )
        ended = time.perf_counter()
        first = outcome.first_token_at or ended
        return Usage(
            prompt_tokens=(prepared.prompt_tokens or 0) + prepared.image_tokens,
            completion_tokens=outcome.completion_tokens,
            prompt_ms=(first - started) * 1000,
            generate_ms=(ended - first) * 1000,
            **trimmed,
        )

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise EngineError(
                "This rkllm model has no tokenizer files (tokenizer.json) in its folder, so it cannot tokenize."
            )
        return self.tokenizer.encode(text)

    def close(self) -> None:
        if self._handle.value:
            self.lib.rkllm_destroy(self._handle)
            self._handle = LLMHandle()
        if self.vision is not None:
            self.vision.close()
