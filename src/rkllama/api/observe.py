"""What supervisors and dashboards read: GET /metrics (Prometheus text) and GET /health.

Both do no model work. /metrics needs the API key when one is set (guards.py); /health stays
open, as load balancers probe it without credentials, and says only whether the server serves.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import LoadedModelFacts, Metrics
from ..scheduler import Scheduler
from .common import app_state

router = APIRouter()


class Health(BaseModel):
    status: str = Field(description='"ok" while the server serves.')
    models: list[str] = Field(description="The models loaded now.")
    queue_depth: int = Field(description="Requests waiting for a model, server-wide.")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    registry = app_state(request).scheduler.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", summary="Health check for supervisors and load balancers", response_model=Health)
async def health(request: Request) -> Health:
    scheduler = app_state(request).scheduler
    return Health(status="ok", models=[model.name for model in scheduler.loaded()], queue_depth=scheduler.queue_depth())


def loaded_model_facts(scheduler: Scheduler) -> list[LoadedModelFacts]:
    facts = []
    for model in scheduler.loaded():
        facts.append(
            LoadedModelFacts(
                name=model.name,
                engine=model.info.engine,
                pid=model.runner.pid,
                memory_estimate=model.memory.total,
                running=min(model.runner.pending, model.info.parallel),
                waiting=scheduler.queue_depth(model.name),
            )
        )
    return facts


class RequestCounter:
    """Counts every answered request by its route's path template (bounded label values:
    an unknown path counts as "unmatched") and status, guards' refusals included."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=label, status=str(status)).inc()


def install_observability(app: FastAPI, scheduler: Scheduler) -> None:
    scheduler.metrics.watch_models(lambda: loaded_model_facts(scheduler))
    app.include_router(router)
    app.add_middleware(RequestCounter, metrics=scheduler.metrics)
