"""Learned models survive a restart: checkpoint to Redis on stop, restore at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import Settings
from stream.datasets import load_events
from stream.store import RecoReader, checkpoint_key

from .conftest import free_port, produce, wait_until

pytestmark = pytest.mark.integration


def test_live_quality_survives_restart(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=6000)
    first, second = events[:4000], events[4000:]
    w1 = worker_factory()
    produce(settings, first)
    wait_until(
        lambda: w1.metric_value("stream_events_total", outcome="processed") == len(first),
        120,
        what="phase 1 processed",
    )
    catalogue_before = w1.metric_value("stream_catalogue_tracks")
    wait_until(
        lambda: w1.metric_value("stream_quality_hr_at_10", variant="blend") > 0,
        10,
        what="live HR@10 exported",
    )
    hr_before = w1.metric_value("stream_quality_hr_at_10", variant="blend")
    assert w1.stop() == 0
    assert reader.client.exists(checkpoint_key(settings.app_id))

    w2 = worker_factory()
    assert w2.metric_value("stream_checkpoint_restored") == 1
    wait_until(
        lambda: w2.metric_value("stream_catalogue_tracks") >= catalogue_before,
        10,
        what="restored catalogue reported",
    )
    produce(settings, second)
    wait_until(
        lambda: w2.metric_value("stream_events_total", outcome="processed") == len(second),
        120,
        what="phase 2 processed",
    )
    wait_until(
        lambda: w2.metric_value("stream_quality_hr_at_10", variant="blend") > 0,
        10,
        what="live HR@10 after restart",
    )
    hr_after = w2.metric_value("stream_quality_hr_at_10", variant="blend")

    # control: the same phase-2 plays through a worker that starts from scratch
    fresh = settings.replace(
        app_id=settings.app_id + "-fresh",
        plays_topic=settings.plays_topic + "-fresh",
        dlq_topic=settings.dlq_topic + "-fresh",
        control_topic=settings.control_topic + "-fresh",
        checkpoint_interval_s=0,
        metrics_port=free_port(),
    )
    w3 = worker_factory(fresh)
    produce(fresh, second)
    wait_until(
        lambda: w3.metric_value("stream_events_total", outcome="processed") == len(second),
        120,
        what="control processed",
    )
    wait_until(
        lambda: w3.metric_value("stream_quality_hr_at_10", variant="blend") >= 0,
        10,
        what="control HR exported",
    )
    hr_fresh = w3.metric_value("stream_quality_hr_at_10", variant="blend")
    print(f"live HR@10 before restart {hr_before:.3f}, after {hr_after:.3f}, fresh {hr_fresh:.3f}")
    assert hr_after > hr_fresh
    assert hr_after >= 0.5 * hr_before
