"""Run the app under uvicorn, stopping in order on SIGTERM/SIGINT.

uvicorn's graceful shutdown stops accepting connections, waits (up to a timeout) for the
responses in flight, then runs the app's lifespan shutdown, which stops the runners. A
stream of tokens would run past that timeout and be cut without a last chunk, so before
waiting we end every generation with a clear "shutting down" error: each stream writes it
as its dialect's final chunk, the connections close, and only then are the runners stopped.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from .settings import Settings

# Seconds uvicorn waits for responses to finish once the generations were ended.
GRACEFUL_SHUTDOWN_SECONDS = 5


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._app.state.rkllama.scheduler.begin_shutdown()
        await super().shutdown(sockets)


def serve_app(app: FastAPI, settings: Settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    _Server(config, app).run()
