"""Prometheus metrics for the HTTP server, in a registry of its own per app.

Latencies are measured where users feel them: from the HTTP request's arrival (tokenization
included) to each engine output, as vLLM does. Names follow vLLM's with our own prefix
(`fanformer_time_to_first_token_seconds`, `fanformer_num_requests_running`, ...), so the same
dashboards work with a changed prefix. Gauges are read from the engine's stats at scrape time.
This module knows nothing about HTTP or pydantic; server/api.py owns one `ServerMetrics`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "fanformer_"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    """All the server's metrics; `content_type` and `render()` serve GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        label = {"model_name": model_name}

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=registry).labels(**label)

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, ["model_name"], registry=registry).labels(**label)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, ["model_name"], registry=registry).labels(**label)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from the request's arrival to its first token.",
                              _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from the request's arrival to its last token.",
                             _LATENCY_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Share of the KV cache in use (0 to 1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens submitted to the engine.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        finished = Counter(PREFIX + "request_success",
                           "Engine requests finished, by finish reason.",
                           ["model_name", "finished_reason"], registry=registry)
        self.finished = {r: finished.labels(model_name=model_name, finished_reason=r)
                         for r in FINISH_REASONS}

    def update_from(self, stats) -> None:
        """Copy the engine's gauges (an EngineStats) just before a scrape."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, arrival: float, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, arrival, num_prompt_tokens)


class RequestTimer:
    """The timings of one engine request: call `output()` per engine output, `finish()` once
    (or `discard()` for a request the engine refused, which then counts nowhere)."""

    __slots__ = ("metrics", "arrival", "last", "done", "num_prompt_tokens")

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int):
        self.metrics = metrics
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens  # counted once the engine has taken them
        self.last: float | None = None
        self.done = False

    def output(self, num_new_tokens: int) -> None:
        if self.num_prompt_tokens:
            self.metrics.prompt_tokens.inc(self.num_prompt_tokens)
            self.num_prompt_tokens = 0
        if not num_new_tokens:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:  # an output with k tokens after a gap g counts as k gaps of g/k
            gap = (now - self.last) / num_new_tokens
            for _ in range(num_new_tokens):
                self.metrics.itl.observe(gap)
        self.last = now

    def discard(self) -> None:
        self.done = True

    def finish(self, reason: str | None, num_generated_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.generation_tokens.inc(num_generated_tokens)
        self.metrics.finished[reason if reason in FINISH_REASONS else "error"].inc()
