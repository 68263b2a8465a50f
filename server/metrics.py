"""Prometheus metrics for the HTTP server, under vLLM's names, in a registry of its own per app.

The series vLLM has carry vLLM's names (`vllm:num_requests_running`,
`vllm:time_to_first_token_seconds`, ...) and its `model_name` label, so vLLM's Grafana
dashboard and alerts work unchanged; `process_*` series (resident memory, CPU seconds, open
file descriptors) come from prometheus-client's ProcessCollector. `_created` samples are
off. Latencies are measured where users feel them: from the HTTP request's arrival
(tokenization included) to each engine output, as vLLM does. Gauges are read from the
engine's stats at scrape time. vLLM series this engine cannot feed (queue, prefill and
inference time need the moment a request is scheduled, which the engine does not report)
are left out rather than faked. The engine's own counters (preemptions, prefix cache queries
and hits in tokens, as vLLM v1 counts them) are cumulative in its stats and added to the
Prometheus counters at scrape time. This module knows nothing about HTTP or pydantic;
server/api.py owns one `ServerMetrics`.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # a `_created` sample per series is clutter no dashboard reads

PREFIX = "vllm:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # vLLM's 1-2-5 steps
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    """All the server's metrics; `content_type` and `render()` serve GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, _cpu_seconds...
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
        # vLLM's newer and older names for the same observations; dashboards use either
        self.itl = (histogram("inter_token_latency_seconds",
                              "Time between consecutive generated tokens of one request.",
                              _ITL_BUCKETS),
                    histogram("time_per_output_token_seconds",
                              "The same as inter_token_latency_seconds (vLLM's older name).",
                              _ITL_BUCKETS))
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from the request's arrival to its last token.",
                             _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds",
                                "Time from a request's first token to its last.",
                                _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens per finished request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per finished request.",
                                                   _TOKEN_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = (gauge("kv_cache_usage_perc",
                               "Share of the KV cache blocks running requests hold (0 to 1)."),
                         gauge("gpu_cache_usage_perc",
                               "The same as kv_cache_usage_perc (vLLM's older name)."))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens submitted to the engine.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        # the engine's cumulative counts, copied at scrape time (`update_from`)
        self.engine_counters = {
            "num_preemptions": counter("num_preemptions",
                                       "Sequences preempted (KV blocks given back, "
                                       "recomputed later) because the KV cache was full."),
            "prefix_cache_queries": counter("prefix_cache_queries",
                                            "Prefix cache queries, in tokens looked up."),
            "prefix_cache_hits": counter("prefix_cache_hits",
                                         "Prefix cache hits, in tokens found cached."),
        }
        self.engine_seen = dict.fromkeys(self.engine_counters, 0)
        finished = Counter(PREFIX + "request_success",
                           "Engine requests finished, by finish reason.",
                           ["model_name", "finished_reason"], registry=registry)
        self.finished = {r: finished.labels(model_name=model_name, finished_reason=r)
                         for r in FINISH_REASONS}

    def update_from(self, stats) -> None:
        """Copy the engine's gauges and counters (an EngineStats) just before a scrape."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        for gauge in self.kv_usage:
            gauge.set(stats.kv_cache_usage)
        for name, counter in self.engine_counters.items():
            value = getattr(stats, name)
            if value > self.engine_seen[name]:
                counter.inc(value - self.engine_seen[name])
                self.engine_seen[name] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, arrival: float, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, arrival, num_prompt_tokens)


class RequestTimer:
    """The timings of one engine request: call `output()` per engine output, `finish()` once
    (or `discard()` for a request the engine refused, which then counts nowhere)."""

    __slots__ = ("metrics", "arrival", "first", "last", "done", "num_prompt_tokens",
                 "prompt_len")

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int):
        self.metrics = metrics
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens  # counted once the engine has taken them
        self.prompt_len = num_prompt_tokens
        self.first: float | None = None
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
            self.first = now
        else:  # an output with k tokens after a gap g counts as k gaps of g/k
            gap = (now - self.last) / num_new_tokens
            for histogram in self.metrics.itl:
                for _ in range(num_new_tokens):
                    histogram.observe(gap)
        self.last = now

    def discard(self) -> None:
        self.done = True

    def finish(self, reason: str | None, num_generated_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.e2e.observe(time.perf_counter() - self.arrival)
        if self.first is not None:
            m.decode.observe(self.last - self.first)
        m.request_prompt_tokens.observe(self.prompt_len)
        m.request_generation_tokens.observe(num_generated_tokens)
        self.metrics.generation_tokens.inc(num_generated_tokens)
        self.metrics.finished[reason if reason in FINISH_REASONS else "error"].inc()
