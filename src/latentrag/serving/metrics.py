"""Prometheus metrics of one service (its own registry, so two services in one process do not mix)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("latentrag_requests", "HTTP requests answered", ["endpoint", "code"],
                                registry=self.registry)
        self.errors = Counter("latentrag_errors", "HTTP requests answered with a 4xx or 5xx", ["endpoint", "code"],
                              registry=self.registry)
        self.latency = Histogram("latentrag_request_latency_seconds", "time to the response's headers",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("latentrag_batch_size", "requests per micro-batch", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.swaps = Counter("latentrag_index_swaps", "index hot swaps", registry=self.registry)
        self.queue_depth = Gauge("latentrag_queue_depth", "requests waiting for the worker", registry=self.registry)
        self.in_flight = Gauge("latentrag_in_flight", "requests in the batch running now", registry=self.registry)
        self.pending_cost = Gauge("latentrag_pending_cost", "summed cost of the requests waiting and running",
                                  registry=self.registry)
        self.rejections = Counter("latentrag_rejected", "requests refused by admission control",
                                  ["reason"], registry=self.registry)
        self.cancellations = Counter("latentrag_cancelled", "admitted requests dropped before their answer",
                                     ["reason"], registry=self.registry)
        for reason in ("cost", "queue_full", "saturated", "shutting_down"):
            self.rejections.labels(reason)
        for reason in ("client_left", "deadline", "shutdown"):
            self.cancellations.labels(reason)

    def watch(self, batcher) -> None:
        """Read queue depth, requests in flight and pending cost from the batcher at every scrape."""
        self.queue_depth.set_function(lambda: batcher.depth)
        self.in_flight.set_function(lambda: batcher.in_flight)
        self.pending_cost.set_function(lambda: batcher.pending_cost)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def cancelled(self, reason: str) -> None:
        self.cancellations.labels(reason).inc()

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, kind: str, size: int) -> None:
        self.batch_size.labels(kind).observe(size)

    def swapped(self) -> None:
        self.swaps.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
