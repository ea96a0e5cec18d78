"""Track names: the bounded catalogue, named list items, reason codes and the top-up."""

from __future__ import annotations

import random
from collections import OrderedDict

import orjson
import pytest

from stream.adapters.redis_store import catalog_commands
from stream.core.catalog import TrackCatalog, TrackInfo
from stream.core.events import PlayEvent, Rejection, parse_event
from stream.core.ranking import Recommendation, reason_text, top_up
from stream.core.recommender import Recommender
from stream.core.session import update_session

NOW = 1_700_000_000_000


def test_play_events_carry_optional_names() -> None:
    raw = orjson.dumps({"user_id": "u", "track_id": "t", "ts": NOW, "ms_played": 1,
                        "track_name": "Karma Police", "artist_name": "Radiohead",
                        "album_name": "OK Computer"})
    ev = parse_event(raw, now_ms=NOW)
    assert isinstance(ev, PlayEvent)
    assert (ev.track_name, ev.artist_name, ev.album_name) == (
        "Karma Police", "Radiohead", "OK Computer")
    assert parse_event(orjson.dumps(ev.to_dict()), now_ms=NOW) == ev  # round trip


@pytest.mark.parametrize(("value", "reason"), [(7, "wrong_type"), ("x" * 257, "string_too_long")])
def test_bad_names_are_rejected(value: object, reason: str) -> None:
    raw = orjson.dumps({"user_id": "u", "track_id": "t", "ts": NOW, "ms_played": 1,
                        "artist_name": value})
    out = parse_event(raw, now_ms=NOW)
    assert isinstance(out, Rejection) and out.reason == reason


def test_first_sighting_and_changes_only_are_owed_to_redis() -> None:
    cat = TrackCatalog()
    assert cat.observe("t", None, None, None, ts_ms=1)  # first sighting, no names
    assert not cat.observe("t", None, None, None, ts_ms=2)
    assert cat.observe("t", "Song", "Band", None, ts_ms=3)  # names learned: a change
    assert not cat.observe("t", "Song", None, None, ts_ms=4)  # a missing part keeps its value
    changes = cat.take_changes()
    assert changes == {"t": (1, TrackInfo("Song", "Band", None))}
    assert cat.take_counts() == {"t": (4, 4)}
    assert cat.take_changes() == {} and cat.take_counts() == {}
    cmds = b"".join(catalog_commands("track:", changes, {"t": (4, 4)}, 60))
    assert b"HSETNX" in cmds and b"HINCRBY" in cmds and b"Song" in cmds


def test_a_known_tracks_names_merge_part_by_part() -> None:
    cat = TrackCatalog()
    assert cat.observe("t", "Song", "Band", "LP", ts_ms=1)
    assert not cat.observe("t", " Song ", "  ", None, ts_ms=2)  # cleaned: the same names
    assert cat.observe("t", None, "Other Band", None, ts_ms=3)  # one part changed
    assert cat.get("t") == TrackInfo("Song", "Other Band", "LP")
    assert not cat.observe("t", "Song", "Other Band", "LP", ts_ms=4)
    assert cat.take_changes() == {"t": (1, TrackInfo("Song", "Other Band", "LP"))}


def test_memory_is_bounded_by_entries_and_characters() -> None:
    cat = TrackCatalog(max_tracks=100, max_chars=2_000)
    for i in range(10_000):  # hostile: a new long name with every play
        cat.observe(f"t{i}", "n" * 256, "a" * 256, "b" * 256, ts_ms=i)
        cat.take_changes()
        assert len(cat) <= 100 and cat.chars <= 2_000
    assert cat.evicted > 9_000
    assert cat.get("t9999") is not None and cat.get("t0") is None
    assert cat.take_wanted(10) == ["t0"]  # the unknown one is asked of Redis


class _ReferenceCatalog:
    """The catalogue's bounds as one OrderedDict (the structure before the shards): the
    sharded one must keep exactly this LRU order, character count and eviction count."""

    def __init__(self, max_tracks: int, max_chars: int) -> None:
        self.max_tracks, self.max_chars = max_tracks, max_chars
        self.info: OrderedDict[str, TrackInfo] = OrderedDict()
        self.chars = self.evicted = 0

    def put(self, track: str, info: TrackInfo) -> None:
        old = self.info.pop(track, None)
        self.chars -= old.chars() if old is not None else 0
        self.info[track] = info
        self.chars += info.chars()
        while len(self.info) > self.max_tracks or self.chars > self.max_chars:
            dropped_id, dropped = self.info.popitem(last=False)
            self.chars -= dropped.chars()
            self.evicted += 1
            if dropped_id == track:
                break

    def observe(self, track: str, name: str | None) -> None:
        known = self.info.get(track)
        if known is None:
            self.put(track, TrackInfo(name))
            return
        self.info.move_to_end(track)
        if name and name != known.name:
            self.put(track, TrackInfo(name, known.artist, known.album))


