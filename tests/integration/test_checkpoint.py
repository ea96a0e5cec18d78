"""Learned models survive a restart: checkpoint to Redis on stop, restore at start."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.config import Settings
from stream.datasets import load_events
from stream.store import RecoReader, checkpoint_key
from tests.procfs import child_states

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


def test_periodic_checkpoint_is_built_off_the_loop_and_survives_a_kill(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """The periodic checkpoints are built in a forked child (stream.forksnap): they land
    in Redis, the worker's event loop is held only for the fork, no child is left behind,
    and a worker killed without a clean stop (no final checkpoint) restores the last one."""
    settings = settings.replace(checkpoint_interval_s=1.0)
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=3000)
    w1 = worker_factory(settings)
    produce(settings, events)
    wait_until(
        lambda: w1.metric_value("stream_events_total", outcome="processed") == len(events),
        120,
        what="plays processed",
    )
    wait_until(lambda: w1.metric_value("stream_catalogue_tracks") > 0, 10, what="catalogue")
    time.sleep(2.5)  # the gauge is reported every 2 s: now it counts every play's track
    catalogue = w1.metric_value("stream_catalogue_tracks")
    # a checkpoint that started after the last play: it holds the whole catalogue
    written = w1.metric_value("stream_checkpoints_total", result="written")
    wait_until(
        lambda: w1.metric_value("stream_checkpoints_total", result="written") >= written + 2,
        30,
        what="two more periodic checkpoints written",
    )
    assert w1.metric_value("stream_checkpoints_total", result="error") == 0
    pauses = w1.metric_value("stream_checkpoint_pause_seconds_count")
    pause_total = w1.metric_value("stream_checkpoint_pause_seconds_sum")
    assert pauses >= 2
    assert pause_total / pauses < 0.25, "the event loop was held for the snapshot itself"
    assert w1.proc is not None
    assert "Z" not in child_states(w1.proc.pid).values(), "a snapshot child was left unreaped"
    assert reader.client.exists(checkpoint_key(settings.app_id))

    w1.kill()  # SIGKILL: no final checkpoint, only the periodic ones
    w2 = worker_factory(settings)
    assert w2.metric_value("stream_checkpoint_restored") == 1
    wait_until(
        lambda: w2.metric_value("stream_catalogue_tracks") >= catalogue,
        10,
        what="the periodic checkpoint's catalogue restored",
    )
