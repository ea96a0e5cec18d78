"""The sharded maps (stream.core.shards): a dict's and an OrderedDict's contract, the same
order as an OrderedDict below and at a cap, and no single table holding the large
per-listener and per-track maps of the processor (each growth rehashes ~1/64 of them)."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import pytest

from stream.config import load_settings
from stream.core.events import PlayEvent, encode_event
from stream.core.models.base import Interaction
from stream.core.models.factorization import ImplicitMF
from stream.core.recommender import Recommender
from stream.core.shards import NSHARDS, ShardedDict, ShardedLRU
from stream.processing.pipeline import Processor, Record


def test_sharded_dict_is_a_dict_by_contract() -> None:
    rng = random.Random(1)
    ref: dict[str, int] = {}
    got: ShardedDict[str, int] = ShardedDict()
    for i in range(20_000):
        key = f"k{rng.randrange(3000)}"
        op = rng.random()
        if op < 0.5:
            ref[key] = got[key] = i
        elif op < 0.6:
            assert got.setdefault(key, i) == ref.setdefault(key, i)
        elif op < 0.8:
            assert got.pop(key, None) == ref.pop(key, None)
        elif op < 0.9 and key in ref:
            del ref[key]
            del got[key]
        else:
            assert got.get(key) == ref.get(key) and got.get(key, -1) == ref.get(key, -1)
            assert (key in got) == (key in ref)
    assert dict(got.items()) == ref and len(got) == len(ref) and set(got) == set(ref)
    assert bool(got) and not ShardedDict()
    with pytest.raises(KeyError):
        got["absent"]
    with pytest.raises(KeyError):
        got.pop("absent")
    got.update({"a": 1}, b=2)
    got.update([("c", 3)])
    assert (got["a"], got["b"], got["c"]) == (1, 2, 3)
    got.clear()
    assert len(got) == 0 and list(got) == []


def _check_same(got: ShardedLRU[str, int], ref: OrderedDict[str, int]) -> None:
    assert list(got) == list(ref)
    assert len(got) == len(ref) and bool(got) == bool(ref)
    assert [got[k] for k in ref] == list(ref.values())


@pytest.mark.parametrize("keys", [3, 40, 2000])
def test_sharded_lru_keeps_an_ordered_dicts_order_below_and_at_a_cap(keys: int) -> None:
    """Random sets, touches, moves to either end, pops, deletes and drops of the least (and
    most) recent, and a capped touch: the same keys, values and order as an OrderedDict
    doing the same (what the maps did before), including which key a cap drops."""
    rng = random.Random(keys)
    ref: OrderedDict[str, int] = OrderedDict()
    got: ShardedLRU[str, int] = ShardedLRU()
    cap = max(2, keys // 2)
    for i in range(6000):
        key = f"u{rng.randrange(keys)}"
        op = rng.random()
        if op < 0.25:
            ref[key] = got[key] = i
        elif op < 0.5:  # OrderedDict: set, move_to_end, drop the oldest over the cap
            ref[key] = i
            ref.move_to_end(key)
            expected = ref.popitem(last=False)[0] if len(ref) > cap else None
            assert got.touch(key, i, cap) == expected
        elif op < 0.6 and key in ref:
            last = rng.random() < 0.7
            ref.move_to_end(key, last)
            got.move_to_end(key, last)
        elif op < 0.7:
            assert got.pop(key, None) == ref.pop(key, None)
        elif op < 0.75 and key in ref:
            del ref[key]
            del got[key]
        elif op < 0.85 and ref:
            assert got.drop_oldest() == ref.popitem(last=False)
        elif op < 0.88 and ref:
            last = rng.random() < 0.5
            assert got.popitem(last) == ref.popitem(last)
        else:
            assert got.get(key) == ref.get(key) and (key in got) == (key in ref)
        if i % 97 == 0:
            _check_same(got, ref)
    _check_same(got, ref)
    while ref:  # empties in the same order
        assert got.drop_oldest() == ref.popitem(last=False)
    assert len(got) == 0
    with pytest.raises(KeyError):
        got.drop_oldest()
    with pytest.raises(KeyError):
        got.popitem()


def test_sharded_lru_popitem_takes_the_right_end() -> None:
    lru: ShardedLRU[str, int] = ShardedLRU((f"k{i}", i) for i in range(500))
    lru.move_to_end("k7", last=False)
    lru.move_to_end("k3")
    assert lru.popitem(last=False) == ("k7", 7)
    assert lru.popitem() == ("k3", 3)
    assert lru.popitem(last=False) == ("k0", 0)
    assert list(lru)[:2] == ["k1", "k2"] and list(lru)[-1] == "k499"


def test_a_long_run_of_drops_keeps_the_front_heap_bounded() -> None:
    lru: ShardedLRU[str, int] = ShardedLRU()
    for i in range(50_000):
        if i % 3 == 0 and f"k{i - 3}" in lru:
            lru.move_to_end(f"k{i - 3}", last=False)  # a front entry pushed each time
        lru.touch(f"k{i}", i, 1000)
    assert len(lru) == 1000
    assert len(lru._fronts) <= 2 * NSHARDS + 1


def test_mf_listener_order_survives_the_checkpoint() -> None:
    """The MF listeners' LRU order is the checkpoint's: the same as the OrderedDict kept,
    and the same after a round trip (the format is unchanged: ids in that order)."""
    mf = ImplicitMF(n_factors=4, seed=0, max_users=300)
    ref: OrderedDict[str, None] = OrderedDict()
    rng = random.Random(3)
    for i in range(3000):
        user = f"u{rng.randrange(500)}"
        mf.learn_one(Interaction(user, f"t{rng.randrange(50)}", i))
        ref[user] = None
        ref.move_to_end(user)
        if len(ref) > 300:
            ref.popitem(last=False)
    assert list(mf.user_factors) == list(ref)
    manifest, arrays = mf.export_state()
    back = ImplicitMF.import_state(manifest, arrays)
    assert list(back.user_factors) == list(ref)
    assert all((back.user_factors[u] == mf.user_factors[u]).all() for u in ref)


def _junk(i: int, now: int) -> Record:
    user = f"j-ju{i}"
    ev = PlayEvent(user, f"j-jt{i}", now, 100_000, f"j-je{i}", artist_id=f"j-ja{i}",
                   context="playlist")
    return Record("plays", 0, i, user.encode(), encode_event(ev), now)


def test_the_processors_large_maps_are_sharded_evenly() -> None:
    """After 30,000 junk plays (a new listener and track each), every map that grows with
    hostile ids holds its keys in 64 tables, none over twice its share: one growth
    rehashes ~1/64 of the keys. Fails on a plain dict or OrderedDict (one table)."""
    settings = load_settings(env={}, file=None).replace(max_sessions=20_000)
    rec = Recommender(seed=0, max_users=25_000)
    table: ShardedDict[str, Any] = ShardedDict()
    proc = Processor(settings, rec, table, lambda w: None, lambda d: None,
                     defer_ranking=True)
    now = 1_700_000_000_000
    n = 30_000
    for start in range(0, n, 64):
        proc.process_batch([_junk(i, now) for i in range(start, min(n, start + 64))])
        while proc.sessions_over():
            proc.evict_sessions(1024)
    maps = {
        "session_order": proc.session_order, "mf.user_factors": rec.mf.user_factors,
        "vocabulary.index": rec.vocabulary.index, "artist_of": rec.artist_of,
        "similar_refreshed": proc.similar_refreshed,
    }
    for name, m in maps.items():
        shards = getattr(m, "shards", None)
        assert shards is not None and len(shards) == NSHARDS, name
        share = len(m) / NSHARDS
        assert max(map(len, shards)) <= 2 * share + 8, name
    assert len(proc.session_order) == 20_000 and len(rec.mf.user_factors) == 25_000
    assert len(rec.vocabulary.index) == n


def test_the_front_heap_stays_bounded_without_any_drop() -> None:
    """Seeding restored listeners as the least recent (move_to_end(last=False)) and forget
    churn push front entries with no drop to prune them (review15b: 200k entries)."""
    lru: ShardedLRU[str, None] = ShardedLRU()
    for i in range(20_000):
        lru[f"u{i}"] = None
        lru.move_to_end(f"u{i}", last=False)
    for i in range(20_000):
        del lru[f"u{i}"]
        lru[f"v{i}"] = None
    assert len(lru._fronts) <= 4 * NSHARDS
    assert list(lru)[:3] == ["v0", "v1", "v2"]


def test_the_artist_map_is_exported_in_catalogue_order_whatever_the_hash() -> None:
    """The checkpoint lists ``artist_of`` in the vocabulary's row order, then others by id
    (a ShardedDict iterates by ``hash``, which differs between processes)."""
    rec = Recommender(seed=0)
    proc = Processor(load_settings(env={}, file=None), rec, ShardedDict(), lambda w: None,
                     lambda d: None, defer_ranking=True)
    now = 1_700_000_000_000
    records = []
    for i in range(300):
        user, track = f"u{i % 7}", f"t{(i * 37) % 101}"
        ev = PlayEvent(user, track, now + i * 1000, 100_000, f"e{i}",
                       artist_id=f"a{(i * 37) % 101 % 13}")
        records.append(Record("plays", 0, i, user.encode(), encode_event(ev), now))
    proc.process_batch(records)
    rec.artist_of["zz-unplayed"] = "a0"
    rec.artist_of["aa-unplayed"] = "a1"
    _, arrays = rec.export_state()
    from stream.core.models._state import decode_strings

    tracks = decode_strings("t", arrays["artist_of.tracks.bytes"], arrays["artist_of.tracks.ends"])
    played = [t for t in rec.vocabulary.ids if t in rec.artist_of]
    assert tracks == [*played, "aa-unplayed", "zz-unplayed"]


def test_a_sharded_dicts_keys_view_is_a_keys_view_iterated_by_the_shards() -> None:
    """``list(table.keys())`` (the session table's keys_snapshot at 500k listeners) goes
    through the shards' own iteration, not KeysView's generator; the view stays a view."""
    d: ShardedDict[str, int] = ShardedDict((f"k{i}", i) for i in range(1000))
    keys = d.keys()
    assert list(keys) == list(d) and len(keys) == 1000 and "k5" in keys
    assert type(iter(keys)).__name__ == "chain"
    d["new"] = 1
    assert "new" in keys and len(keys) == 1001  # a live view
