"""End to end on the real stack: Kafka -> `stream worker` -> Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from stream.adapters.kafka import read_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent, parse_event
from stream.tools.datasets import load_events

from .conftest import (
    collect_notifications,
    drain_notifications,
    produce,
    subscribe_confirmed,
    wait_until,
)

pytestmark = pytest.mark.integration


def counts_by_user(events: list[PlayEvent]) -> dict[str, int]:
    return dict(Counter(e.user_id for e in events))


def wait_for_counts(reader: RecoReader, expected: dict[str, int], timeout: float = 120) -> None:
    """Until every user's Redis document reflects exactly ``expected[user]`` applied events."""

    def done() -> bool:
        for user, n in expected.items():
            doc = reader.get(user)
            if doc is None or doc.seq != n:
                return False
        return True

    def state() -> dict[str, int | None]:
        return {u: (d.seq if (d := reader.get(u)) else None) for u in expected}

    wait_until(done, timeout, what=f"seq per user == {expected}")
    assert state() == expected


def test_lastfm_plays_produce_fresh_recommendations(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")
    worker = worker_factory()
    assert produce(settings, events) == len(events)
    expected = counts_by_user(events)
    wait_for_counts(reader, expected)

    latest: dict[str, PlayEvent] = {}
    history: dict[str, list[str]] = defaultdict(list)
    played_until: dict[str, set[str]] = {}  # every track played up to the user's last play
    seen_tracks: set[str] = set()
    for e in events:
        latest[e.user_id] = e
        history[e.user_id].append(e.track_id)
        seen_tracks.add(e.track_id)
        played_until[e.user_id] = set(seen_tracks)
    for user, n in expected.items():
        doc = reader.get(user)
        assert doc is not None
        assert doc.event_id == latest[user].event_id
        assert doc.event_ts_ms == latest[user].ts_ms
        assert doc.session["plays_total"] == n
        # the list is ranked after this user's last play is learned (when the worker
        # flushes): the catalogue then holds at least every track played up to that play
        # and at most every track in the log
        known = {e.track_id for e in events}
        recent = set(history[user][-settings.max_recent :])
        if n > 100:  # an active listener in a catalogue of ~1,200 tracks gets a full list
            assert len(doc.items) == settings.top_k
        assert len(doc.items) <= settings.top_k
        if played_until[user] - recent:  # something other than their own recent tracks
            assert doc.items, f"{user}: empty list with other tracks in the catalogue"
        # (the sample's user_000002 plays only the log's first three events, two tracks:
        # ranked right after them, nothing else exists yet, and an empty list is correct)
        assert {i.track_id for i in doc.items} <= known
        rec_ids = [i.track_id for i in doc.items]
        assert not recent & set(rec_ids), "recommended a track the user just played"
        assert len(set(rec_ids)) == len(rec_ids)
        assert all(i.reason for i in doc.items)
        assert doc.generated_at_ms >= doc.event_ts_ms
    assert worker.metric_value("stream_events_total", outcome="processed") == len(events)
    assert worker.metric_value("stream_freshness_seconds_count") > 0


def test_a_drained_backlog_leaves_every_listener_ranked_after_their_last_play(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """Real Last.fm plays produced before the worker starts: it drains them as a backlog,
    coalescing each listener's rankings (catch_up_rank_ms), and still every listener's
    document ends up ranked after their very last play."""
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")
    assert produce(settings, events) == len(events)
    worker = worker_factory()
    expected = counts_by_user(events)
    wait_for_counts(reader, expected)
    latest = {e.user_id: e for e in events}
    for user in expected:
        doc = reader.get(user)
        assert doc is not None and doc.event_id == latest[user].event_id
        assert doc.generated_at_ms >= doc.event_ts_ms
    assert worker.metric_value("stream_catch_up_batches_total") > 0
    rankings = worker.metric_value("stream_stage_seconds_count", stage="rank")
    assert 0 < rankings < len(events), "rankings were not coalesced over the backlog"


MALFORMED: list[bytes] = [
    b"",
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"user_id": "u1"}',
    b'{"user_id": "u1", "track_id": "t1", "ts": "yesterday", "ms_played": 1}',
    b'{"user_id": ["u1"], "track_id": "t1", "ts": 1700000000000, "ms_played": 1}',
    b'{"user_id": "u1", "track_id": "t1", "ts": 1700000000000, "ms_played": -5}',
    b'{"user_id": "u1", "track_id": "t1", "ts": 99999999999999, "ms_played": 1000}',
    b'{"user_id": "u1", "track_id": "' + b"x" * 300 + b'", "ts": 1700000000000, "ms_played": 1}',
    b'{"user_id": "u1", "track_id": "t1", "ts": 1700000000000, "ms_played": NaN}',
    b"{" * 5000,
    b'{"pad": "' + b"y" * 20000 + b'"}',
]


def test_malformed_events_go_to_dead_letter_topic(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    good = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    mixed: list[PlayEvent | bytes] = []
    bad_iter = iter(MALFORMED)
    for i, ev in enumerate(good):
        mixed.append(ev)
        if i % 14 == 0:
            mixed.append(next(bad_iter, None) or MALFORMED[i % len(MALFORMED)])
    bad_sent = [m for m in mixed if isinstance(m, bytes)]
    worker = worker_factory()
    produce(settings, mixed)
    wait_for_counts(reader, counts_by_user(good))

    dlq = asyncio.run(
        read_topic(settings, settings.dlq_topic, max_messages=len(bad_sent), timeout_s=30)
    )
    assert len(dlq) == len(bad_sent)
    assert sorted(r.value for r in dlq) == sorted(bad_sent)
    for rec in dlq:
        headers = {k: v.decode() for k, v in rec.headers}
        expected = parse_event(rec.value, now_ms=1_800_000_000_000)
        assert not isinstance(expected, PlayEvent)
        assert headers["dlq.reason"] == expected.reason
        assert headers["dlq.detail"]
        assert headers["dlq.topic"] == settings.plays_topic
        assert int(headers["dlq.partition"]) >= 0 and int(headers["dlq.offset"]) >= 0
    assert worker.metric_value("stream_events_total", outcome="rejected") == len(bad_sent)
    assert worker.metric_value("stream_events_rejected_total") == len(bad_sent)
    assert worker.metric_value("stream_dlq_writes_total") == len(bad_sent)
    assert worker.metric_value("stream_events_total", outcome="processed") == len(good)
    assert worker.proc is not None and worker.proc.poll() is None, "worker died"


@pytest.mark.parametrize("consumer_thread", [False, True], ids=["in-loop", "faust-thread"])
def test_restart_restores_session_state_from_changelog(
    settings: Settings,
    worker_factory,
    reader: RecoReader,
    datasets_dir: Path,
    consumer_thread: bool,
) -> None:
    """Both consumer modes (stream.faustx.consumer, and Faust's own thread) stop cleanly with their
    offsets committed and the changelog flushed, and a restart resumes from them."""
    settings = settings.replace(kafka_consumer_thread=consumer_thread)
    where = "in Faust's consumer thread" if consumer_thread else "on the worker's event loop"
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:3000]
    first, second = events[:1500], events[1500:]
    w1 = worker_factory(settings)
    assert f"Kafka consumer: {where}" in w1.log_text()
    produce(settings, first)
    wait_for_counts(reader, counts_by_user(first))
    assert w1.stop() == 0

    produce(settings, second)  # while no worker runs
    w2 = worker_factory(settings)
    expected = counts_by_user(events)
    wait_for_counts(reader, expected)
    for user, n in expected.items():
        doc = reader.get(user)
        assert doc is not None and doc.session["plays_total"] == n
    # the second worker processed only the new events: the rest came from the changelog
    assert w2.metric_value("stream_events_total", outcome="processed") == len(second)
    assert "recovery" in w2.log_text().lower() or "Recovery" in w2.log_text()


def test_duplicate_events_do_not_double_count(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    worker = worker_factory()
    produce(settings, events)
    produce(settings, events)  # at-least-once producers re-send; same event ids
    expected = counts_by_user(events)
    wait_until(
        lambda: worker.metric_value("stream_events_total", outcome="duplicate") == len(events),
        60,
        what="all re-sent events seen as duplicates",
    )
    wait_for_counts(reader, expected)
    for user, n in expected.items():
        doc = reader.get(user)
        assert doc is not None and doc.session["plays_total"] == n
    assert worker.metric_value("stream_events_total", outcome="processed") == len(events)


def test_pubsub_notification_per_update(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """Every document update is announced on the channel: the notifications name every
    listener, in seq order, and each listener's last one announces the document that holds
    all of their plays."""
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")[:50]
    expected = counts_by_user(events)
    worker_factory()
    # subscribed (confirmed by the server) before anything is produced: no note is missed
    pubsub = subscribe_confirmed(reader.client, settings.notify_channel)
    try:
        produce(settings, events)
        notes = collect_notifications(
            pubsub,
            lambda ns: {n["user_id"]: n["seq"] for n in ns} == expected,
            60,
            what=f"a notification of seq == plays for each of {len(expected)} listeners",
        )
        notes += drain_notifications(pubsub)
    finally:
        pubsub.close()
    assert {n["user_id"] for n in notes} == set(expected)
    by_user: dict[str, list[dict]] = defaultdict(list)
    for n in notes:
        assert {"user_id", "seq", "event_id", "event_ts", "generated_at"} <= set(n)
        by_user[n["user_id"]].append(n)
    for user, ns in by_user.items():
        seqs = [n["seq"] for n in ns]
        assert seqs == sorted(seqs) and seqs[-1] == expected[user], (user, seqs)
        doc = reader.get(user)
        assert doc is not None and doc.event_id == ns[-1]["event_id"]
        assert doc.seq == ns[-1]["seq"]


def test_learned_ranker_worker_publishes_valid_lists(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """STREAM_RANKER=learned (the learned blend over the session models; the default is
    the fixed blend): the worker learns and publishes full, valid lists whose reason codes
    are documented ones."""
    from stream.core.ranking import REASON_TEXTS

    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm", limit=3000)
    learned = settings.replace(ranker="learned")
    worker = worker_factory(learned)
    assert produce(learned, events) == len(events)
    expected = counts_by_user(events)
    wait_for_counts(reader, expected)
    known = {e.track_id for e in events}
    history: dict[str, list[str]] = defaultdict(list)
    for e in events:
        history[e.user_id].append(e.track_id)
    codes: Counter[str] = Counter()
    for user, n in expected.items():
        doc = reader.get(user)
        assert doc is not None and doc.session["plays_total"] == n
        ids = [i.track_id for i in doc.items]
        assert len(ids) <= settings.top_k and len(set(ids)) == len(ids)
        assert set(ids) <= known
        assert not set(history[user][-settings.max_recent :]) & set(ids)
        if n > 100:
            assert len(ids) == settings.top_k
        for item in doc.items:
            assert item.reason and item.reason_code in REASON_TEXTS
            codes[item.reason_code] += 1
    assert sum(codes.values()) > 0
    assert worker.metric_value("stream_events_total", outcome="processed") == len(events)
    assert "ranker: learned (setting ranker; session models on)" in worker.log_text()
    # the live quality gauges carry each component next to the published blend
    # (ComponentQuality: every 50th evaluated play; exported by the 2 s report timer)
    variants = ("blend", "popularity", "mf", "cooccurrence", "sknn", "stan", "sr", "fixed")
    deadline = time.monotonic() + 20
    while True:
        windows = {v: worker.metric_sample("stream_quality_window_events", variant=v)
                   for v in variants}
        if all(windows.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(windows.values()), windows
    assert windows["stan"] < windows["blend"]  # a sample of the blend's evaluated plays
