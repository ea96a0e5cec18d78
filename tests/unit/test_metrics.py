"""The single-writer metric families expose exactly what prometheus_client's types do."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stream.adapters.metrics import (
    FRESHNESS_BUCKETS,
    LATENCY_BUCKETS,
    FastCounter,
    FastGauge,
    FastHistogram,
    Metrics,
)


def _pair() -> tuple[CollectorRegistry, CollectorRegistry, list[tuple[object, object]]]:
    ref, fast = CollectorRegistry(), CollectorRegistry()
    pairs: list[tuple[object, object]] = [
        (
            Histogram("stage_seconds", "per stage", ["stage"], namespace="stream",
                      buckets=LATENCY_BUCKETS, registry=ref),
            FastHistogram("stage_seconds", "per stage", ["stage"], namespace="stream",
                          buckets=LATENCY_BUCKETS, registry=fast),
        ),
        (
            Histogram("freshness_seconds", "fresh", namespace="stream",
                      buckets=FRESHNESS_BUCKETS, registry=ref),
            FastHistogram("freshness_seconds", "fresh", namespace="stream",
                          buckets=FRESHNESS_BUCKETS, registry=fast),
        ),
        (
            Counter("events", "events", ["topic", "outcome"], namespace="stream", registry=ref),
            FastCounter("events", "events", ["topic", "outcome"], namespace="stream",
                        registry=fast),
        ),
        (
            Gauge("last_event_timestamp_seconds", "ts", namespace="stream", registry=ref),
            FastGauge("last_event_timestamp_seconds", "ts", namespace="stream", registry=fast),
        ),
    ]
    return ref, fast, pairs


def test_exposition_is_byte_identical_to_prometheus_client() -> None:
    ref, fast, pairs = _pair()
    (h_ref, h_fast), (f_ref, f_fast), (c_ref, c_fast), (g_ref, g_fast) = pairs
    rng = random.Random(3)
    # bucket edges exactly, below the first, above the last, and random values
    values = [*LATENCY_BUCKETS, 0.0, 1e-9, 10.0, 1e6] + [rng.random() / 50 for _ in range(500)]
    for i, v in enumerate(values):
        stage = ("decode", "learn", "rank")[i % 3]
        h_ref.labels(stage).observe(v)  # type: ignore[attr-defined]
        h_fast.labels(stage).observe(v)  # type: ignore[attr-defined]
        f_ref.observe(v * 1000)  # type: ignore[attr-defined]
        f_fast.observe(v * 1000)  # type: ignore[attr-defined]
    c_ref.labels("plays", "processed").inc(7)  # type: ignore[attr-defined]
    c_fast.labels("plays", "processed").inc(7)  # type: ignore[attr-defined]
    c_ref.labels("plays", "rejected")  # type: ignore[attr-defined]
    c_fast.labels("plays", "rejected")  # type: ignore[attr-defined]
    g_ref.set(1_700_000_000.5)  # type: ignore[attr-defined]
    g_fast.set(1_700_000_000.5)  # type: ignore[attr-defined]
    assert generate_latest(fast).decode() == generate_latest(ref).decode()
    assert fast.get_sample_value("stream_stage_seconds_count", {"stage": "learn"}) == sum(
        1 for i in range(len(values)) if i % 3 == 1
    )
    assert fast.get_sample_value(
        "stream_stage_seconds_bucket", {"stage": "decode", "le": "+Inf"}
    ) == fast.get_sample_value("stream_stage_seconds_count", {"stage": "decode"})


def test_observe_many_is_n_observations() -> None:
    """A batch's per-play share is observed once with a count: the same exposition as n
    single observations (dyadic values, so the sums are exact both ways)."""
    one_reg, many_reg = CollectorRegistry(), CollectorRegistry()
    one = FastHistogram("stage_seconds", "s", ["stage"], namespace="stream",
                        buckets=LATENCY_BUCKETS, registry=one_reg)
    many = FastHistogram("stage_seconds", "s", ["stage"], namespace="stream",
                         buckets=LATENCY_BUCKETS, registry=many_reg)
    plain_one = FastHistogram("processing_seconds", "s", namespace="stream",
                              buckets=LATENCY_BUCKETS, registry=one_reg)
    plain_many = FastHistogram("processing_seconds", "s", namespace="stream",
                               buckets=LATENCY_BUCKETS, registry=many_reg)
    for value, n in ((2.0**-12, 64), (2.0**-7, 3), (0.5, 1), (2.0**-20, 0)):
        for _ in range(n):
            one.labels("rank").observe(value)  # type: ignore[attr-defined]
            plain_one.observe(value)
        many.labels("rank").observe_many(value, n)  # type: ignore[attr-defined]
        plain_many.observe_many(value, n)
    assert generate_latest(many_reg) == generate_latest(one_reg)
    assert many_reg.get_sample_value("stream_stage_seconds_count", {"stage": "rank"}) == 68


def test_misuse_is_refused_like_prometheus_client() -> None:
    reg = CollectorRegistry()
    c = FastCounter("things", "things", ["kind"], namespace="stream", registry=reg)
    with pytest.raises(ValueError, match="labels"):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("a", "b")
    with pytest.raises(ValueError, match="non-negative"):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError):  # a second family with the same name
        FastCounter("things", "again", ["kind"], namespace="stream", registry=reg)
    with pytest.raises(ValueError, match="increasing"):
        FastHistogram("h", "h", buckets=(0.5, 0.1), registry=reg)


def test_worker_metrics_expose_the_hot_series() -> None:
    m = Metrics(CollectorRegistry())
    m.init_topic("plays", ("processed", "rejected", "duplicate"))
    m.events.labels("plays", "processed").inc()
    m.stage.labels("learn").observe(0.0002)
    m.processing.observe(0.0003)
    m.freshness.observe(0.004)
    m.last_event_ts.set(12.0)
    get = m.registry.get_sample_value
    assert get("stream_events_total", {"topic": "plays", "outcome": "processed"}) == 1
    assert get("stream_events_total", {"topic": "plays", "outcome": "duplicate"}) == 0
    assert get("stream_stage_seconds_bucket", {"stage": "learn", "le": "0.00025"}) == 1
    assert get("stream_stage_seconds_bucket", {"stage": "learn", "le": "0.0001"}) == 0
    assert get("stream_processing_seconds_sum") == pytest.approx(0.0003)
    assert get("stream_freshness_seconds_count") == 1
    assert get("stream_last_event_timestamp_seconds") == 12.0
