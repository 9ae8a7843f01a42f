"""Prompts for rkllm models: the model's own Hugging Face tokenizer and chat template when
its folder holds them (tokenizer.json, tokenizer_config.json, as fetched from the Modelfile's
HUGGINGFACE_PATH), otherwise plain text for the runtime's built-in template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...chat_template import ChatTemplate, render_chat
from ...types import ChatMessage
from .base import EngineError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer Hugging Face repos keep the template here
# Where an image goes in a multimodal prompt (as in Rockchip's demos); the runtime expands it.
IMAGE_MARKER = "<image>"


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def _template_from_config(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


@dataclass
class ModelTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    template: ChatTemplate
    bos_token: str
    eos_token: str

    def render(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None, enable_thinking: bool | None
    ) -> str:
        return render_chat(
            self.template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=tools,
            enable_thinking=enable_thinking,
        )

    def encode(self, text: str) -> list[int]:
        # The rendered template already holds any BOS token it wants.
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def load_tokenizer(folder: Path) -> ModelTokenizer | None:
    """The model folder's tokenizer, or None when it has no tokenizer.json."""
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise EngineError(f"Cannot read {folder.name}/{TOKENIZER_FILE}: {exc}") from None
    config: dict[str, Any] = {}
    config_path = folder / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"Cannot read {folder.name}/{TOKENIZER_CONFIG_FILE}: {exc}") from None
    template = _template_from_config(config)
    if (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    return ModelTokenizer(
        tokenizer=tokenizer,
        template=ChatTemplate(template),
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
    )


def with_markers(message: ChatMessage) -> str:
    """The message's text after one image marker per image (its images go before its text)."""
    return IMAGE_MARKER * len(message.images or []) + message.content


def flatten_messages(messages: list[ChatMessage]) -> str:
    """One prompt for the runtime's template, which wraps a single user turn: earlier turns
    are written out as "role: content" lines above the last message."""
    if not messages:
        return ""
    *history, last = messages
    lines = [f"{m.role}: {with_markers(m)}" for m in history]
    lines.append(with_markers(last) if last.role in ("user", "tool") else f"{last.role}: {with_markers(last)}")
    return "\n".join(lines)


def same_messages(a: list[ChatMessage], b: list[ChatMessage]) -> bool:
    return len(a) == len(b) and all(
        x.role == y.role and x.content == y.content and (x.images or []) == (y.images or [])
        for x, y in zip(a, b, strict=True)
    )
