"""Every bound on what a client sends, in one place, shared by the three dialects.

Two kinds: the ranges of sampling values (fixed: what the engines can use, and OpenAI's own
ranges on /v1/*), and the sizes of a request (settings with generous defaults, see
RequestLimits in settings.py). Each value out of bounds is a 400 naming the field, its
range and, for sizes, the setting that raises it. docs/limits.md lists them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from ..errors import BadRequest
from ..settings import RequestLimits
from ..types import ChatMessage, GenerateRequest

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# A sanity bound on a Modelfile's NUM_CTX set through /api/create; loading checks it further.
NUM_CTX_MAX = 2**20
# Ten years: longer is a mistake (-1 keeps a model loaded until it is unloaded).
KEEP_ALIVE_MAX_SECONDS = 10 * 365 * 24 * 3600


@dataclass(frozen=True)
class Range:
    """low..high (both included unless low_open); `also` are values outside it that mean
    something (a seed of -1: random). None as high: only a size setting bounds it."""

    low: float
    high: float | None = None
    low_open: bool = False
    also: tuple[int, ...] = ()

    def describe(self) -> str:
        low = f"greater than {_num(self.low)}" if self.low_open else f"at least {_num(self.low)}"
        if self.high is None:
            text = low
        elif self.low_open:
            text = f"{low} and at most {_num(self.high)}"
        else:
            text = f"between {_num(self.low)} and {_num(self.high)}"
        if self.also:
            text = " or ".join(_num(v) for v in self.also) + f", or {text}"
        return text

    def holds(self, value: float) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and (self.high is None or value <= self.high)

    def check(self, value: float | None, where: str) -> None:
        """For hand-parsed bodies (the native API): a 400 when out of range."""
        if value is not None and not self.holds(value):
            raise BadRequest(f"'{where}' must be {self.describe()}, got {_num(value)}.")

    def annotated(self, kind: type) -> Any:
        """`kind | None` for a pydantic body, checked against this range (and shown in the schema)."""

        def check(value: Any) -> Any:
            if value is not None and not self.holds(value):
                raise PydanticCustomError("range", "must be {range}, got {value}", {"range": self.describe(),
                                                                                    "value": _num(value)})  # fmt: skip
            return value

        schema = {"minimum": self.low} if not self.low_open else {"exclusiveMinimum": self.low}
        if self.high is not None:
            schema["maximum"] = self.high
        return Annotated[kind | None, AfterValidator(check), Field(json_schema_extra=schema)]


def shown(value: object) -> str:
    """A number as a person writes it (1000000, not 1000000.0), a string quoted."""
    return _num(value) if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


# What the engines can use. Ollama and llama.cpp validate none of these; we keep their
# meaning (top_k 0 = off, seed -1 = random, num_predict -1 = no limit, -2 = fill the context).
SAMPLING: dict[str, Range] = {
    "temperature": Range(0, 100),
    "top_p": Range(0, 1),
    "min_p": Range(0, 1),
    "top_k": Range(0, INT32_MAX),
    "seed": Range(0, UINT32_MAX, also=(-1,)),
    "repeat_penalty": Range(0, 100, low_open=True),
    "presence_penalty": Range(-100, 100),
    "frequency_penalty": Range(-100, 100),
    "num_predict": Range(-2),
    "max_tokens": Range(1),
    # Modelfile-only (/api/create; a request's num_ctx is checked against the model's trained
    # context in context_size.py): each context token, thread and batch slot costs memory.
    "num_ctx": Range(1, NUM_CTX_MAX),
    "num_thread": Range(1, 1024),
    "num_batch": Range(1, 65536),
}
# OpenAI's documented ranges on /v1/* (llama.cpp's extras keep the lenient ones).
OPENAI_SAMPLING: dict[str, Range] = {
    **SAMPLING,
    "temperature": Range(0, 2),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
}


def bounded(kind: type, name: str, table: dict[str, Range] = SAMPLING) -> Any:
    return table[name].annotated(kind)


def check_parameters(values: dict[str, str], names: dict[str, str]) -> None:
    """Modelfile values a client sets (/api/create): the same ranges as a request's options.
    `names` maps Modelfile keys to Ollama's parameter names."""
    for key, text in values.items():
        name = names.get(key)
        if name not in SAMPLING:
            continue
        try:
            value = float(text)
        except ValueError:
            raise BadRequest(f"Parameter '{name}' must be a number, got {text!r}.") from None
        if not SAMPLING[name].holds(value):
            raise BadRequest(f"Parameter '{name}' must be {SAMPLING[name].describe()}, got {text}.")


