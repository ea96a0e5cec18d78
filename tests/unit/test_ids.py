"""The shared-ids cache (stream.core.ids) and its use in parsing and restores."""

from __future__ import annotations

import sys
from typing import Any

import orjson
import pytest

from stream.core.events import PlayEvent, parse_event
from stream.core.ids import ID_CACHE_CAP, IDS, IdCache
from stream.core.shards import MASK, NSHARDS


def fresh(text: str) -> str:
    """An equal string built at run time: a new object, not interned."""
    return "".join(list(text))


def test_the_first_string_given_is_the_one_returned() -> None:
    cache = IdCache(1024)
    first = fresh("track-1")
    again = fresh("track-1")
    assert first is not again
    assert cache.canonical(first) is first
    assert cache.canonical(again) is first
    assert cache.canonical(fresh("track-2")) is not first
    assert len(cache) == 2


def test_a_table_at_its_share_is_cleared_and_only_that_table() -> None:
    cache = IdCache(NSHARDS * 4)  # 4 ids per table
    assert cache.share == 4
    same_table = [t for t in (f"id-{i}" for i in range(10_000)) if hash(t) & MASK == 0][:5]
    other = fresh("elsewhere")
    while hash(other) & MASK == 0:
        other += "x"
    kept = cache.canonical(other)
    firsts = [cache.canonical(fresh(t)) for t in same_table[:4]]
    assert len(cache.tables[0]) == 4 and cache.clears == 0
    assert all(cache.canonical(fresh(t)) is f for t, f in zip(same_table, firsts, strict=False))
    cache.canonical(same_table[4])  # the fifth id of table 0: the table is cleared first
    assert cache.clears == 1
    assert len(cache.tables[0]) == 1
    assert cache.canonical(fresh(same_table[0])) is not firsts[0]  # forgotten: a new copy
    assert cache.canonical(fresh(same_table[0])) == same_table[0]  # still equal
    assert cache.canonical(fresh(other)) is kept  # other tables untouched


def test_the_cache_never_holds_more_than_its_cap() -> None:
    cache = IdCache(NSHARDS * 16)
    for i in range(20_000):
        cache.canonical(f"junk-{i}")
        assert len(cache.tables[hash(f"junk-{i}") & MASK]) <= 16
    assert len(cache) <= NSHARDS * 16
    assert cache.clears > 0


def test_a_cap_below_one_per_table_is_refused() -> None:
    with pytest.raises(ValueError, match="cap"):
        IdCache(NSHARDS - 1)
    assert IDS.share == ID_CACHE_CAP // NSHARDS


NOW = 1_700_000_000_000


def _play(**fields: object) -> bytes:
    base: dict[str, object] = {"user_id": "u", "track_id": "t", "ts": 1_700_000_000_000,
                               "ms_played": 1000}
    base.update(fields)
    return orjson.dumps(base)


def test_parsed_ids_are_shared_but_not_interned() -> None:
    """Two plays' equal ids are one object (as with sys.intern), and that object is not in
    the interpreter's interned-strings table: interning an equal fresh string returns the
    fresh one."""
    user, track, artist, context = (
        "listener-ids-" + str(id(object())), "track-ids-x1", "artist-ids-x1", "ctx-ids-x1")
    a = parse_event(_play(user_id=user, track_id=track, artist_id=artist, context=context,
                          event_id="ev-ids-1"), now_ms=NOW)
    b = parse_event(_play(user_id=user, track_id=track, artist_id=artist, context=context,
                          event_id="ev-ids-2"), now_ms=NOW)
    assert isinstance(a, PlayEvent) and isinstance(b, PlayEvent)
    for name in ("user_id", "track_id", "artist_id", "context"):
        assert getattr(a, name) is getattr(b, name), name
        probe = fresh(getattr(a, name))
        assert sys.intern(probe) is probe, name  # the parsed string was not interned
        assert sys.intern(probe) is not getattr(a, name), name
    # event ids are unique per play: neither interned nor kept in the cache
    event_id = a.event_id
    assert event_id is not None
    assert IDS.tables[hash(event_id) & MASK].get(event_id) is None
    probe = fresh(event_id)
    assert sys.intern(probe) is probe


def test_restored_ids_are_the_parsed_ones() -> None:
    """A listener restored from the changelog shares its track ids with live plays."""
    from stream.core.session import UserState

    track = fresh("track-restored-ids-7")
    play = parse_event(_play(track_id=track), now_ms=NOW)
    assert isinstance(play, PlayEvent)
    live = play.track_id
    restored = UserState.from_dict({"user_id": "u9", "recent": [fresh(track)]})
    assert restored.recent[0] is live
    probe = fresh(track)
    assert sys.intern(probe) is probe


def test_session_ids_and_long_ids_are_not_kept_shared() -> None:
    """Session ids live only while their session does, and the cap counts ids, not bytes:
    neither may fill the tables (review15c: 256-character session ids, ~1.1 KB a play)."""
    from stream.core.events import check_id, parse_event
    from stream.core.ids import IDS, SHARED_ID_MAX_LEN

    before = len(IDS)
    for i in range(200):
        raw = (b'{"user_id":"sid-u","track_id":"sid-t","ts":1700000000000,"ms_played":1000,'
               b'"session_id":"sid-' + f"{i:04d}".encode() + b'"}')
        event = parse_event(raw, now_ms=1_700_000_000_000)
        assert getattr(event, "session_id", None) is not None
    assert len(IDS) - before <= 2  # the user and the track, not 200 session ids
    long_id = "L" * (SHARED_ID_MAX_LEN + 1)
    assert check_id(long_id, "x") is long_id
    assert long_id not in IDS.tables[hash(long_id) & (len(IDS.tables) - 1)]


def test_the_inlined_lookup_clears_a_full_table(monkeypatch: Any) -> None:
    """check_id's inlined copy of IdCache.canonical bounds its table as the method does."""
    import stream.core.events as events
    from stream.core.ids import IDS

    monkeypatch.setattr(events, "_ID_SHARE", 2)
    ids = [f"inl-{i}" for i in range(4000)]
    for text in ids:
        events.check_id(text, "x")
    assert all(len(t) <= 2 for t in IDS.tables)  # each table cleared past 2 ids
