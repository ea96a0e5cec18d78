"""Learned models survive a restart: checkpoint to Redis on stop, restore at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.adapters.redis_store import RecoReader, checkpoint_key
from stream.config import Settings
from stream.core.events import PlayEvent
from stream.tools.datasets import load_events
from tests.procfs import child_states, children

from .conftest import WorkerProcess, free_port, produce, wait_until

pytestmark = pytest.mark.integration

#: plays/s of the evaluated phase (see test_live_quality_survives_restart): ~40 s a worker
PHASE2_RATE = 100.0


def distinct_tracks(events: list[PlayEvent]) -> int:
    return len({e.track_id for e in events})


def settled_quality(worker: WorkerProcess, what: str, timeout: float = 60) -> float:
    """The worker's exported live HR@10 (variant ``blend``) once it rests on an evaluated
    window and two successive reports agree (the gauges are set every 2 s, after the plays
    were applied): an absent gauge is never read as 0."""
    last: list[tuple[float, float] | None] = [None]

    def settled() -> tuple[float, float] | None:
        hr = worker.metric_sample("stream_quality_hr_at_10", variant="blend")
        n = worker.metric_sample("stream_quality_window_events", variant="blend")
        now = None if hr is None or n is None or n <= 0 else (hr, n)
        previous, last[0] = last[0], now
        return now if now is not None and now == previous else None

    hr, n = wait_until(settled, timeout, interval=2.5, what=f"{what} exported and settled")
    print(f"{what}: HR@10 {hr:.3f} over {n:.0f} evaluated plays")
    return hr


def split_by_listener(
    events: list[PlayEvent], share: float
) -> tuple[list[PlayEvent], list[PlayEvent]]:
    """Each listener's first ``share`` of plays (in order) in phase 1, the rest in phase 2.

    Phase 2 continues the listeners of phase 1, so what the restored models learned about
    them (their factors, sessions, played tracks) is what the fresh control lacks. Split by
    time instead, most phase-2 listeners were new to both workers: the restored worker then
    led the control by only ~1-2 standard errors (the evaluated plays are a timing-dependent
    subset, as each play is scored against the list published before it), and on a loaded
    box the control came out ahead (0.051 vs 0.044 restored)."""
    by_user: dict[str, list[PlayEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    cut = {u: int(len(plays) * share) for u, plays in by_user.items()}
    seen: dict[str, int] = {}
    first, second = [], []
    for e in events:
        k = seen.get(e.user_id, 0)
        seen[e.user_id] = k + 1
        (first if k < cut[e.user_id] else second).append(e)
    return first, second


# three worker starts and 2 x ~40 s of paced plays: 168 s in a loaded suite run (load
# average ~20 on the 2 shared cores), too close to the 300 s default
@pytest.mark.timeout(600)
def test_live_quality_survives_restart(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=10000)
    first, second = split_by_listener(events, 0.6)
    # A play is evaluated against the list published before it. Produced in bulk, a
    # backlog is ranked at most every catch_up_rank_ms per listener, and only ~600 of the
    # 4,000 phase-2 plays (a timing-dependent subset) were evaluated: restored and fresh
    # then came out ~1 standard error apart. Ranking at every flush and keeping every
    # evaluated play in the window helped (~2,400 evaluated), but which plays met a fresh
    # list still depended on how the backlog was batched: on a loaded box the control
    # came out ahead. Phase 2 is therefore produced at a steady rate both times (live
    # traffic: each play is applied and its listener re-ranked before their next one), so
    # both workers are scored on the same plays, against lists of the same freshness.
    settings = settings.replace(quality_window=len(events), catch_up_rank_ms=0)
    w1 = worker_factory(settings)
    produce(settings, first)
    wait_until(
        lambda: w1.metric_value("stream_events_total", outcome="processed") == len(first),
        120,
        what="phase 1 processed",
    )
    catalogue_before = wait_until(
        lambda: w1.metric_value("stream_catalogue_tracks") == distinct_tracks(first) or None,
        30,
        what="the catalogue gauge counting every phase-1 track",
    )
    hr_before = settled_quality(w1, "live HR@10")
    assert w1.stop() == 0
    assert reader.client.exists(checkpoint_key(settings.app_id))

    w2 = worker_factory(settings)
    assert w2.metric_value("stream_checkpoint_restored") == 1
    wait_until(
        lambda: w2.metric_value("stream_catalogue_tracks") >= catalogue_before,
        60,
        what="restored catalogue reported",
    )
    assert produce(settings, second, rate=PHASE2_RATE) == len(second)
    wait_until(
        lambda: w2.metric_value("stream_events_total", outcome="processed") == len(second),
        120,
        what="phase 2 processed",
    )
    hr_after = settled_quality(w2, "live HR@10 after restart")

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
    assert produce(fresh, second, rate=PHASE2_RATE) == len(second)
    wait_until(
        lambda: w3.metric_value("stream_events_total", outcome="processed") == len(second),
        120,
        what="control processed",
    )
    hr_fresh = settled_quality(w3, "control HR@10")
    print(f"live HR@10 before restart {hr_before:.3f}, after {hr_after:.3f}, fresh {hr_fresh:.3f}")
    assert hr_after > hr_fresh
    assert hr_after >= 0.5 * hr_before


def test_periodic_checkpoint_is_built_off_the_loop_and_survives_a_kill(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """The periodic checkpoints are built in a forked child (stream.worker.snapshot): they land
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
    # the gauge is reported every 2 s: wait until it counts every play's track
    catalogue = wait_until(
        lambda: w1.metric_value("stream_catalogue_tracks") == distinct_tracks(events) or None,
        30,
        what="the catalogue gauge counting every track played",
    )
    # a checkpoint that started after the last play: it holds the whole catalogue
    written = w1.metric_value("stream_checkpoints_total", result="written")
    wait_until(
        lambda: w1.metric_value("stream_checkpoints_total", result="written") >= written + 2,
        30,
        what="two more periodic checkpoints written",
    )
    # every checkpoint so far was written: no other result (an error, under whatever
    # label) has counted one
    results = {labels["result"]: v for labels, v in w1.samples("stream_checkpoints_total")}
    assert {r for r, v in results.items() if v > 0} == {"written"}, results
    # the loop paid for the fork only: a small share of the time the checkpoints took
    # (snapshot in the child, then the upload), measured in this run on this machine
    pauses = w1.metric_value("stream_checkpoint_pause_seconds_count")
    pause_total = w1.metric_value("stream_checkpoint_pause_seconds_sum")
    built = w1.metric_value("stream_checkpoint_seconds_count")
    build_total = w1.metric_value("stream_checkpoint_seconds_sum")
    assert pauses >= 2 and built >= 2
    print(f"checkpoint: loop pause {pause_total / pauses * 1000:.1f} ms on average, "
          f"whole checkpoint {build_total / built * 1000:.1f} ms")
    # built in a forked child: one shows up under the worker at some checkpoint, and is
    # reaped afterwards (polled every 2 ms: a checkpoint each second, each child living for
    # the snapshot's build, which a loaded machine only makes longer)
    assert w1.proc is not None
    worker_pid = w1.proc.pid
    child = wait_until(
        lambda: children(worker_pid), 30, interval=0.002, what="a checkpoint's forked child"
    )
    wait_until(
        lambda: not child & children(worker_pid), 30, what=f"the snapshot child {child} reaped"
    )
    assert "Z" not in child_states(w1.proc.pid).values(), "a snapshot child was left unreaped"
    assert reader.client.exists(checkpoint_key(settings.app_id))

    w1.kill()  # SIGKILL: no final checkpoint, only the periodic ones
    w2 = worker_factory(settings)
    assert w2.metric_value("stream_checkpoint_restored") == 1
    wait_until(
        lambda: w2.metric_value("stream_catalogue_tracks") >= catalogue,
        60,
        what="the periodic checkpoint's catalogue restored",
    )
