"""Ollama's Modelfile vocabulary mapped onto RKLLama's Modelfile keys, both ways.

/api/create receives either structured fields (`from`, `system`, `parameters`, as the
current ollama clients send) or Modelfile text in Ollama's syntax (`FROM x`,
`PARAMETER key value`, `SYSTEM` with triple quotes) or RKLLama's (`KEY=VALUE`). All end up as
RKLLama Modelfile values; /api/show renders them back in Ollama's syntax.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest
from .modelfile import Modelfile, parse_modelfile

# Ollama parameter -> RKLLama Modelfile key.
PARAMETERS = {
    "temperature": "TEMPERATURE",
    "top_k": "TOP_K",
    "top_p": "TOP_P",
    "min_p": "MIN_P",
    "repeat_penalty": "REPEAT_PENALTY",
    "presence_penalty": "PRESENCE_PENALTY",
    "frequency_penalty": "FREQUENCY_PENALTY",
    "num_predict": "MAX_NEW_TOKENS",
    "num_ctx": "NUM_CTX",
    "seed": "SEED",
    "stop": "STOP",
    "num_thread": "NUM_THREAD",
    "num_batch": "NUM_BATCH",
}
KEYS_TO_PARAMETERS = {key: name for name, key in PARAMETERS.items()}
_OLLAMA_INSTRUCTION = re.compile(r"^(FROM|PARAMETER|SYSTEM|TEMPLATE|ADAPTER|LICENSE|MESSAGE|REQUIRES)\s", re.IGNORECASE)


@dataclass
class ModelDefinition:
    """What /api/create asks for: a source model and Modelfile values to set on the copy."""

    source: str | None = None
    values: dict[str, str] = field(default_factory=dict)


def parameters_to_values(parameters: dict[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in parameters.items():
        key = PARAMETERS.get(name)
        if key is None:
            raise BadRequest(f"Parameter {name!r} is not supported; supported: {', '.join(sorted(PARAMETERS))}.")
        if name == "stop":
            stops = value if isinstance(value, list) else [value]
            if not all(isinstance(s, str) for s in stops):
                raise BadRequest("Parameter 'stop' must be a string or a list of strings.")
            values[key] = "|".join(stops)
        elif isinstance(value, bool) or not isinstance(value, int | float | str):
            raise BadRequest(f"Parameter {name!r} must be a number, got {json.dumps(value)}.")
        else:
            values[key] = str(value)
    return values


def _unquote(text: str) -> str:
    text = text.strip()
    for quote in ('"""', '"'):
        if len(text) >= 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote) : -len(quote)]
    return text


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; a `\"\"\"` argument may span lines."""
    pairs: list[tuple[str, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        argument = argument.strip()
        if argument.startswith('"""') and (len(argument) < 6 or not argument.endswith('"""')):
            while index < len(lines) and not argument.endswith('"""'):
                argument += "\n" + lines[index]
                index += 1
            if not argument.endswith('"""'):
                raise BadRequest(f'Modelfile: the """ opened by {instruction.upper()} is never closed.')
        pairs.append((instruction.upper(), argument))
    return pairs


def _parse_parameter(argument: str) -> tuple[str, Any]:
    name, _, raw = argument.partition(" ")
    raw = _unquote(raw)
    if name == "stop":
        return name, raw
    try:
        return name, json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, nested too deep, an integer too long
        raise BadRequest(f"Modelfile: PARAMETER {name} needs a number, got {raw[:40]!r}.") from None


def parse_definition(text: str) -> ModelDefinition:
    """Modelfile text in Ollama's syntax or RKLLama's KEY=VALUE syntax."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not any(_OLLAMA_INSTRUCTION.match(line) for line in lines):
        values = dict(parse_modelfile(text, source="modelfile").values)
        return ModelDefinition(source=values.pop("FROM", None), values=values)
    definition = ModelDefinition()
    stops: list[str] = []
    parameters: dict[str, Any] = {}
    for instruction, argument in _instructions(text):
        if instruction == "FROM":
            definition.source = _unquote(argument)
        elif instruction == "SYSTEM":
            definition.values["SYSTEM"] = _unquote(argument)
        elif instruction == "PARAMETER":
            name, value = _parse_parameter(argument)
            if name == "stop":
                stops.append(value)
            else:
                parameters[name] = value
        elif instruction == "LICENSE":
            continue  # informational only
        else:
            raise BadRequest(
                f"Modelfile: {instruction} is not supported (the chat template comes from the model file); "
                "use FROM, PARAMETER and SYSTEM."
            )
    if stops:
        parameters["stop"] = stops
    definition.values.update(parameters_to_values(parameters))
    return definition


def _number(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def ollama_parameters(modelfile: Modelfile) -> list[tuple[str, Any]]:
    """The Modelfile's settings as Ollama (name, value) pairs, stop strings one by one."""
    pairs: list[tuple[str, Any]] = []
    for key, value in modelfile.values.items():
        name = KEYS_TO_PARAMETERS.get(key)
        if name is None or value == "":
            continue
        if name == "stop":
            pairs.extend(("stop", stop) for stop in value.split("|") if stop)
        else:
            pairs.append((name, _number(value)))
    return pairs


def render_parameters(modelfile: Modelfile) -> str:
    """/api/show's `parameters`: one `name value` per line."""
    return "\n".join(f"{name} {_show(value)}" for name, value in ollama_parameters(modelfile))


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def render_ollama_modelfile(model_name: str, file_name: str, modelfile: Modelfile) -> str:
    lines = [f"# Modelfile of {model_name}", f"FROM {file_name}"]
    system = modelfile.get("SYSTEM")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for name, value in ollama_parameters(modelfile):
        lines.append(f"PARAMETER {name} {_show(value)}")
    return "\n".join(lines) + "\n"
