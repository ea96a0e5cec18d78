"""Two workers in one consumer group: listeners are split by partition, nothing is lost or
double-counted, and each worker's item-side models learn from the other's plays through
the track-signals topic (stream/processing/replication.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families

from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent

from .conftest import WorkerProcess, free_port, produce, wait_until

pytestmark = pytest.mark.integration

T0 = 1_790_000_000_000


def owned_partitions(worker: WorkerProcess, topic: str) -> set[int]:
    out = set()
    for family in text_string_to_metric_families(worker.metrics()):
        for s in family.samples:
            if s.name == "stream_consumer_lag_messages" and s.labels.get("topic") == topic:
                out.add(int(s.labels["partition"]))
    return out


def users_by_partition(n_partitions: int, per_partition: int) -> dict[int, list[str]]:
    part = DefaultPartitioner()
    all_parts = list(range(n_partitions))
    out: dict[int, list[str]] = {p: [] for p in all_parts}
    i = 0
    while min(len(v) for v in out.values()) < per_partition:
        user = f"so-user-{i}"
        p = part(user.encode(), all_parts, all_parts)
        if len(out[p]) < per_partition:
            out[p].append(user)
        i += 1
    return out


def test_two_workers_split_listeners_and_share_track_knowledge(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    a = worker_factory()
    b = worker_factory(settings.replace(metrics_port=free_port()))
    users = users_by_partition(settings.partitions, per_partition=6)
    # one warm-up play per partition, so both workers report the partitions they own
    warm = [PlayEvent(us[0], "warm", T0, 200_000, f"warm-{p}") for p, us in users.items()]
    produce(settings, warm)

    def split() -> tuple[set[int], set[int]] | None:
        pa, pb = (
            owned_partitions(a, settings.plays_topic),
            owned_partitions(b, settings.plays_topic),
        )
        ok = pa and pb and not pa & pb and pa | pb == set(users)
        return (pa, pb) if ok else None

    pa, pb = wait_until(split, 90, what="both workers own disjoint partitions")

    # listeners owned by A play only "a-" tracks, those owned by B only "b-" tracks
    events: list[PlayEvent] = []
    for p, us in users.items():
        prefix = "a" if p in pa else "b"
        for j, user in enumerate(us):
            for k in range(8):
                track = f"{prefix}-{(j + k) % 12}"
                events.append(
                    PlayEvent(user, track, T0 + 1000 + len(events), 200_000, f"{user}-{k}")
                )
    events.sort(key=lambda e: e.ts_ms)
    produce(settings, events)
    expected = Counter(e.user_id for e in warm + events)

    def all_applied() -> bool:
        for user, n in expected.items():
            doc = reader.get(user)
            if doc is None or doc.seq != n:
                return False
        return True

    wait_until(all_applied, 120, what="every listener's plays applied exactly once")
    # nothing double-counted across the two workers
    processed = a.metric_value("stream_events_total", outcome="processed") + b.metric_value(
        "stream_events_total", outcome="processed"
    )
    assert processed == len(warm) + len(events)

    # each side learned the other side's tracks only through shared signals
    def learned_across() -> bool:
        for p, us in users.items():
            other = "b-" if p in pa else "a-"
            for user in us:
                doc = reader.get(user)
                if doc is None or not any(i.track_id.startswith(other) for i in doc.items):
                    return False
        return True

    # a listener's list refreshes on their plays; send one more round so lists are re-ranked
    # after the signals have been applied
    wait_until(
        lambda: (
            a.metric_value("stream_track_signals_total", direction="applied") > 0
            and b.metric_value("stream_track_signals_total", direction="applied") > 0
        ),
        60,
        what="signals applied on both workers",
    )
    more = [
        PlayEvent(user, f"{'a' if p in pa else 'b'}-0", T0 + 10**6 + i, 200_000, f"{user}-more")
        for i, (p, us) in enumerate((p, u) for p, ul in users.items() for u in ul)
        for user in [us]
    ]
    produce(settings, more)
    wait_until(learned_across, 60, what="lists on each worker include the other's tracks")