@pytest.mark.parametrize("max_tracks,max_chars", [(50, 10_000_000), (1_000, 900), (64, 400)])
def test_the_sharded_catalogue_keeps_the_lru_order_and_char_budget(
    max_tracks: int, max_chars: int
) -> None:
    rng = random.Random(max_tracks)
    cat, ref = TrackCatalog(max_tracks, max_chars), _ReferenceCatalog(max_tracks, max_chars)
    for i in range(6_000):
        track = f"t{rng.randrange(200)}" if rng.random() < 0.7 else f"new{i}"
        name = rng.choice([None, "a" * rng.randrange(1, 40), f"n{rng.randrange(3)}"])
        kind = rng.random()
        if kind < 0.8:
            cat.observe(track, name, None, None, ts_ms=i)
            ref.observe(track, name)
        elif kind < 0.9:  # names read back from Redis
            info = TrackInfo(name)
            cat.learn(track, info)
            if track not in ref.info or info.chars():
                ref.put(track, info)
        elif cat.upsert(track, TrackInfo(name, "x")):
            ref.put(track, TrackInfo(name, "x"))
        assert len(cat) == len(ref.info) and cat.chars == ref.chars
        assert cat.evicted == ref.evicted
    assert list(cat._info) == list(ref.info)  # the exact least-recent-first order
    assert [cat.get(t) for t in ref.info] == list(ref.info.values())
    assert ref.evicted > 0


def test_items_carry_names_and_reason_fields() -> None:
    cat = TrackCatalog()
    cat.observe("kp", "Karma Police", "Radiohead", None, ts_ms=1)
    cat.observe("nm", "No Surprises", "Radiohead", "OK Computer", ts_ms=1)
    recs = [
        Recommendation("nm", 0.9, reason_text("played", "kp"), "played", "kp"),
        Recommendation("x", 0.1, reason_text("trending"), "trending", None),
    ]
    first, second = cat.items(recs)
    assert first == {
        "track_id": "nm", "score": 0.9, "reason": "because you played Karma Police by Radiohead",
        "reason_code": "played", "reason_track_id": "kp", "name": "No Surprises",
        "artist": "Radiohead", "album": "OK Computer",
    }
    assert second == {"track_id": "x", "score": 0.1, "reason": "popular right now",
                      "reason_code": "trending", "reason_track_id": None}


def test_recommender_reasons_carry_codes_and_anchors() -> None:
    rec = Recommender()
    states: dict[str, object] = {}
    plays = [("u", "a"), ("u", "b"), ("v", "a"), ("w", "c")]
    for i, (user, track) in enumerate(plays):
        up = update_session(states.get(user), PlayEvent(user, track, NOW + i, 200_000, f"e{i}"))  # type: ignore[arg-type]
        rec.learn_one(up)
        states[user] = up.state
    recs = rec.recommend(states["v"], k=3, now_ms=NOW + 10)  # type: ignore[arg-type]
    assert recs[0][:2] == ("b", recs[0].score)
    assert (recs[0].code, recs[0].anchor, recs[0].reason) == ("played", "a", "because you played a")
    assert all(r.code in ("trending", "similar_taste", "played_recently") for r in recs[1:])
    similar = rec.similar("a", 3)
    assert similar and all(r.anchor == "a" for r in similar)
    assert all(r.code in ("played_with", "liked_by_listeners_of") for r in similar)
    assert rec.trending(2)[0] == "a"  # played twice


def test_top_up_fills_from_trending_and_never_leaves_a_list_empty() -> None:
    recs = [Recommendation("a", 1.0, "because you played z", "played", "z")]
    full = top_up(recs, ["a", "b", "c", "d"], 3, avoid={"b"})
    assert [r.track_id for r in full] == ["a", "c", "d"]
    assert [r.code for r in full[1:]] == ["trending_topup"] * 2
    assert [r.track_id for r in top_up([], ["b"], 3, avoid={"b"})] == ["b"]
    assert top_up(recs, ["b"], 3, avoid={"b"}) == recs  # not empty: avoided stay out


