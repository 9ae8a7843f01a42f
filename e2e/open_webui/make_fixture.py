"""Turn the recording proxy's log into the replay fixture tests/fixtures/open_webui_<version>_requests.json.

Each request keeps exactly what Open WebUI sent (method, path, query, the headers that matter,
JSON body with its tools list untouched) plus when it started and ended on the proxy's clock, so
a replay can tell which requests overlapped. Responses are not part of the fixture: they are
rkllama's, and the replay test checks those itself.

    python make_fixture.py --log requests.jsonl --version 0.12.4 --out tests/fixtures/open_webui_0.12.4_requests.json
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

HOW_CAPTURED = (
    "e2e/open_webui/run.sh: Open WebUI {version} (PyPI, own venv, offline settings) talked to `rkllama serve` "
    "through e2e/open_webui/recording_proxy.py while Playwright drove Debian's Chromium through the steps "
    "named in `phases`. Requests are in arrival order; t_start_ms/t_end_ms are milliseconds on the proxy's "
    "clock (t_end_ms is when the response ended or the client went away), so overlapping requests are the "
    "ones whose intervals intersect. Bodies are as sent (tools included); only the Authorization header is "
    "replaced by a placeholder."
)


def load_exchanges(log_path: Path) -> tuple[list[dict], list[dict]]:
    """Merge the proxy's request/end events into one record per exchange; return them and the phases."""
    requests: dict[int, dict] = {}
    phases: list[dict] = []
    for line in log_path.read_text().splitlines():
        event = json.loads(line)
        kind = event.pop("event")
        if kind == "phase":
            phases.append({"name": event["name"], "t_ms": event["t_ms"]})
        elif kind == "request":
            headers = dict(event["headers"])
            if "authorization" in headers:
                headers["authorization"] = "Bearer <api key>"
            requests[event["seq"]] = {
                "seq": event["seq"],
                "t_start_ms": event["t_ms"],
                "t_end_ms": None,
                "method": event["method"],
                "path": event["path"],
                "query": event["query"],
                "headers": headers,
                "body": event["body"],
                "status": None,
                "outcome": "no_end_recorded",
            }
        elif kind == "end" and event["seq"] in requests:
            requests[event["seq"]].update(t_end_ms=event["t_ms"], status=event["status"], outcome=event["outcome"])
    return [requests[seq] for seq in sorted(requests)], phases


def phase_of(t_ms: float, phases: list[dict]) -> str | None:
    current = None
    for phase in phases:
        if phase["t_ms"] <= t_ms:
            current = phase["name"]
    return current


def build_fixture(log_path: Path, version: str) -> dict:
    exchanges, phases = load_exchanges(log_path)
    for exchange in exchanges:
        exchange["phase"] = phase_of(exchange["t_start_ms"], phases)
    return {
        "open_webui_version": version,
        "captured": HOW_CAPTURED.format(version=version),
        "captured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "phases": phases,
        "requests": exchanges,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--version", required=True, help="Open WebUI version that was recorded")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fixture = build_fixture(args.log, args.version)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(fixture['requests'])} requests, {len(fixture['phases'])} phases -> {args.out}")


if __name__ == "__main__":
    main()
