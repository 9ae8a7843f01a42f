"""Whether a text is the start of some JSON document: what a JSON grammar guarantees of an
answer cut at its token limit (a finished answer must parse whole)."""

from __future__ import annotations

import json

_CLOSERS = {"{": "}", "[": "]"}


def is_json_prefix(text: str) -> bool:
    """True when some ending turns `text` into valid JSON; checked by completing it."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _CLOSERS:
            stack.append(char)
        elif char in "}]":
            if not stack or _CLOSERS[stack.pop()] != char:
                return False
    return any(_parses(text + ending + _close(stack)) for ending in _endings(in_string))


def _close(stack: list[str]) -> str:
    return "".join(_CLOSERS[opener] for opener in reversed(stack))


def _endings(in_string: bool) -> list[str]:
    """Candidate ways to finish the token the text stops inside of, then the member or
    element it belongs to; trying them all is cheap and needs no grammar of our own."""
    if in_string:
        # An unfinished escape or \\u sequence is completed with hex digits first.
        tokens = ['"', '0"', '00"', '000"', '0000"', 'n"']
    else:
        tokens = ["", "0", "e0", "ull", "ll", "l", "rue", "ue", "e", "alse", "lse", "se"]
    members = ["", ": null", "null", '"k": null']
    return [token + member for token in tokens for member in members]


def _parses(candidate: str) -> bool:
    try:
        json.loads(candidate)
    except json.JSONDecodeError:
        return False
    return True
