"""The per-record pipeline with an in-memory table (pure logic; Kafka/Redis not involved)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import orjson
import pytest

from stream.adapters.redis_store import PendingWrite
from stream.config import load_settings
from stream.core.events import PlayEvent, encode_event
from stream.core.recommender import Recommender
from stream.processing.pipeline import DeadLetter, Processor, Record

NOW_S = 1_700_000_100.0


def make() -> tuple[Processor, dict[str, Any], list[PendingWrite], list[DeadLetter]]:
    table: dict[str, Any] = {}
    writes: list[PendingWrite] = []
    dead: list[DeadLetter] = []
    p = Processor(
        load_settings(env={}, file=None),
        Recommender(),
        table,
        writes.append,
        dead.append,
        clock=lambda: NOW_S,
    )
    return p, table, writes, dead


_offsets = itertools.count()


def rec(value: bytes | None, key: bytes | None, offset: int | None = None) -> Record:
    """A record at the next offset of partition 0 (or at ``offset``)."""
    return Record(
        "plays", 0, next(_offsets) if offset is None else offset, key, value, 1_700_000_000_000
    )


def play(user: str, track: str, i: int) -> bytes:
    return encode_event(PlayEvent(user, track, 1_700_000_000_000 + i, 200_000, f"{user}-{i}"))


def test_valid_event_updates_state_and_emits_a_write() -> None:
    p, table, writes, dead = make()
    out = p.process(rec(play("u1", "a", 0), b"u1"))
    assert out.outcome == "processed" and not dead
    assert table["u1"].plays_total == 1
    doc = orjson.loads(writes[-1].doc)
    assert doc["user_id"] == "u1" and doc["seq"] == 1 and doc["event_id"] == "u1-0"
    assert writes[-1].key == "reco:u1"


def test_rejections_go_to_dead_letters_with_source_coordinates() -> None:
    p, table, writes, dead = make()
    out = p.process(Record("plays", 3, 42, b"k", b"{bad", 1))
    assert out.outcome == "rejected" and not table and not writes
    headers = dict(dead[0].headers())
    assert headers["dlq.reason"] == b"not_json"
    assert headers["dlq.topic"] == b"plays" and headers["dlq.partition"] == b"3"
    assert headers["dlq.offset"] == b"42"
    assert dead[0].record.value == b"{bad"


def test_key_must_match_user_id() -> None:
    p, table, _, dead = make()
    out = p.process(rec(play("u1", "a", 0), b"someone-else"))
    assert out.outcome == "rejected" and dead[0].rejection.reason == "key_mismatch"
    # a record without a key is dead-lettered too: its partition says nothing of the owner
    out = p.process(rec(play("u1", "a", 0), None))
    assert out.outcome == "rejected" and dead[1].rejection.reason == "key_mismatch"
    assert "no key" in dead[1].rejection.detail and not table


def test_redelivery_is_a_duplicate_and_changes_nothing() -> None:
    p, table, writes, _ = make()
    p.process(rec(play("u1", "a", 0), b"u1"))
    p.process(rec(play("u1", "b", 1), b"u1"))
    before = table["u1"].to_dict()
    n_writes = len(writes)
    # a producer re-send (new offset) and a replay (the same record at its old offset) are
    # both duplicates
    assert p.process(rec(play("u1", "a", 0), b"u1")).outcome == "duplicate"
    assert p.process(rec(play("u1", "b", 1), b"u1", offset=0)).outcome == "duplicate"
    assert table["u1"].to_dict() == before and len(writes) == n_writes


def test_recommendations_exclude_recent_and_carry_reasons() -> None:
    p, _, writes, _ = make()
    for i, (u, t) in enumerate([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a")]):
        p.process(rec(play(u, t, i), u.encode()))
    doc = orjson.loads(writes[-1].doc)
    ids = [it["track_id"] for it in doc["items"]]
    assert "a" not in ids and ids and ids[0] == "b"
    assert all(it["reason"] for it in doc["items"])


def test_model_error_keeps_the_play_and_is_not_dead_lettered() -> None:
    p, table, writes, dead = make()

    class Broken(Recommender):
        def recommend(self, *a: object, **k: object) -> list:  # type: ignore[override]
            raise RuntimeError("boom")

    p.recommender = Broken()
    out = p.process(rec(play("u1", "a", 0), b"u1"))
    assert out.outcome == "processed" and isinstance(out.model_error, RuntimeError)
    assert table["u1"].plays_total == 1 and not dead and not writes
    assert p.model_errors == 1


def test_track_signals_round_trip_and_skip_garbage() -> None:
    from stream.processing.replication import TrackSignal, decode_batch, encode_batch

    now = 1_700_000_000_000
    sigs = [TrackSignal("w1", f"t{i}", now + i, i % 2 == 0, ("a", "b")) for i in range(3)]
    back = decode_batch(encode_batch("w1", sigs), now_ms=now)
    assert back.worker == "w1" and back.signals == sigs and not back.rejected
    assert decode_batch(b"garbage", now_ms=now).rejected == ["not_json"]
    raw = orjson.dumps({"w": "w2", "signals": [{"t": "x"}, {"t": "y", "ts": now, "s": False}]})
    back = decode_batch(raw, now_ms=now)
    assert back.worker == "w2" and [s.track_id for s in back.signals] == ["y"]
    assert back.rejected == ["missing_field"]


def test_replayed_duplicates_republish_the_current_list_in_deferred_mode() -> None:
    table: dict[str, Any] = {}
    writes: list[PendingWrite] = []
    p = Processor(
        load_settings(env={}, file=None),
        Recommender(),
        table,
        writes.append,
        lambda d: None,
        clock=lambda: NOW_S,
        defer_ranking=True,
    )
    first = rec(play("u1", "a", 0), b"u1")
    second = rec(play("u1", "b", 1), b"u1")
    p.process(first)
    p.process(second)
    assert p.rank_pending() == 1 and len(writes) == 1  # coalesced: one ranking, one write
    assert orjson.loads(writes[0].doc)["event_id"] == "u1-1" and writes[0].fresh
    # the worker died before that write reached Redis; the replay is a duplicate...
    assert p.process(first).outcome == "duplicate"
    assert p.rank_pending() == 1
    # ...that re-publishes the current list: same seq, metadata of the latest applied play
    doc = orjson.loads(writes[1].doc)
    assert writes[1].seq == 2 and doc["event_id"] == "u1-1" and not writes[1].fresh


def test_catalogue_stays_bounded_under_a_flood_of_new_tracks() -> None:
    table: dict[str, Any] = {}
    writes: list[PendingWrite] = []
    settings = load_settings(env={"STREAM_MAX_TRACKS": "100"}, file=None)
    p = Processor(
        settings, Recommender(), table, writes.append, lambda d: None, clock=lambda: NOW_S
    )
    for i in range(1000):  # hostile: every play a never-seen track
        p.process(rec(play(f"u{i % 7}", f"junk-{i}", i), f"u{i % 7}".encode()))
    assert p.recommender.catalogue_size() <= 100
    assert p.evicted_tracks > 0 and p.model_errors == 0
    assert table["u0"].plays_total == 143  # every play still counted


def _scenario() -> list[Record]:
    """Plays of a few listeners (repeats, a replayed record, a malformed one, a key
    mismatch) on two partitions, in order."""
    records: list[Record] = []
    for i in range(60):
        user = f"u{i % 5}"
        records.append(Record("plays", i % 2, 1000 + i, user.encode(),
                              play(user, f"t{(i * 7) % 13}", i), 1_700_000_000_000 + i))
    records.insert(20, records[10])  # a replay of an applied record
    records.insert(30, Record("plays", 0, 5000, b"u1", b"{nope", 1))
    records.insert(40, Record("plays", 1, 5001, b"someone", play("u2", "t1", 99), 1))
    return records


Run = tuple[list[tuple[str, str | None]], list[bytes], dict[str, Any]]


def _run(defer: bool, batch: int) -> Run:
    table: dict[str, Any] = {}
    writes: list[PendingWrite] = []
    dead: list[DeadLetter] = []
    p = Processor(load_settings(env={}, file=None), Recommender(), table, writes.append,
                  dead.append, clock=lambda: NOW_S, defer_ranking=defer)
    records = _scenario()
    outcomes = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        outcomes += p.process_batch(chunk) if batch > 1 else [p.process(chunk[0])]
        p.rank_pending()
    summary = [(o.outcome, o.rejection.reason if o.rejection else None) for o in outcomes]
    return summary, [w.doc for w in writes], {u: s.to_dict() for u, s in table.items()}


def test_a_batch_gives_exactly_what_one_record_at_a_time_gives() -> None:
    for defer in (False, True):
        one = _run(defer, 1)
        if not defer:  # ranked per play: the same lists whatever the batching
            assert _run(defer, 16) == one
        else:  # ranked once per listener per flush: same outcomes and state
            batched = _run(defer, 16)
            assert batched[0] == one[0] and batched[2] == one[2]
        outcomes = [o for o, _ in one[0]]
        assert outcomes.count("duplicate") == 1 and outcomes.count("rejected") == 2


def test_a_record_that_raises_is_dead_lettered_and_the_batch_goes_on() -> None:
    p, table, writes, dead = make()
    seen: list[int] = []
    records = [rec(play(u, "a", i), u.encode()) for i, u in enumerate(["u1", "boom", "u2"])]

    def before_state(i: int) -> None:
        seen.append(i)
        if records[i].key == b"boom":
            raise RuntimeError("table unavailable")

    out = p.process_batch(records, stages := {}, before_state)
    assert [o.outcome for o in out] == ["processed", "rejected", "processed"]
    assert out[1].rejection is not None and out[1].rejection.reason == "internal_error"
    assert [d.record.key for d in dead] == [b"boom"] and seen == [0, 1, 2]
    assert set(table) == {"u1", "u2"} and len(writes) == 2
    assert set(stages) >= {"decode", "session", "learn", "rank"} and all(
        v >= 0 for v in stages.values())


def test_tracks_waiting_for_a_similar_refresh_are_bounded_and_forget_evicted_ones() -> None:
    settings = load_settings(env={"STREAM_MAX_TRACKS": "100"}, file=None)
    p = Processor(settings, Recommender(), {}, lambda w: None, lambda d: None,
                  clock=lambda: NOW_S, max_touched_tracks=50)
    for i in range(1000):  # every play a never-seen track (and listener)
        p.process(rec(play(f"junk-u{i}", f"junk-{i}", i), f"junk-u{i}".encode()))
    assert len(p.touched_tracks) <= 50 and p.touched_dropped >= 1000 - 50 - p.evicted_tracks
    index = p.recommender.vocabulary.index
    assert p.evicted_tracks > 0 and all(t in index for t in p.touched_tracks)
    # the newest stay (the oldest were dropped first)
    assert "junk-999" in p.touched_tracks and "junk-0" not in p.touched_tracks


def test_evicted_tracks_are_forgotten_in_slices_both_ways() -> None:
    """``Processor._forget_tracks_steps``: the evicted tracks leave ``touched_tracks`` and
    ``similar_refreshed`` in slices (one piece held the loop 52-79 ms at the 500k cap),
    whether it pops the evicted ids or walks the two maps for ids no longer known."""
    import stream.processing.pipeline as pipeline

    settings = load_settings(env={"STREAM_MAX_TRACKS": "100000"}, file=None)
    p = Processor(settings, Recommender(), {}, lambda w: None, lambda d: None,
                  clock=lambda: NOW_S)
    for i in range(60):
        p.process(rec(play(f"u{i}", f"t{i}", i), f"u{i}".encode()))
    known = set(p.recommender.vocabulary.index)
    # pop side: more waiting than evicted
    p.touched_tracks.clear()
    p.touched_tracks.update((f"gone-{i}", None) for i in range(5000))
    p.touched_tracks.update((t, None) for t in known)
    for i in range(5000):
        p.similar_refreshed[f"gone-{i}"] = 1.0
    steps = list(p._forget_tracks_steps([f"gone-{i}" for i in range(4000)]))
    assert len(steps) == -(-4000 // pipeline.FORGET_SLICE) and len(steps) > 1
    left = {f"gone-{i}" for i in range(4000, 5000)}
    assert set(p.touched_tracks) == left | known and set(p.similar_refreshed) == left
    # walk side: more evicted than waiting; only the unknown ids go, one shard a step
    for t in known:
        p.similar_refreshed[t] = 2.0
    steps = list(p._forget_tracks_steps([f"x{i}" for i in range(10_000)]))
    assert len(steps) == 1 + len(p.similar_refreshed.shards)
    assert set(p.touched_tracks) == known and set(p.similar_refreshed) == known


def test_a_track_with_no_similar_tracks_gets_no_similar_key() -> None:
    p, _, _, _ = make()
    p.process(rec(play("lonely", "only-track", 0), b"lonely"))
    assert p.recommender.similar("only-track", 10) == []
    assert p.similar_due(NOW_S) == [] and p.similar_empty == 1
    p.process(rec(play("lonely", "second-track", 1), b"lonely"))
    out = p.similar_due(NOW_S + 100)  # now each has the other as a neighbour
    assert {key for key, _ in out} == {"similar:second-track"}
    assert all(orjson.loads(doc)["items"] for _, doc in out)


def test_a_flood_of_rejections_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every rejection is dead-lettered (and so counted), but the log gets at most the
    rate limit's lines per reason (stream.processing.ratelog)."""
    p, _, _, dead = make()
    with caplog.at_level(logging.INFO, logger="stream.processing.pipeline"):
        for i in range(500):
            p.process(rec(b"junk %d" % i, None))
            p.process(rec(play("u1", "a", i), b"x\n[fake] ERROR forged"))
    assert len(dead) == 1000
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 20  # 10 per reason: not_json, key_mismatch
    assert all("\n" not in line for line in lines)
    assert any("forged" in line for line in lines)  # escaped, not dropped