def test_processor_writes_named_documents_tops_up_and_refreshes_short_lists() -> None:
    """Pipeline level: names from the plays reach the documents; a short list is topped
    up at once and re-ranked (same seq) by the background refresh once the catalogue grew."""
    from stream.adapters.redis_store import PendingWrite
    from stream.config import load_settings
    from stream.core.events import encode_event
    from stream.processing.pipeline import Processor, Record

    writes: list[PendingWrite] = []
    p = Processor(load_settings(env={}, file=None), Recommender(), {}, writes.append,
                  lambda _d: None, clock=lambda: NOW / 1000, defer_ranking=True)

    def play(user: str, track: str, i: int, name: str | None = None) -> None:
        ev = PlayEvent(user, track, NOW + i, 200_000, f"{user}-{i}", track_name=name,
                       artist_name="Radiohead" if name else None)
        p.process(Record("plays", 0, i, user.encode(), encode_event(ev), NOW))

    play("early", "kp", 0, "Karma Police")
    p.rank_pending()
    first = orjson.loads(writes[-1].doc)
    assert [(i["track_id"], i["reason_code"], i["name"]) for i in first["items"]] == [
        ("kp", "trending_topup", "Karma Police")]
    assert "early" in p.short_lists
    assert p.refresh_short_lists() == 0  # nothing new in the catalogue yet
    for i in range(1, 25):
        play(f"o{i % 3}", f"t{i}", i)
    p.rank_pending()
    assert p.refresh_short_lists() == 1
    p.rank_pending()
    again = orjson.loads(writes[-1].doc)
    assert again["user_id"] == "early" and again["seq"] == first["seq"]
    assert len(again["items"]) == 10 and "kp" not in {i["track_id"] for i in again["items"]}
    assert not writes[-1].fresh  # a re-ranking, not a freshness sample
    assert "early" not in p.short_lists
    changes = p.catalog.take_changes()
    assert changes["kp"][1] == TrackInfo("Karma Police", "Radiohead", None)
    assert len(changes) == 25


def test_loaders_pass_the_names_they_have(datasets_dir) -> None:  # type: ignore[no-untyped-def]
    from stream.tools.datasets import load_events

    movies = load_events(datasets_dir / "movielens-100k", "movielens", limit=2000)
    assert all(e.track_name for e in movies)  # every rated movie has a title in ml-100k.item
    toy_story = next(e for e in load_events(datasets_dir / "movielens-100k", "movielens")
                     if e.track_id == "1")
    assert toy_story.track_name == "Toy Story"
    plays = load_events(datasets_dir / "lastfm-1k-sample", "lastfm", limit=2000)
    assert all(e.track_name and e.artist_name for e in plays)
    spotify = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    assert all(e.track_name is None for e in spotify)  # the MSSD log has no names


def test_catalog_files_are_validated_before_anything_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stream.tools.catalog_load import CatalogFileError, read_catalog_file

    good = tmp_path / "a.csv"
    good.write_text("track_id,track_name,artist,album\nt1,Airbag,Radiohead,\nt2,,,\n")
    assert read_catalog_file(good) == [("t1", "Airbag", "Radiohead", None),
                                       ("t2", None, None, None)]
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"track_id": 7, "name": "Seven"}\n\n{"track_id": "x", "artist": 3}\n')
    with pytest.raises(CatalogFileError, match=r"b.jsonl:3: wrong_type: 'artist_name'"):
        read_catalog_file(lines)
    headless = tmp_path / "c.csv"
    headless.write_text("id,name\n1,x\n")
    with pytest.raises(CatalogFileError, match="no 'track_id' column"):
        read_catalog_file(headless)


def test_catalogue_writes_waiting_for_redis_are_bounded() -> None:
    from stream.adapters import redis_store as store

    writer = store.RecoWriter(None, ttl_s=60, channel="c")  # type: ignore[arg-type]
    batch = catalog_commands("track:", {}, {f"t{i}": (1, i) for i in range(1000)}, 60)
    for _ in range(store.MAX_COMMANDS // len(batch) + 5):  # Redis down: nothing flushes
        writer.submit_commands(batch)
    assert len(writer.commands) == store.MAX_COMMANDS
    assert writer.dropped_commands > 0
    assert writer.commands[-1] == batch[-1]  # the newest are kept
