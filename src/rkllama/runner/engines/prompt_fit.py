"""Fitting a prompt into the context: one policy for every engine that can count tokens.

As Ollama's chatPrompt (server/prompt.go) does it: the oldest non-system messages are dropped
first (an assistant's tool call goes together with the tool results that answer it), system
messages and the newest message are always kept. Only when that is still too long is the
remaining prompt cut, from the front, keeping the BOS token (as Ollama's runner truncates a
prompt). Tool definitions are never cut: when the tools, system messages and the newest message
alone do not fit, the request is refused and the message says so.

Unlike Ollama (which shifts the context while generating) our engines stop at the end of the
context, so a prompt is fitted into the context minus room for the reply (`reply_room`).
With `truncate` false nothing is dropped, and a prompt that leaves no room is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...types import ChatMessage
from .base import EngineError

# Tokens kept free for the reply when the request sets no max_tokens (at most a quarter of the context).
DEFAULT_REPLY_ROOM = 512

Render = Callable[[list[ChatMessage], list[dict[str, Any]] | None], str]
Tokenize = Callable[[str], list[int]]


@dataclass
class FittedPrompt:
    tokens: list[int]
    dropped_messages: int = 0
    truncated_tokens: int = 0


def reply_room(context: int, max_tokens: int | None) -> int:
    """Tokens the fitted prompt leaves free: max_tokens when set, else a quarter of the
    context up to DEFAULT_REPLY_ROOM; never more than half the context."""
    wanted = max_tokens if max_tokens is not None and max_tokens > 0 else min(DEFAULT_REPLY_ROOM, context // 4)
    return max(1, min(wanted, context // 2))


def too_long(prompt_tokens: int, context: int) -> EngineError:
    return EngineError(
        f"The prompt is {prompt_tokens} tokens, more than the model's context of {context}, and truncate is "
        "false. Shorten it, allow truncation, or use a larger num_ctx."
    )


def _block_start(messages: list[ChatMessage], index: int) -> int:
    """Where the kept part must start to keep message `index`: tool results are never kept
    without the assistant turn whose tool call they answer."""
    if index <= 0 or messages[index].role != "tool":
        return index
    start = index
    while start > 0 and messages[start - 1].role == "tool":
        start -= 1
    caller = start - 1
    if caller >= 0 and messages[caller].role == "assistant" and messages[caller].tool_calls:
        return caller
    return index


def _kept(messages: list[ChatMessage], start: int) -> list[ChatMessage]:
    return [m for m in messages[:start] if m.role == "system"] + messages[start:]


def fit_chat(
    messages: list[ChatMessage],
    render: Render,
    tokenize: Tokenize,
    *,
    context: int,
    reserve: int,
    truncate: bool,
    tools: list[dict[str, Any]] | None,
    keep: int = 1,
) -> FittedPrompt:
    """The tokens of the longest tail of the conversation that fits (see the module doc)."""
    full = tokenize(render(messages, tools))
    if len(full) + reserve <= context or (not truncate and len(full) < context):
        return FittedPrompt(full)
    if not truncate:
        raise too_long(len(full), context)
    starts = sorted({_block_start(messages, i) for i in range(len(messages))})
    tokens_at: dict[int, list[int]] = {0: full}

    def tokens(k: int) -> list[int]:
        if k not in tokens_at:
            tokens_at[k] = tokenize(render(_kept(messages, starts[k]), tools))
        return tokens_at[k]

    # Fewest messages dropped that fit; dropping more never makes a prompt longer.
    low, high, best = 1, len(starts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if len(tokens(middle)) + reserve <= context:
            best, high = middle, middle - 1
        else:
            low = middle + 1
    last = len(starts) - 1
    chosen = best if best is not None else last
    kept = tokens(chosen)
    dropped = len(messages) - len(_kept(messages, starts[chosen]))
    if len(kept) < context:
        return FittedPrompt(kept, dropped_messages=dropped)
    if tools:
        raise _tools_do_not_fit(_kept(messages, starts[last]), render, tokenize, tools, len(kept), context)
    cut = cut_front(kept, context, reserve, truncate=True, keep=keep)
    return FittedPrompt(cut.tokens, dropped_messages=dropped, truncated_tokens=cut.truncated_tokens)


def _tools_do_not_fit(
    kept: list[ChatMessage], render: Render, tokenize: Tokenize, tools: list[dict[str, Any]], total: int, context: int
) -> EngineError:
    tool_tokens = total - len(tokenize(render(kept, None)))
    advice = "Send fewer tools, or use a model with a larger context (num_ctx)."
    if tool_tokens >= context:
        return EngineError(
            f"The tool definitions alone are {tool_tokens} tokens, more than the context of {context}. {advice}"
        )
    return EngineError(
        f"The tool definitions ({tool_tokens} tokens) with the system messages and the last message are {total} "
        f"tokens, more than the context of {context}; tool definitions are never cut. {advice}"
    )


def cut_front(tokens: list[int], context: int, reserve: int, *, truncate: bool, keep: int = 1) -> FittedPrompt:
    """A raw prompt: cut tokens from the front (after the first `keep`, the BOS) until it fits."""
    if len(tokens) + reserve <= context or (not truncate and len(tokens) < context):
        return FittedPrompt(tokens)
    if not truncate:
        raise too_long(len(tokens), context)
    keep = min(keep, len(tokens))
    target = max(keep + 1, context - reserve)
    cut = len(tokens) - target
    return FittedPrompt(tokens[:keep] + tokens[keep + cut :], truncated_tokens=cut)