def test_murmur2_and_the_key_partition_match_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner, murmur2

    from stream.processing.pipeline import key_partition
    from stream.processing.pipeline import murmur2 as ours

    partitioner = DefaultPartitioner()
    for i in range(500):
        key = f"user-{i}-{'x' * (i % 9)}".encode()
        assert ours(key) == murmur2(key) & 0xFFFFFFFF
        for n in (1, 3, 4, 12):
            assert key_partition(key, n) == partitioner(key, list(range(n)), list(range(n)))


def test_the_key_hash_cache_gives_the_uncached_partition_and_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stream.core import events

    monkeypatch.setattr(events, "KEY_HASH_CACHE", 64)
    monkeypatch.setattr(events, "_key_hashes", {})
    keys = [f"listener-{i}".encode() for i in range(300)]
    for _ in range(3):  # cold, cached, and after the cache was emptied on the way
        for key in keys:
            for n in (1, 4, 7):
                uncached = (events.murmur2(key) & 0x7FFFFFFF) % n
                assert events.key_partition(key, n) == uncached
                assert events.key_partition(bytearray(key), n) == uncached
            assert len(events._key_hashes) <= 64


def test_a_play_on_another_partition_than_its_key_is_dead_lettered() -> None:
    """Review finding 2: with ``partitions`` known, a play whose partition is not
    murmur2(key) mod partitions is rejected as ``wrong_partition``, never applied."""
    from stream.processing.pipeline import key_partition

    table: dict[str, Any] = {}
    writes: list[PendingWrite] = []
    dead: list[DeadLetter] = []
    p = Processor(load_settings(env={}, file=None), Recommender(), table, writes.append,
                  dead.append, clock=lambda: NOW_S, partitions=4)
    home = key_partition(b"u1", 4)
    out = p.process(Record("plays", (home + 1) % 4, 0, b"u1", play("u1", "a", 0), 1))
    assert out.outcome == "rejected" and dead[0].rejection.reason == "wrong_partition"
    assert not table and not writes
    out = p.process(Record("plays", home, 1, b"u1", play("u1", "a", 1), 1))
    assert out.outcome == "processed" and table["u1"].plays_total == 1


