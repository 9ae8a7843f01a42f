"""A recording reverse proxy: sits between Open WebUI and `rkllama serve`, forwards every
request unchanged and appends one JSON line per finished exchange to a log, so the e2e run
can store exactly what Open WebUI sent (and when) as a replay fixture.

Run with the e2e venv's Python (it has starlette, uvicorn and httpx):
    python recording_proxy.py --upstream http://127.0.0.1:8080 --port 11434 --log requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Headers worth keeping in the record: they change how the server answers.
RECORDED_HEADERS = ("content-type", "accept", "authorization", "user-agent")
# Hop-by-hop headers that must not be forwarded either way.
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}
# How much of a response body the log keeps (bodies are for diagnosis, requests are the fixture).
RESPONSE_KEEP = 4000
# POST <proxy>/__e2e_phase/<name> records a step boundary instead of being forwarded.
PHASE_PREFIX = "/__e2e_phase"
# GET <proxy>/__e2e_in_flight lists the exchanges not finished yet.
IN_FLIGHT_PATH = "/__e2e_in_flight"


def build_app(upstream: str, log_path: Path) -> Starlette:
    started = time.monotonic()
    counter = {"n": 0}
    in_flight: dict[int, str] = {}  # seq -> path, from arrival until the exchange ends

    def now_ms() -> float:
        return round((time.monotonic() - started) * 1000, 1)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=upstream, timeout=None) as client:
            app.state.client = client
            yield

    def write(entry: dict) -> None:
        if entry["event"] == "request":
            in_flight[entry["seq"]] = entry["path"]
        elif entry["event"] == "end":
            in_flight.pop(entry["seq"], None)
        with log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")

    async def list_in_flight(request: Request) -> JSONResponse:
        # Lets the driver wait until Open WebUI's side tasks have finished.
        return JSONResponse([{"seq": seq, "path": path} for seq, path in sorted(in_flight.items())])

    async def mark_phase(request: Request) -> Response:
        # The browser driver marks where each step starts, in the same timeline as the requests.
        write({"event": "phase", "name": request.path_params["name"], "t_ms": now_ms()})
        return Response(status_code=204)

    async def forward(request: Request) -> StreamingResponse:
        counter["n"] += 1
        seq = counter["n"]
        body = await request.body()
        try:
            parsed_body = json.loads(body) if body else None
        except ValueError:
            parsed_body = body.decode(errors="replace")
        # The request is logged on arrival: a request the client gives up on is part of the story.
        write(
            {
                "event": "request",
                "seq": seq,
                "t_ms": now_ms(),
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": {k: v for k, v in request.headers.items() if k.lower() in RECORDED_HEADERS},
                "body": parsed_body,
            }
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream_request = request.app.state.client.build_request(
            request.method, request.url.path, params=request.url.query or None, headers=headers, content=body
        )
        try:
            response = await request.app.state.client.send(upstream_request, stream=True)
        except BaseException as exc:  # the client went away (cancelled) or upstream failed
            write({"event": "end", "seq": seq, "t_ms": now_ms(), "status": None, "outcome": type(exc).__name__})
            raise
        first_byte = now_ms()
        head, tail = bytearray(), bytearray()  # a stream's last line carries the usage / done record
        total = {"bytes": 0}

        async def relay() -> AsyncIterator[bytes]:
            outcome = "client_disconnected"
            try:
                async for chunk in response.aiter_raw():
                    total["bytes"] += len(chunk)
                    room = max(0, RESPONSE_KEEP // 2 - len(head))
                    head.extend(chunk[:room])
                    tail.extend(chunk[room:])
                    del tail[: max(0, len(tail) - RESPONSE_KEEP // 2)]
                    yield chunk
                outcome = "complete"
            finally:
                try:
                    await response.aclose()
                finally:
                    write(
                        {
                            "event": "end",
                            "seq": seq,
                            "t_ms": now_ms(),
                            "t_first_byte_ms": first_byte,
                            "status": response.status_code,
                            "outcome": outcome,
                            "response_content_type": response.headers.get("content-type", ""),
                            "response_bytes": total["bytes"],
                            "response_excerpt": (
                                head + (b" ... " if total["bytes"] > len(head) + len(tail) else b"") + tail
                            ).decode(errors="replace"),
                        }
                    )

        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        out_headers.pop("content-encoding", None)
        return StreamingResponse(relay(), status_code=response.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
    routes = [
        Route(f"{PHASE_PREFIX}/{{name}}", mark_phase, methods=["POST"]),
        Route(IN_FLIGHT_PATH, list_in_flight, methods=["GET"]),
        Route("/{path:path}", forward, methods=methods),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL of rkllama serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines file to append exchanges to")
    args = parser.parse_args()
    uvicorn.run(build_app(args.upstream, args.log), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
