"""Prometheus metrics (GET /metrics): what the server did, and what it holds now.

Each app has its own registry (no module globals), so tests can run many apps in one process.
Counters and histograms move as requests run; the gauges of loaded models, their memory and
their queues are read from the scheduler at scrape time, so they are never stale.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .types import Usage

# Seconds; from a warm small model's first token on a fast CPU to a large prompt on a board.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds between two tokens of one answer: 200 tokens/s down to a token every few seconds.
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class LoadedModelFacts:
    """What the scrape reports of one loaded model."""

    name: str
    engine: str
    pid: int | None
    memory_estimate: int
    running: int
    waiting: int


def process_rss(pid: int | None) -> int | None:
    """Resident memory of a process in bytes, from /proc (None when it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class _ModelsCollector(Collector):
    def __init__(self, facts: Callable[[], Iterable[LoadedModelFacts]]) -> None:
        self._facts = facts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("rkllama_loaded_models", "Models loaded now.")
        rss = GaugeMetricFamily("rkllama_model_rss_bytes", "Resident memory of each model's runner.", labels=["model"])
        estimate = GaugeMetricFamily(
            "rkllama_model_memory_estimate_bytes",
            "Memory each loaded model was estimated to need (counted against --memory-budget).",
            labels=["model"],
        )
        running = GaugeMetricFamily("rkllama_requests_running", "Requests being answered.", labels=["model"])
        waiting = GaugeMetricFamily(
            "rkllama_queue_depth", "Requests waiting for a free sequence of their model.", labels=["model"]
        )
        facts = list(self._facts())
        loaded.add_metric([], len(facts))
        for model in facts:
            estimate.add_metric([model.name], model.memory_estimate)
            running.add_metric([model.name], model.running)
            waiting.add_metric([model.name], model.waiting)
            if (size := process_rss(model.pid)) is not None:
                rss.add_metric([model.name], size)
        return [loaded, rss, estimate, running, waiting]


@dataclass
class AnswerTiming:
    """Times one answer: its first token, then the gaps between tokens."""

    metrics: Metrics
    model: str
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None

    def token(self, count: int = 1) -> None:
        """A message of `count` tokens arrived. Tokens that travelled together share the gap
        since the previous message (the runner batches tokens that come close together)."""
        now = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.labels(model=self.model).observe(now - self.started)
        else:
            gap = (now - self.last) / max(1, count)
            for _ in range(max(1, count)):
                self.metrics.inter_token_latency.labels(model=self.model).observe(gap)
        self.last = now

    def done(self, usage: Usage) -> None:
        self.metrics.prompt_tokens.labels(model=self.model).inc(usage.evaluated_tokens)
        self.metrics.generated_tokens.labels(model=self.model).inc(usage.completion_tokens)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "rkllama_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "rkllama_prompt_tokens",
            "Prompt tokens evaluated (a reused cached prefix not counted).",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter("rkllama_generated_tokens", "Tokens generated.", ["model"], registry=registry)
        self.time_to_first_token = Histogram(
            "rkllama_time_to_first_token_seconds",
            "From the start of generation to the first token (queue wait included).",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "rkllama_inter_token_latency_seconds",
            "Time between two tokens of one answer, as the server received them.",
            ["model"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.load_seconds = Histogram(
            "rkllama_model_load_seconds", "Time to load a model.", ["model"], buckets=LOAD_BUCKETS, registry=registry
        )
        self.runner_exits = Counter(
            "rkllama_runner_restarts",
            "Runners that exited without being asked (crash, kill, watchdog); the next request loads the model again.",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "rkllama_requests_rejected_queue_full",
            "Requests refused with 503 because the queue was full.",
            registry=registry,
        )

    def watch_models(self, facts: Callable[[], Iterable[LoadedModelFacts]]) -> None:
        self.registry.register(_ModelsCollector(facts))

    def timing(self, model: str) -> AnswerTiming:
        return AnswerTiming(self, model)
