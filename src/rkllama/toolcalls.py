"""Find tool calls in a model's reply, for the dialects that return `tool_calls`.

Models call tools in one of two ways: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks (Qwen/Hermes style, and what chat_template.py tells template-less models to do),
or a reply that is nothing but such a JSON object (or a list of them), which is also what
the engine's grammar produces when a tool call is forced. Only tools that were offered
count; anything else stays text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
OPEN_TAG = "<tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def _as_call(value: Any, allowed: set[str]) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"function": {"name", "arguments"}}
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or name not in allowed or not isinstance(arguments, dict):
        return None
    return ToolCall(name=name, arguments=arguments)


def _calls_in_json(text: str, allowed: set[str]) -> list[ToolCall] | None:
    """The calls if `text` is entirely a call object or a list of them, else None."""
    fenced = _FENCE.match(text.strip())
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, allowed) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> tuple[str, list[ToolCall]]:
    """(remaining text, tool calls). Without offered tools, the text is returned as is."""
    allowed = tool_names(tools)
    if not allowed:
        return text, []
    whole = _calls_in_json(text, allowed)
    if whole is not None:
        return "", whole
    calls: list[ToolCall] = []

    def take(match: re.Match[str]) -> str:
        found = _calls_in_json(match.group(1), allowed)
        if found is None:
            return match.group(0)
        calls.extend(found)
        return ""

    remaining = _BLOCK.sub(take, text)
    return (remaining.strip() if calls else text), calls


def may_become_tool_call(text: str) -> bool:
    """While streaming with tools offered: could this reply start still turn into a call?

    The dialects hold text back while this is true, so a call is never half-streamed as content."""
    head = text.lstrip()
    if not head:
        return True
    if head.startswith(("{", "[", "```")):
        return True
    return head.startswith(OPEN_TAG) or OPEN_TAG.startswith(head)
