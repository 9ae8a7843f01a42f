"""The llama.cpp engine (GGUF on the CPU) through llama-cpp-python.

The generation loop is ours, so that token counts are exact, a cancel stops between two
tokens, and stop strings and UTF-8 are handled like the other engines (see textstream.py).

With NUM_PARALLEL > 1 (the default is 4) several requests decode together in one batch
(see llamacpp_batch.py); with 1, requests run one at a time over `Llama.generate`, and
llama-cpp-python reuses the KV cache's longest common prefix with the previous request.
Either way, multi-turn chats do not re-read their history.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from typing import Any

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp._internals import LlamaModel
from llama_cpp._logger import set_verbose

from ...chat_template import ChatTemplate, render_chat
from ...context_size import kv_bytes_per_token, kv_unified, parking_bytes
from ...types import (
    ChatMessage,
    DoneEvent,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    ModelInfo,
    SamplingOptions,
    TokenEvent,
    Usage,
)
from .base import EngineError, EngineRuntimeError, LoadSpec
from .cpu_threads import THREADS_ENV, default_threads, parallel_setting
from .llamacpp_batch import BatchDecoder
from .llamacpp_cpu import avoid_amx_weight_buffers
from .llamacpp_events import no_tokens, text_events
from .llamacpp_images import ImageCache, PromptImages, drop_partial_images
from .llamacpp_jobs import Finished, Job
from .llamacpp_penalties import RecentPenalties
from .llamacpp_sampling import grammar_for, sampler_chain
from .llamacpp_slots import common_prefix
from .llamacpp_vision import Projector
from .prompt_fit import FittedPrompt, cut_front, fit_chat, reply_room

BUILTIN_DEFAULTS = SamplingOptions(
    temperature=0.8,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    repeat_penalty=1.1,
    presence_penalty=0.0,
    frequency_penalty=0.0,
)
DEFAULT_CONTEXT = 4096


def _int_setting(spec: LoadSpec, override: str, modelfile_key: str, default: int | str) -> int:
    value = spec.overrides.get(override) or spec.modelfile.get(modelfile_key) or default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EngineError(f"{modelfile_key} must be an integer, got {value!r}.") from None


def _flash_attention(spec: LoadSpec) -> bool:
    """On unless the load, the Modelfile (FLASH_ATTN) or RKLLAMA_FLASH_ATTN says off."""
    value = spec.overrides.get("flash_attn", spec.modelfile.get("FLASH_ATTN", os.environ.get("RKLLAMA_FLASH_ATTN")))
    return str(value).strip().lower() not in {"0", "false", "off", "no"}


class LlamaCppEngine:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        n_ctx = _int_setting(spec, "num_ctx", "NUM_CTX", DEFAULT_CONTEXT)
        env_threads = os.environ.get(THREADS_ENV) or default_threads()
        threads = _int_setting(spec, "num_thread", "NUM_THREAD", env_threads)
        if threads < 1:
            raise EngineError(f"NUM_THREAD must be at least 1, got {threads}.")
        self.n_threads = threads
        self.n_parallel = parallel_setting(spec)
        if not 1 <= self.n_parallel <= llama_cpp.llama_max_parallel_sequences():
            raise EngineError(
                f"NUM_PARALLEL must be between 1 and {llama_cpp.llama_max_parallel_sequences()}, got {self.n_parallel}."
            )
        self._llama_kwargs: dict[str, Any] = dict(
            model_path=spec.path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=_int_setting(spec, "num_batch", "NUM_BATCH", 512),
            # Flash attention, as llama-server uses by default: ~10% faster decoding on the CPU.
            flash_attn=_flash_attention(spec),
            verbose=False,
        )
        avoid_amx_weight_buffers()
        self.llm: Llama | None = None
        self._decoder: BatchDecoder | None = None
        self._images: ImageCache | None = None
        try:
            # Images need our own decoder (Llama.generate takes tokens only), also for one sequence.
            if self.n_parallel == 1 and not spec.vision_path:
                self.llm = Llama(**self._llama_kwargs)
                self.model = self.llm._model
                self.n_ctx = self.llm.n_ctx()
            else:
                # No Llama object: its own context would be a second KV cache for nothing.
                # Looked up where avoid_amx_weight_buffers wraps it; silence native logs as Llama does.
                model_params = llama_cpp.llama_cpp.llama_model_default_params()
                set_verbose(False)
                self.model = LlamaModel(path_model=spec.path, params=model_params, verbose=False)
                self.n_ctx = n_ctx
                projector = Projector(self.model, spec.vision_path, threads) if spec.vision_path else None
                # llama-cpp-python gives the header's numbers as text.
                numbers = {k: int(v) if v.isdigit() else v for k, v in self.model.metadata().items()}
                per_token = kv_bytes_per_token(numbers)
                self._images = ImageCache(projector) if projector else None
                self._decoder = BatchDecoder(
                    self.model,
                    n_ctx,
                    self.n_parallel,
                    self._llama_kwargs["n_batch"],
                    threads,
                    flash_attn=self._llama_kwargs["flash_attn"],
                    unified=kv_unified(spec.modelfile),
                    projector=projector,
                    park_bytes=parking_bytes(spec.modelfile, n_ctx, per_token),
                )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {os.path.basename(spec.path)}: {exc}") from None
        self._embedder: Llama | None = None
        self._embed_lock = threading.Lock()
        meta = self.model.metadata()
        self.metadata = meta
        self.template = ChatTemplate(meta.get("tokenizer.chat_template"))
        arch = meta.get("general.architecture", "")
        self.info = ModelInfo(
            engine="llama.cpp",
            context_length=self.n_ctx,
            metadata={k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")},
            parallel=self.n_parallel,
            threads=self.n_threads,
            kv_unified=self._decoder is not None and self._decoder.unified,
        )
        self.info.metadata.setdefault("general.architecture", arch)
        self._bos = self._special_text(self.model.token_bos())
        self._eos = self._special_text(self.model.token_eos())
        self.defaults = self._modelfile_defaults()

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.model.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def _modelfile_defaults(self) -> SamplingOptions:
        from ...store.modelfile import Modelfile

        return Modelfile(self.spec.modelfile).sampling_defaults().merged_over(BUILTIN_DEFAULTS)

    # --- prompts --------------------------------------------------------------------
    def _messages(self, request: GenerateRequest) -> list[ChatMessage]:
        messages = list(request.messages or [])
        system = self.spec.modelfile.get("SYSTEM")
        if system and not any(m.role == "system" for m in messages):
            messages.insert(0, ChatMessage(role="system", content=system))
        return messages

    def _tokenize_prompt(self, text: str) -> list[int]:
        add_bos = not (self._bos and text.startswith(self._bos))
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _prompt_images(self, request: GenerateRequest) -> PromptImages | None:
        if not request.image_count:
            return None
        if self._images is None:
            raise EngineError(f"Model {self.spec.name} cannot read images: its Modelfile names no projector (MMPROJ).")
        images = [i for m in request.messages or [] for i in m.images or []] + (request.images or [])
        return PromptImages(self._images, images)

    def _tokenizer(self, images: PromptImages | None) -> Callable[[str], list[int]]:
        """Text to tokens; with images, their markers become the images' tokens."""
        if images is None:
            return self._tokenize_prompt

        def text_piece(text: str, first: bool) -> list[int]:
            return self._tokenize_prompt(text) if first else self.tokenize(text)

        return lambda text: images.tokenize(text, text_piece)

    def _fit_prompt(
        self, request: GenerateRequest, context: int, reserve: int, images: PromptImages | None = None
    ) -> FittedPrompt:
        """The prompt's tokens, fitted into `context` with `reserve` tokens left for the reply.
        A prompt cut from the front never starts inside an image: the rest of a cut image goes too."""
        fitted = self._fit_tokens(request, context, reserve, images)
        if images is None or not fitted.truncated_tokens:
            return fitted
        kept = drop_partial_images(fitted.tokens, self._keep(fitted.tokens))
        return replace(fitted, tokens=kept, truncated_tokens=fitted.truncated_tokens + len(fitted.tokens) - len(kept))

    def _fit_tokens(
        self, request: GenerateRequest, context: int, reserve: int, images: PromptImages | None
    ) -> FittedPrompt:
        tokenize = self._tokenizer(images)
        if request.messages is None:
            prompt = request.prompt or ""
            tokens = tokenize(images.raw_prompt(prompt) if images else prompt)
            return cut_front(tokens, context, reserve, truncate=request.truncate, keep=self._keep(tokens))

        def render(messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> str:
            return render_chat(
                self.template,
                messages,
                bos_token=self._bos,
                eos_token=self._eos,
                tools=tools,
                enable_thinking=request.enable_thinking,
            )

        messages = self._messages(request)
        if images is not None:
            messages = images.with_markers(messages)
        first = self._tokenize_prompt(self._bos)[:1] if self._bos else []
        return fit_chat(
            messages,
            render,
            tokenize,
            context=context,
            reserve=reserve,
            truncate=request.truncate,
            tools=request.tools,
            keep=len(first),
        )

    def _keep(self, tokens: list[int]) -> int:
        """Tokens a cut keeps at the front: the BOS token, when the prompt starts with one."""
        bos = self.model.token_bos()
        return 1 if tokens and bos >= 0 and tokens[0] == bos else 0

    # --- the seam -------------------------------------------------------------------
    def generate(self, request: GenerateRequest, cancel: threading.Event) -> Iterator[TokenEvent | DoneEvent]:
        options = request.options.merged_over(self.defaults)
        grammar = grammar_for(request)
        started = time.perf_counter()
        # A request's num_ctx smaller than the loaded context limits it (no reload needed).
        context = min(self.n_ctx, request.num_ctx or self.n_ctx)
        reserve = reply_room(context, options.max_tokens)
        images = self._prompt_images(request)
        fitted = self._fit_prompt(request, context, reserve, images)
        tokens = fitted.tokens
        if images is not None:
            images.encode(tokens)
        if not tokens:
            # llama.cpp cannot decode an empty batch (a raw, empty prompt: /v1/completions "").
            raise EngineError("The prompt is empty: there is nothing to generate from.")
        usage = Usage(
            prompt_tokens=len(tokens),
            dropped_messages=fitted.dropped_messages,
            truncated_tokens=fitted.truncated_tokens,
        )
        room = context - len(tokens)
        limit = room if options.max_tokens is None or options.max_tokens < 0 else min(options.max_tokens, room)
        seed = options.seed if options.seed is not None else random.randint(0, 2**31 - 1)
        if limit == 0:
            source: Generator[int, None, str] = no_tokens()
        elif self._decoder is not None:
            sampler = sampler_chain(self.model, options, grammar, seed)
            penalties = RecentPenalties(options, self.model.n_vocab())
            job = Job(
                prompt=tokens,
                sampler=sampler,
                limit=limit,
                cancel=cancel,
                images=images,
                penalties=penalties if penalties.active else None,
            )
            source = self._batched_tokens(job, usage)
        else:
            source = self._sequential_tokens(tokens, options, grammar, seed, limit, usage)
        yield from text_events(source, self.model.detokenize, options.stop, cancel, usage, started)

    def _sequential_tokens(
        self,
        tokens: list[int],
        options: SamplingOptions,
        grammar: LlamaGrammar | None,
        seed: int,
        limit: int,
        usage: Usage,
    ) -> Generator[int, None, str]:
        """One request at a time through `Llama.generate` (which reuses the cached prefix)."""
        assert self.llm is not None
        # What Llama.generate will reuse: the longest common prefix, less one token to evaluate.
        usage.cached_tokens = min(common_prefix(list(self.llm._input_ids), tokens), len(tokens) - 1)
        self.llm.set_seed(seed)
        generated = 0
        for token in self.llm.generate(
            tokens,
            top_k=options.top_k or 0,
            top_p=options.top_p,
            min_p=options.min_p,
            temp=options.temperature,
            repeat_penalty=options.repeat_penalty,
            frequency_penalty=options.frequency_penalty,
            presence_penalty=options.presence_penalty,
            grammar=grammar,
        ):
            if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
                return "stop"
            yield token
            generated += 1
            if generated >= limit:
                return "length"
        return "length"

    def _batched_tokens(self, job: Job, usage: Usage) -> Generator[int, None, str]:
        """Hand the sequence to the decode thread and pass on the tokens it samples."""
        assert self._decoder is not None
        try:
            self._decoder.submit(job)
            while True:
                item = job.out.get()
                usage.cached_tokens = job.cached
                if isinstance(item, Exception):
                    raise EngineRuntimeError(f"llama.cpp failed while generating: {item}")
                if isinstance(item, Finished):
                    return item.reason
                yield item
        finally:
            # Whatever ended this reader (a stop string, a closed iterator), free the slot.
            job.abandoned.set()

    def embed(self, request: EmbedRequest) -> EmbedResult:
        # Requests may run side by side in parallel mode; the embedding context is one.
        with self._embed_lock:
            return self._embed(request)

    def _embed(self, request: EmbedRequest) -> EmbedResult:
        if self._embedder is None:
            # A second context in embedding mode; the weights are mmapped, so shared.
            # Chat models declare no pooling, which would give one vector per token: average them.
            arch = self.metadata.get("general.architecture", "")
            mean = {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
            pooling = {} if f"{arch}.pooling_type" in self.metadata else mean
            self._embedder = Llama(**{**self._llama_kwargs, "embedding": True, **pooling})
        counts = [len(self._embedder.tokenize(text.encode("utf-8"))) for text in request.inputs]
        if 0 in counts:
            # llama.cpp fails to decode an empty batch and its state is not to be trusted after.
            raise EngineError(f"Input {counts.index(0)} is empty: there is nothing to embed.")
        limit = self._embedder.n_ctx()
        if not request.truncate and any(c > limit for c in counts):
            raise EngineError(f"An input is longer than the context of {limit} tokens and truncate is false.")
        vectors = self._embedder.embed(request.inputs, normalize=True, truncate=True)
        return EmbedResult(
            embeddings=[list(map(float, v)) for v in vectors], prompt_tokens=sum(min(c, limit) for c in counts)
        )

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
        if self._images is not None:
            self._images.projector.close()
        if self.llm is not None:
            self.llm.close()
        else:
            self.model.close()
        if self._embedder is not None:
            self._embedder.close()
