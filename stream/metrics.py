"""Prometheus metric definitions -- the only module that imports prometheus_client.

Conventions: base units (seconds, bytes), ``_total`` on counters, and no per-user or
per-track labels (label sets stay bounded: topic, reason, stage, variant, outcome).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

#: Resolve from ~50 us to several seconds (processing stages, Redis writes).
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
#: Freshness: a few ms when live, up to minutes while catching up after an outage.
FRESHNESS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)

NAMESPACE: Final = "stream"


class Metrics:
    """All worker metrics, registered on one registry (a fresh one per test if wanted)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        ns = NAMESPACE
        self.registry = registry
        self.events = Counter(
            "events", "Play events consumed, by outcome (processed, rejected, duplicate).",
            ["topic", "outcome"], namespace=ns, registry=registry,
        )
        self.rejected = Counter(
            "events_rejected", "Events rejected by validation, by reason.",
            ["topic", "reason"], namespace=ns, registry=registry,
        )
        self.dlq_writes = Counter(
            "dlq_writes", "Messages written to the dead-letter topic.",
            ["topic"], namespace=ns, registry=registry,
        )
        self.processing = Histogram(
            "processing_seconds", "Per-event processing time in the worker, decode to enqueue.",
            namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.stage = Histogram(
            "stage_seconds", "Per-event time spent in each pipeline stage.",
            ["stage"], namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.freshness = Histogram(
            "freshness_seconds",
            "Event time (the play's ts) to recommendations visible in Redis.",
            namespace=ns, buckets=FRESHNESS_BUCKETS, registry=registry,
        )
        self.ingest_freshness = Histogram(
            "ingest_freshness_seconds",
            "Kafka record timestamp (produce time) to recommendations visible in Redis.",
            namespace=ns, buckets=FRESHNESS_BUCKETS, registry=registry,
        )
        self.redis_errors = Counter(
            "redis_errors", "Failed Redis operations (each failed flush attempt).",
            ["operation"], namespace=ns, registry=registry,
        )
        self.redis_retries = Counter(
            "redis_retries", "Redis flush retries after an error.",
            namespace=ns, registry=registry,
        )
        self.redis_writes = Counter(
            "redis_writes", "Recommendation documents written to Redis, by result.",
            ["result"], namespace=ns, registry=registry,
        )
        self.redis_pending = Gauge(
            "redis_pending_writes", "Recommendation documents waiting to be flushed to Redis.",
            namespace=ns, registry=registry,
        )
        self.redis_flush = Histogram(
            "redis_flush_seconds", "Duration of one pipelined Redis flush.",
            namespace=ns, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.active_users = Gauge(
            "session_table_users", "Listeners with state in this worker's session table.",
            namespace=ns, registry=registry,
        )
        self.catalogue = Gauge(
            "catalogue_tracks", "Tracks known to the recommender models.",
            namespace=ns, registry=registry,
        )
        self.lag = Gauge(
            "consumer_lag_messages", "End offset minus next offset to process, per partition.",
            ["topic", "partition"], namespace=ns, registry=registry,
        )
        self.assigned = Gauge(
            "assigned_partitions", "Partitions of the plays topic assigned to this worker.",
            ["topic"], namespace=ns, registry=registry,
        )
        self.rebalances = Counter(
            "rebalances", "Consumer group rebalances seen by this worker.",
            namespace=ns, registry=registry,
        )
        self.last_event_ts = Gauge(
            "last_event_timestamp_seconds", "Event time of the newest processed play.",
            namespace=ns, registry=registry,
        )
        self.build = Info("build", "Version information.", namespace=ns, registry=registry)


def serve(metrics: Metrics, host: str, port: int) -> None:
    """Serve /metrics over HTTP in a background thread."""
    start_http_server(port, addr=host, registry=metrics.registry)
