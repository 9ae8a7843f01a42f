"""RKLLama's Modelfile: one `KEY=VALUE` per line, values optionally quoted, `#` comments.

Keys we read (all optional; see docs/modelfile.md):
FROM, HUGGINGFACE_PATH, SYSTEM, TEMPERATURE, TOP_K, TOP_P, MIN_P, REPEAT_PENALTY,
FREQUENCY_PENALTY, PRESENCE_PENALTY, MAX_NEW_TOKENS, NUM_CTX, SEED, STOP, ENABLE_THINKING,
NUM_THREAD, plus rkllm-only keys read by that engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest
from ..types import SamplingOptions
from .inside import describe_os_error, read_text_inside, relative
from .name_rules import shown

MODELFILE_NAME = "Modelfile"

_FLOAT_KEYS = {
    "TEMPERATURE": "temperature",
    "TOP_P": "top_p",
    "MIN_P": "min_p",
    "REPEAT_PENALTY": "repeat_penalty",
    "FREQUENCY_PENALTY": "frequency_penalty",
    "PRESENCE_PENALTY": "presence_penalty",
}
_INT_KEYS = {"TOP_K": "top_k", "MAX_NEW_TOKENS": "max_tokens", "SEED": "seed"}


@dataclass
class Modelfile:
    values: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key.upper(), default)

    def get_int(self, key: str) -> int | None:
        raw = self.get(key)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(f"Modelfile: {key} must be an integer, got {raw!r}.") from None

    def get_float(self, key: str) -> float | None:
        raw = self.get(key)
        if raw is None or raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            raise BadRequest(f"Modelfile: {key} must be a number, got {raw!r}.") from None

    def get_bool(self, key: str) -> bool | None:
        raw = self.get(key)
        if raw is None or raw == "":
            return None
        return raw.strip().lower() in {"1", "true", "yes", "on"}

    def sampling_defaults(self) -> SamplingOptions:
        opts = SamplingOptions()
        for key, attr in _FLOAT_KEYS.items():
            setattr(opts, attr, self.get_float(key))
        for key, attr in _INT_KEYS.items():
            setattr(opts, attr, self.get_int(key))
        stop = self.get("STOP")
        if stop:
            opts.stop = [s for s in stop.split("|") if s]
        return opts

    def render(self) -> str:
        # Newlines are written as \n so each key stays on one line.
        lines = [f'{key}="{value}"'.replace("\n", "\\n") for key, value in self.values.items()]
        return "\n".join(lines) + "\n"


def parse_modelfile(text: str, source: str = MODELFILE_NAME) -> Modelfile:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise BadRequest(f"{source} line {number}: expected KEY=VALUE, got {shown(line)}.")
        key, value = line.split("=", 1)
        key = key.strip().upper()
        if not key.replace("_", "").isalnum():
            raise BadRequest(f"{source} line {number}: {shown(key)} is not a valid key.")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value.replace("\\n", "\n")
    return Modelfile(values)


def read_modelfile(path: Path, root: Path) -> Modelfile:
    """The Modelfile at `path`, which must resolve inside the models directory `root`."""
    try:
        text = read_text_inside(path, root)
    except FileNotFoundError:
        return Modelfile()
    except UnicodeDecodeError:
        raise BadRequest(f"Cannot read {relative(path, root)}: it is not UTF-8 text.") from None
    except OSError as exc:
        raise BadRequest(f"Cannot read {relative(path, root)}: {describe_os_error(exc, root)}.") from None
    return parse_modelfile(text, source=relative(path, root))