# --- sizes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldNames:
    """How a dialect spells the fields the size checks name."""

    max_tokens: str = "max_tokens"
    stop: str = "stop"
    messages: str = "messages"


OLLAMA_FIELDS = FieldNames(max_tokens="options.num_predict", stop="options.stop")


def _too_many(where: str, count: int, limit: int, what: str, setting: str) -> BadRequest:
    return BadRequest(f"'{where}' holds {count} {what}; at most {limit} are allowed (setting RKLLAMA_{setting}).")


def check_count(items: list[Any] | None, limit: int, where: str, what: str, setting: str) -> None:
    if items is not None and len(items) > limit:
        raise _too_many(where, len(items), limit, what, setting)


def _prompt_chars(request: GenerateRequest) -> int:
    messages: list[ChatMessage] = request.messages or []
    return len(request.prompt or "") + sum(len(m.content or "") for m in messages)


def check_generate(request: GenerateRequest, limits: RequestLimits, names: FieldNames = FieldNames()) -> None:
    """The sizes of a generation request, after its dialect translated it."""
    check_count(request.messages, limits.max_messages, names.messages, "messages", "MAX_MESSAGES")
    chars = _prompt_chars(request)
    if chars > limits.max_prompt_chars:
        raise BadRequest(
            f"The prompt is {chars} characters long; at most {limits.max_prompt_chars} are allowed "
            "(setting RKLLAMA_MAX_PROMPT_CHARS)."
        )
    options = request.options
    if options.max_tokens is not None and options.max_tokens > limits.max_tokens:
        raise BadRequest(
            f"'{names.max_tokens}' must be at most {limits.max_tokens} tokens, got {options.max_tokens} "
            "(setting RKLLAMA_MAX_TOKENS)."
        )
    check_count(options.stop, limits.max_stop_strings, names.stop, "stop strings", "MAX_STOP_STRINGS")
    check_lengths(options.stop or [], limits.max_stop_chars, names.stop, "MAX_STOP_CHARS")
    check_count(request.tools, limits.max_tools, "tools", "tools", "MAX_TOOLS")


def check_lengths(texts: list[str], limit: int, where: str, setting: str) -> None:
    for index, text in enumerate(texts):
        if len(text) > limit:
            label = where if len(texts) == 1 else f"{where}.{index}"
            raise BadRequest(
                f"'{label}' is {len(text)} characters long; at most {limit} are allowed (setting RKLLAMA_{setting})."
            )


def check_images(count: int, limits: RequestLimits) -> None:
    """At most RKLLAMA_MAX_IMAGES images per request (a model may allow fewer: MAX_IMAGES in its Modelfile)."""
    if count > limits.max_images:
        raise BadRequest(
            f"The request holds {count} images; at most {limits.max_images} are allowed (setting RKLLAMA_MAX_IMAGES)."
        )


def check_inputs(inputs: list[str], limits: RequestLimits, where: str = "input") -> list[str]:
    """Embedding inputs: how many, and how long each."""
    check_count(inputs, limits.max_embed_inputs, where, "inputs", "MAX_EMBED_INPUTS")
    check_lengths(inputs, limits.max_prompt_chars, where, "MAX_PROMPT_CHARS")
    return inputs
