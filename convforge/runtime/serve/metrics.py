"""The server's Prometheus metrics, in a registry of its own (served at ``GET /metrics``).

===============================================  ==========================================
metric                                           what
===============================================  ==========================================
convforge_requests_total{model,protocol,status}  requests answered (HTTP status or gRPC code)
convforge_request_seconds{model,protocol}        request latency, receipt to answer
convforge_queue_seconds{model}                   time a request waited for its batch
convforge_compute_seconds{model}                 one backend call (a whole batch)
convforge_batch_rows{model}                      rows per backend call
convforge_queue_depth{model}                     requests waiting now
===============================================  ==========================================

kserve registers histograms of its own in prometheus_client's default
registry; a separate registry keeps the two apart.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a fraction of a millisecond (a tiny model on a GPU) to ten seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["CONTENT_TYPE", "ServerMetrics"]


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "convforge_requests", "Requests answered", ["model", "protocol", "status"], registry=r
        )
        self.latency = Histogram(
            "convforge_request_seconds", "Request latency, receipt to answer",
            ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "convforge_queue_seconds", "Time a request waited for its batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "convforge_compute_seconds", "One backend call (a whole batch)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rows = Histogram(
            "convforge_batch_rows", "Rows per backend call", ["model"], buckets=ROW_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.depth = Gauge("convforge_queue_depth", "Requests waiting", ["model"], registry=r)

    def observer(self, model: str) -> Callable[[str, float], None]:
        """The batcher's ``observe`` hook for ``model``."""
        series = {
            "queue_s": self.queue.labels(model),
            "compute_s": self.compute.labels(model),
            "batch_rows": self.rows.labels(model),
        }
        return lambda event, value: series[event].observe(value)

    def track_depth(self, model: str, depth: Callable[[], int]) -> None:
        """Read ``model``'s queue depth whenever the metrics are scraped."""
        self.depth.labels(model).set_function(depth)

    def answered(self, model: str, protocol: str, status: str, seconds: float) -> None:
        self.requests.labels(model, protocol, status).inc()
        self.latency.labels(model, protocol).observe(seconds)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
