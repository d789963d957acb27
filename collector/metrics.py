"""Prometheus metrics, one registry per app (no process-global state).

The hot path never touches a metric: the writer counts whole batches, and the queue
depth and the pixel's plain counters are read when ``/metrics`` is scraped. With
``--workers N`` each worker process answers with its own registry; sum across scrapes or
run one worker per scrape target.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.hits_recorded = Counter(
            "collector_hits_recorded", "Consented hits stored", ["source"], registry=r
        )
        self.hits_without_consent = Counter(
            "collector_hits_without_consent",
            "Pixel requests counted anonymously only, by consent state",
            ["state"],
            registry=r,
        )
        self.hits_dropped = Counter(
            "collector_hits_dropped", "Hits that could not be stored", ["reason"], registry=r
        )
        self.queue_depth = Gauge(
            "collector_queue_depth", "Hits waiting for the batch writer", registry=r
        )
        self.batch_seconds = Histogram(
            "collector_batch_write_seconds",
            "Time to store one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.auth_failures = Counter(
            "collector_auth_failures", "Failed API authentications", registry=r
        )
        self.spool_hits = Gauge(
            "collector_spool_hits",
            "Hits held in the local spool while PostgreSQL is unreachable",
            registry=r,
        )
        self.storage_errors = Counter(
            "collector_storage_errors", "Failed batch writes (retried)", registry=r
        )

        self.fast_answers = Gauge(
            "collector_pixel_fast_path_answers",
            "Pixel requests answered in uvicorn's parser callback (server.fast_path) since "
            "start; the others took the ASGI path",
            registry=r,
        )

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