@pytest.mark.parametrize("ranker", ["fixed", "learned"])
def test_live_quality_scores_each_component_on_a_sample_of_plays(ranker: str) -> None:
    from stream.core.evaluation import Prequential

    settings = load_settings(env={"STREAM_QUALITY_COMPONENTS_EVERY": "3"}, file=None)
    evaluator = Prequential(k=10, window=1000)
    recommender = Recommender(blend=ranker, session_models=ranker == "learned")
    p = Processor(settings, recommender, {}, [].append, [].append, clock=lambda: NOW_S,
                  evaluator=evaluator)
    for i in range(60):  # two listeners alternating over a few tracks: lists are published
        user = f"u{i % 2}"
        p.process(rec(play(user, f"t{(i // 2) % 7}", i), user.encode()))
    summary = evaluator.summary()
    blend_events = summary["blend"]["events"]
    assert blend_events >= 50  # every play after each listener's first
    expected = {"popularity", "mf", "cooccurrence"}
    if ranker == "learned":
        expected |= {"sknn", "stan", "sr", "fixed"}
    assert set(summary) - {"blend", "skip"} == expected
    for variant in expected:  # every third evaluated play of the blend
        assert summary[variant]["events"] == blend_events // 3
    assert p.model_errors == 0
    # the worker exports HR@10, MRR@10 and NDCG@10 of every variant as gauges
    from prometheus_client import CollectorRegistry

    from stream.adapters.metrics import Metrics
    from stream.worker.telemetry import Telemetry

    registry = CollectorRegistry()
    Telemetry(Metrics(registry), settings).quality(recommender, evaluator)
    for variant in expected | {"blend"}:
        for gauge, name in (("hr", "hr@10"), ("mrr", "mrr@10"), ("ndcg", "ndcg@10")):
            value = registry.get_sample_value(f"stream_quality_{gauge}_at_10",
                                              {"variant": variant})
            assert value == pytest.approx(summary[variant][name]), (gauge, variant)
    assert registry.get_sample_value("stream_quality_mrr_at_10", {"variant": "blend"}) > 0


def test_live_component_quality_can_be_turned_off() -> None:
    from stream.config import ConfigError
    from stream.core.evaluation import Prequential

    settings = load_settings(env={"STREAM_QUALITY_COMPONENTS_EVERY": "0"}, file=None)
    evaluator = Prequential(k=10, window=1000)
    p = Processor(settings, Recommender(), {}, [].append, [].append, clock=lambda: NOW_S,
                  evaluator=evaluator)
    for i in range(20):
        p.process(rec(play("u", f"t{i % 5}", i), b"u"))
    assert set(evaluator.summary()) <= {"blend", "skip"}
    with pytest.raises(ConfigError, match="quality_components_every"):
        load_settings(env={"STREAM_QUALITY_COMPONENTS_EVERY": "-1"}, file=None)
