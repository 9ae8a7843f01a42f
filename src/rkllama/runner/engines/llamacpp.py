"""The llama.cpp engine (GGUF on the CPU) through llama-cpp-python.

The generation loop is ours, over `Llama.generate`, so that token counts are exact, a
cancel stops between two tokens, and stop strings and UTF-8 are handled like the other
engines (see textstream.py). llama-cpp-python keeps the KV cache of the previous request
and reuses its longest common prefix, so multi-turn chats do not re-read their history.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_grammar import JSON_GBNF

from ...chat_template import render_chat
from ...types import (
    DoneEvent,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    ModelInfo,
    SamplingOptions,
    TokenEvent,
    Usage,
)
from .base import EngineError, LoadSpec
from .textstream import TextAssembler

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


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as cpuinfo:
            return " amx_int8" in cpuinfo.read()
    except OSError:
        return False


def _avoid_amx_weight_buffers() -> None:
    """llama.cpp's AMX weight buffers segfault on some AMX machines (llama.cpp issue
    #20824; seen here on every batched decode). On such CPUs load models without the
    extra buffer types, like llama-server's --no-repack. llama-cpp-python has no flag for
    it, so its default-params function is wrapped, in this runner process only.
    RKLLAMA_LLAMA_EXTRA_BUFFERS=1 keeps them."""
    if os.environ.get("RKLLAMA_LLAMA_EXTRA_BUFFERS") == "1" or not _cpu_has_amx():
        return
    defaults = llama_cpp.llama_cpp.llama_model_default_params
    if getattr(defaults, "_rkllama_wrapped", False):
        return

    def without_extra_buffers():  # type: ignore[no-untyped-def]
        params = defaults()
        params.use_extra_bufts = False
        return params

    without_extra_buffers._rkllama_wrapped = True  # type: ignore[attr-defined]
    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers


def _int_setting(spec: LoadSpec, override: str, modelfile_key: str, default: int) -> int:
    value = spec.overrides.get(override) or spec.modelfile.get(modelfile_key) or default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EngineError(f"{modelfile_key} must be an integer, got {value!r}.") from None


def tool_call_schema(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """JSON schema of one call to the chosen tool (or to any tool for "required")."""
    functions = [t.get("function", t) for t in tools]
    if choice != "required":
        functions = [f for f in functions if f.get("name") == choice]
        if not functions:
            raise EngineError(f"tool_choice names {choice!r}, which is not among the tools.")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


class LlamaCppEngine:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        n_ctx = _int_setting(spec, "num_ctx", "NUM_CTX", DEFAULT_CONTEXT)
        threads = _int_setting(spec, "num_thread", "NUM_THREAD", os.cpu_count() or 1)
        self._llama_kwargs: dict[str, Any] = dict(
            model_path=spec.path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=_int_setting(spec, "num_batch", "NUM_BATCH", 512),
            verbose=False,
        )
        _avoid_amx_weight_buffers()
        try:
            self.llm = Llama(**self._llama_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {os.path.basename(spec.path)}: {exc}") from None
        self._embedder: Llama | None = None
        meta = dict(self.llm.metadata)
        self.template = meta.get("tokenizer.chat_template")
        arch = meta.get("general.architecture", "")
        self.info = ModelInfo(
            engine="llama.cpp",
            context_length=self.llm.n_ctx(),
            metadata={k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")},
        )
        self.info.metadata.setdefault("general.architecture", arch)
        self._bos = self._special_text(self.llm.token_bos())
        self._eos = self._special_text(self.llm.token_eos())
        self.defaults = self._modelfile_defaults()

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def _modelfile_defaults(self) -> SamplingOptions:
        from ...store.modelfile import Modelfile

        return Modelfile(self.spec.modelfile).sampling_defaults().merged_over(BUILTIN_DEFAULTS)

    # --- prompts --------------------------------------------------------------------
    def _prompt_tokens(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            messages = list(request.messages)
            system = self.spec.modelfile.get("SYSTEM")
            if system and not any(m.role == "system" for m in messages):
                from ...types import ChatMessage

                messages.insert(0, ChatMessage(role="system", content=system))
            text = render_chat(
                self.template,
                messages,
                bos_token=self._bos,
                eos_token=self._eos,
                tools=request.tools,
                enable_thinking=request.enable_thinking,
            )
        else:
            text = request.prompt or ""
        add_bos = not (self._bos and text.startswith(self._bos))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _grammar(self, request: GenerateRequest) -> LlamaGrammar | None:
        try:
            if request.tools and request.tool_choice:
                schema = tool_call_schema(request.tools, request.tool_choice)
                return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            if request.response_format == "json":
                return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
            if isinstance(request.response_format, dict):
                return LlamaGrammar.from_json_schema(json.dumps(request.response_format), verbose=False)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"The JSON schema in format could not be turned into a grammar: {exc}") from None
        return None

    # --- the seam -------------------------------------------------------------------
    def generate(self, request: GenerateRequest, cancel: threading.Event) -> Iterator[TokenEvent | DoneEvent]:
        options = request.options.merged_over(self.defaults)
        grammar = self._grammar(request)
        started = time.perf_counter()
        tokens = self._prompt_tokens(request)
        room = self.llm.n_ctx() - len(tokens)
        if room <= 0:
            raise EngineError(
                f"The prompt is {len(tokens)} tokens, more than the model's context of "
                f"{self.llm.n_ctx()}. Shorten it or load the model with a larger num_ctx."
            )
        limit = room if options.max_tokens is None or options.max_tokens < 0 else min(options.max_tokens, room)
        self.llm.set_seed(options.seed if options.seed is not None else random.randint(0, 2**31 - 1))
        assembler = TextAssembler(options.stop)
        generated = 0
        first_token_at: float | None = None
        finish = "length"
        if limit == 0:
            first_token_at = time.perf_counter()
        else:
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
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                    finish = "stop"
                    break
                generated += 1
                piece = assembler.feed(self.llm.detokenize([token]))
                if piece:
                    yield TokenEvent(piece)
                if assembler.stopped:
                    finish = "stop"
                    break
                if generated >= limit:
                    break
        tail = assembler.flush()
        if tail:
            yield TokenEvent(tail)
        ended = time.perf_counter()
        first_token_at = first_token_at or ended
        usage = Usage(
            prompt_tokens=len(tokens),
            completion_tokens=generated,
            prompt_ms=(first_token_at - started) * 1000,
            generate_ms=(ended - first_token_at) * 1000,
        )
        yield DoneEvent(finish_reason=finish, usage=usage)

    def embed(self, request: EmbedRequest) -> EmbedResult:
        if self._embedder is None:
            # A second context in embedding mode; the weights are mmapped, so shared.
            # Chat models declare no pooling, which would give one vector per token: average them.
            arch = self.llm.metadata.get("general.architecture", "")
            mean = {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
            pooling = {} if f"{arch}.pooling_type" in self.llm.metadata else mean
            self._embedder = Llama(**{**self._llama_kwargs, "embedding": True, **pooling})
        counts = [len(self._embedder.tokenize(text.encode("utf-8"))) for text in request.inputs]
        limit = self._embedder.n_ctx()
        if not request.truncate and any(c > limit for c in counts):
            raise EngineError(f"An input is longer than the context of {limit} tokens and truncate is false.")
        vectors = self._embedder.embed(request.inputs, normalize=True, truncate=True)
        return EmbedResult(
            embeddings=[list(map(float, v)) for v in vectors], prompt_tokens=sum(min(c, limit) for c in counts)
        )

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()
        if self._embedder is not None:
            self._embedder.close()
