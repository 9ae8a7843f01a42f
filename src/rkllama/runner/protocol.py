"""The runner's wire protocol: one JSON object per line over a socket pair.

server -> runner: {"op": "load", "spec": {...}} first, then
                  {"op": "generate" | "embed" | "tokenize", "id": n, ...} and {"op": "cancel", "id": n}
runner -> server: {"op": "ready", "info": {...}} or {"op": "load_error", "message": "..."},
                  then per request id: {"type": "token"...}*, and one of
                  {"type": "done"...}, {"type": "result", "value": ...}, {"type": "error", "message": ...}

A socket rather than stdin/stdout, because native libraries print to stdout.
"""

from __future__ import annotations

import json
from typing import Any

# Arguments of the runner command line; the socket's fd number follows.
RUNNER_MODULE = "rkllama.runner.main"


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")


def decode(line: bytes) -> dict[str, Any]:
    return json.loads(line.decode("utf-8"))
