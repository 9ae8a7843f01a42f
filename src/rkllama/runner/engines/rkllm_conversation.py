"""Turning a request into one rkllm input: the conversation's messages, what of it the
runtime's KV cache already holds (without tokenizer files the runtime keeps the conversation,
so a request that adds one user/tool turn to it is sent alone), the tools given to the
runtime's template, token input through the model's own tokenizer, and images.

A mixin of RkllmEngine (rkllm.py); it uses the engine's runtime handle and settings.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from typing import Any

from ...store.modelfile import Modelfile
from ...types import ChatMessage, GenerateRequest
from .base import EngineError, LoadSpec
from .prompt_fit import FittedPrompt, cut_front, fit_chat, reply_room
from .rkllm_abi import RKLLM_INPUT_PROMPT, RKLLM_INPUT_TOKEN
from .rkllm_multimodal import check_images, set_multimodal
from .rkllm_params import InitSettings
from .rkllm_prompt import IMAGE_MARKER, ModelTokenizer, flatten_messages, same_messages, with_markers
from .rkllm_vision import ImageEncoder

# Marks tool results in the runtime's template (as in Rockchip's server demo).
TOOL_RESPONSE_TAG = "tool_response"


@dataclass
class PreparedInput:
    """One rkllm_run: the input struct and the buffers it points into (kept alive)."""

    struct: Any
    keep_history: bool
    clear_first: bool
    prompt_tokens: int | None  # known for token input
    messages: list[ChatMessage] | None  # the conversation, when the runtime keeps it
    buffers: list[Any] = field(default_factory=list)
    fitted: FittedPrompt | None = None  # how the prompt was fitted (token input only)
    image_tokens: int = 0  # the images' share of the prompt


class ConversationMixin:
    # Provided by RkllmEngine.
    spec: LoadSpec
    abi: Any
    lib: Any
    modelfile: Modelfile
    settings: InitSettings
    tokenizer: ModelTokenizer | None
    vision: ImageEncoder | None
    _handle: Any
    _conversation: list[ChatMessage] | None
    _tools: str | None
    _cache_dirty: bool

    def _messages(self, request: GenerateRequest) -> list[ChatMessage]:
        messages = list(request.messages or [])
        system = self.modelfile.get("SYSTEM")
        if system and not any(m.role == "system" for m in messages):
            messages.insert(0, ChatMessage(role="system", content=system))
        return messages

    def _enable_thinking(self, request: GenerateRequest) -> bool | None:
        if request.enable_thinking is not None:
            return request.enable_thinking
        return self.modelfile.get_bool("ENABLE_THINKING")

    def _continues_conversation(self, messages: list[ChatMessage], tools: str | None) -> bool:
        previous = self._conversation
        if previous is None or not self.abi.has_keep_history or len(messages) != len(previous) + 1:
            return False
        if tools != self._tools:
            return False
        allowed = ("user", "tool") if self.abi.has_perf else ("user",)
        return messages[-1].role in allowed and same_messages(messages[:-1], previous)

    def _prepare(self, request: GenerateRequest) -> PreparedInput:
        rk_input = self.abi.Input()
        thinking = self._enable_thinking(request)
        if self.abi.has_perf:
            rk_input.role = b"user"
            rk_input.enable_thinking = bool(thinking)
        # An image request always goes through the runtime's template: RKLLM_INPUT_MULTIMODAL takes text.
        if self.tokenizer is not None and not request.image_count:
            fitted = self._fit_prompt(request, thinking)
            tokens = fitted.tokens
            if not tokens:
                raise EngineError("The prompt is empty.")
            array = (ctypes.c_int32 * len(tokens))(*tokens)
            rk_input.input_type = RKLLM_INPUT_TOKEN
            rk_input.token_input.input_ids = array
            rk_input.token_input.n_tokens = len(tokens)
            return PreparedInput(rk_input, False, self._cache_dirty, len(tokens), None, [array], fitted)

        if request.messages is None:
            prepared = PreparedInput(rk_input, False, self._cache_dirty, None, None)
            images = request.images or []
            text = with_markers(ChatMessage(role="user", content=request.prompt or "", images=images))
        else:
            messages = self._messages(request)
            if not messages:
                raise EngineError("The conversation is empty.")
            keep = self.abi.has_keep_history
            tools = json.dumps(request.tools, ensure_ascii=False) if request.tools else None
            if self._continues_conversation(messages, tools):
                prepared = PreparedInput(rk_input, True, False, None, messages)
                text = with_markers(messages[-1])
                images = messages[-1].images or []
                if self.abi.has_perf:
                    rk_input.role = messages[-1].role.encode()
            else:
                conversation = messages
                messages = self._set_function_tools(messages, tools)
                prepared = PreparedInput(rk_input, keep, self._cache_dirty, None, conversation if keep else None)
                text = flatten_messages(messages)
                images = [image for m in messages for image in m.images or []]
        if images:
            self._attach_images(prepared, text, images)
            return prepared
        encoded = ctypes.create_string_buffer(text.encode("utf-8"))
        rk_input.input_type = RKLLM_INPUT_PROMPT
        rk_input.prompt_input = ctypes.cast(encoded, ctypes.c_char_p)
        prepared.buffers.append(encoded)
        return prepared

    def _attach_images(self, prepared: PreparedInput, text: str, images: list[str]) -> None:
        if self.vision is None:
            raise EngineError(
                f"Model {self.spec.name} cannot read images: its Modelfile names no vision encoder (VISION_ENCODER)."
            )
        check_images(self.abi, text, images, self.spec.name)
        prepared.buffers += set_multimodal(self.abi, prepared.struct, text, self.vision, images)
        prepared.image_tokens = self.vision.n_tokens * len(images)
        if self.tokenizer is not None:  # the text's share, for runtimes that report no counts
            prepared.prompt_tokens = len(self.tokenizer.encode(text.replace(IMAGE_MARKER, "")))

    def _fit_prompt(self, request: GenerateRequest, thinking: bool | None) -> FittedPrompt:
        """The same fitting as llama.cpp's (prompt_fit.py): possible only with the tokenizer files.
        Without them the runtime's own template sees the text, and a prompt too long is its error."""
        assert self.tokenizer is not None
        tokenizer = self.tokenizer
        context = min(self.settings.max_context_len, request.num_ctx or self.settings.max_context_len)
        reserve = reply_room(context, request.options.max_tokens)
        if request.messages is None:
            tokens = tokenizer.encode(request.prompt or "")
            return cut_front(tokens, context, reserve, truncate=request.truncate, keep=0)
        return fit_chat(
            self._messages(request),
            lambda messages, tools: tokenizer.render(messages, tools, thinking),
            tokenizer.encode,
            context=context,
            reserve=reserve,
            truncate=request.truncate,
            tools=request.tools,
            keep=0,
        )

    def _set_function_tools(self, messages: list[ChatMessage], tools: str | None) -> list[ChatMessage]:
        """Give the runtime's template the tools (1.2.1+), with the system prompt they go with;
        returns the messages left for the prompt."""
        if not self.abi.has_perf or tools == self._tools:
            return messages
        system = "\n".join(m.content for m in messages if m.role == "system")
        code = self.lib.rkllm_set_function_tools(
            self._handle, system.encode(), (tools or "").encode(), TOOL_RESPONSE_TAG.encode()
        )
        if code != 0 and tools is not None:
            raise EngineError(f"The rkllm runtime refused the tools (rkllm_set_function_tools returned {code}).")
        self._tools = tools
        self._cache_dirty = True  # a new system prompt: what is cached no longer applies
        return [m for m in messages if m.role != "system"] if tools is not None else messages
