"""Bounded catalogue: evicting the least popular tracks keeps every model consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.core.events import PlayEvent
from stream.core.recommender import Recommender
from stream.core.session import UserState, update_session
from stream.tools.datasets import load_events


def learn(rec: Recommender, events: list[PlayEvent], states: dict[str, UserState]) -> None:
    for e in events:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state


def test_evict_keeps_the_most_popular_and_models_consistent(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=3000)
    rec, states = Recommender(seed=1), {}
    learn(rec, events, states)
    before = rec.catalogue_size()
    weights = dict(zip(rec.vocabulary.ids, rec.popularity.weights().tolist(), strict=True))
    evicted = rec.evict_tracks(200)
    assert evicted == before - 200 and rec.catalogue_size() == 200
    kept = set(rec.vocabulary.ids)
    cutoff = min(weights[t] for t in kept)
    assert all(weights[t] <= cutoff for t in weights if t not in kept)
    assert rec.vocabulary.index == {t: i for i, t in enumerate(rec.vocabulary.ids)}
    assert len(rec.popularity.weights()) == 200
    assert all(0 <= r < 200 for r in rec.cooccurrence.rows_with_neighbours().tolist())
    for row in rec.cooccurrence.rows_with_neighbours().tolist():
        neighbours, _ = rec.cooccurrence.neighbours(row)
        assert all(0 <= int(d) < 200 for d in neighbours)
    # it keeps learning and recommending (evicted ids in histories are just unknown)
    learn(rec, load_events(datasets_dir / "movielens-100k", "movielens", limit=4000)[3000:], states)
    for state in list(states.values())[:50]:
        recs = rec.recommend(state, 10, events[-1].ts_ms)
        assert len({r.track_id for r in recs}) == len(recs)
        assert all(r.track_id in rec.vocabulary.index for r in recs)
    assert Recommender.restore(rec.snapshot()).catalogue_size() == rec.catalogue_size()


def test_evict_is_a_no_op_under_the_bound() -> None:
    rec = Recommender()
    up = update_session(None, PlayEvent("u", "t", 1_700_000_000_000, 1000, "e"))
    rec.learn_one(up)
    assert rec.evict_tracks(10) == 0 and rec.catalogue_size() == 1


def _per_track(rec: Recommender) -> dict[str, tuple[float, tuple[float, ...], dict[str, float],
                                                    float]]:
    """Each track's learned state, by id: popularity weight, MF factors, co-occurrence
    neighbours (id -> weight) and row total."""
    ids = rec.vocabulary.ids
    weights = rec.popularity.weights()
    factors = rec.mf.factors()
    _, _, _, totals, _, _ = rec.cooccurrence.arena()
    out = {}
    for row, track in enumerate(ids):
        nbr, val = rec.cooccurrence.neighbours(row)
        out[track] = (
            float(weights[row]),
            tuple(factors[row].tolist()),
            {ids[int(d)]: float(v) for d, v in zip(nbr.tolist(), val.tolist(), strict=True)},
            float(totals[row]) if row < len(totals) else 0.0,
        )
    return out


def test_evict_moves_state_with_each_kept_track_and_forgets_the_evicted(
    datasets_dir: Path,
) -> None:
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:4000]
    rec, states = Recommender(seed=3), {}
    learn(rec, events, states)
    before = _per_track(rec)
    artists_before = dict(rec.artist_of)
    told: list[str] = []
    keep = rec.catalogue_size() // 2
    evicted = rec.evict_tracks(keep, on_evicted=told.extend)
    gone = set(before) - set(rec.vocabulary.ids)
    assert evicted == len(gone) == len(told) and set(told) == gone
    assert rec.catalogue_size() == keep == len(rec.vocabulary.ids)
    assert rec.vocabulary.index == {t: i for i, t in enumerate(rec.vocabulary.ids)}
    assert not gone & set(rec.artist_of)
    assert {t: a for t, a in artists_before.items() if t not in gone} == rec.artist_of
    after = _per_track(rec)
    for track, (weight, factors, neighbours, total) in after.items():
        old_weight, old_factors, old_neighbours, old_total = before[track]
        assert weight == old_weight and factors == old_factors and total == old_total
        # evicted neighbours leave the list; the others keep their weights, in order
        assert neighbours == {t: v for t, v in old_neighbours.items() if t not in gone}
    # the popularity top set and the MF negative pool name live rows only
    assert all(0 <= r < keep for r in rec.popularity.ranking_inputs(keep)[0].tolist())
    assert all(0 <= r < keep for r in rec.mf._pool)
    # learning goes on: new tracks take rows from `keep` on, with fresh state
    learn(rec, load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[4000:], states)
    assert rec.vocabulary.index == {t: i for i, t in enumerate(rec.vocabulary.ids)}
    for state in list(states.values())[:30]:
        recs = rec.recommend(state, 10, events[-1].ts_ms)
        assert all(r.track_id in rec.vocabulary.index for r in recs)
    assert all(r.track_id not in gone or r.track_id in rec.vocabulary.index
               for r in rec.similar(rec.vocabulary.ids[0], 10))


def test_similar_lists_after_an_eviction_match_a_fresh_computation(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:3000]
    rec, states = Recommender(seed=5), {}
    learn(rec, events[:2000], states)
    seed_track = rec.vocabulary.ids[0]
    rec.similar(seed_track, 10)  # the norms cache exists now
    learn(rec, events[2000:], states)  # new tracks since, and moved factors
    rec.evict_tracks(rec.catalogue_size() * 2 // 3)
    for _ in range(3):  # the rolling refresh has caught up with every row
        got = rec.similar(rec.vocabulary.ids[0], 10)
    fresh = Recommender.restore(rec.snapshot())  # no norms cache: computed from scratch
    want = fresh.similar(rec.vocabulary.ids[0], 10)
    assert [r.track_id for r in got] == [r.track_id for r in want]
    assert all(abs(a.score - b.score) < 1e-9 for a, b in zip(got, want, strict=True))


def test_eviction_moves_the_cached_factor_norms_with_their_tracks(
    datasets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import stream.core.recommender as recommender_module

    monkeypatch.setattr(recommender_module, "_NORM_SLICE", 7)  # a partial rolling refresh
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:3000]
    rec, states = Recommender(seed=5), {}
    learn(rec, events[:2000], states)
    rec.similar(rec.vocabulary.ids[0], 10)
    learn(rec, events[2000:], states)  # rows the cache has not seen yet
    cached = rec.__dict__["_norms"][1]
    factors = rec.mf.factors()
    expected = {t: float(cached[r]) if r < len(cached) else float(np.linalg.norm(factors[r]))
                + 1e-12 for r, t in enumerate(rec.vocabulary.ids)}
    rec.evict_tracks(rec.catalogue_size() * 2 // 3)
    generation, moved, _ = rec.__dict__["_norms"]
    assert generation == rec.vocabulary.generation and len(moved) == rec.catalogue_size()
    for row, track in enumerate(rec.vocabulary.ids):
        assert abs(moved[row] - expected[track]) < 1e-6


def _old_item_norms(rec: Recommender, cache: dict) -> object:
    """``Recommender._item_norms`` as it was before session 16 (np.linalg.norm, a fresh
    array per growth), on its own cache: the kept-buffer version must match it bit for bit."""
    import numpy as np

    from stream.core import recommender as recommender_module

    factors = rec.mf.factors()
    n = len(rec.vocabulary)
    cached = cache.get("_norms")
    if cached is None or cached[0] != rec.vocabulary.generation or len(cached[1]) > n:
        norms = np.linalg.norm(factors[:n], axis=1) + 1e-12
        cache["_norms"] = (rec.vocabulary.generation, norms, 0)
        return norms
    _, norms, pos = cached
    if len(norms) < n:
        norms = np.concatenate((norms, np.linalg.norm(factors[len(norms) : n], axis=1) + 1e-12))
    end = min(pos + recommender_module._NORM_SLICE, n)
    norms[pos:end] = np.linalg.norm(factors[pos:end], axis=1) + 1e-12
    cache["_norms"] = (rec.vocabulary.generation, norms, 0 if end >= n else end)
    return norms


def test_kept_norm_buffers_give_linalg_norms_bit_for_bit(
    datasets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The norms "more like this" uses are computed into kept buffers (no temporaries of
    the catalogue's size per call): the same float32 bits as ``np.linalg.norm`` through
    the whole rolling schedule, with rows added between calls and a partial slice."""
    import numpy as np

    import stream.core.recommender as recommender_module

    monkeypatch.setattr(recommender_module, "_NORM_SLICE", 37)
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:3000]
    rec, states, cache = Recommender(seed=2), {}, {}
    for lo in range(0, 3000, 250):
        learn(rec, events[lo : lo + 250], states)
        for _ in range(3):
            got = rec._item_norms()
            want = _old_item_norms(rec, cache)
            assert got.dtype == want.dtype and np.array_equal(got, want)  # type: ignore[attr-defined]
            assert rec.__dict__["_norms"][2] == cache["_norms"][2]
    buf = rec.__dict__["_norm_buf"]
    assert len(buf) >= rec.catalogue_size() and np.shares_memory(got, buf)
    zero = np.zeros((5, 4), dtype=np.float32)  # an all-zero row: 1e-12, as linalg.norm's
    out = np.empty(5, dtype=np.float32)
    rec._norms_into(zero, 0, 5, out)
    assert np.array_equal(out, np.linalg.norm(zero, axis=1) + 1e-12)


def test_the_eviction_in_steps_is_the_same_eviction_in_small_slices(datasets_dir: Path) -> None:
    """The worker runs an eviction as ``eviction_steps`` (slices on its event loop, the
    compiled arena passes in a thread): the result is the whole ``evict_tracks``'s, and
    the GIL-holding work comes in many slices, not one block."""
    import threading

    import stream.core.models._vocab as vocab

    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:4000]
    whole, sliced = Recommender(seed=3), Recommender(seed=3)
    learn(whole, events, {})
    learn(sliced, events, {})
    keep = whole.catalogue_size() // 2
    told: list[str] = []
    n_whole = whole.evict_tracks(keep)
    old_slice = vocab._SLICE
    vocab._SLICE = 16  # small slices, so that a small catalogue still gives many
    try:
        steps = sliced.eviction_steps(keep, on_evicted=told.extend)
        slices, compiled, threads = 0, 0, set()
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                n_sliced = done.value
                break
            if step is None:
                slices += 1
            else:  # a compiled pass: run it in another thread, as the worker does
                compiled += 1
                t = threading.Thread(target=lambda s=step: (threads.add(threading.get_ident()),
                                                            s()))
                t.start()
                t.join()
    finally:
        vocab._SLICE = old_slice
    assert n_sliced == n_whole == len(told)
    assert compiled == 4  # the co-occurrence and rules arenas, session-kNN sessions and arena
    assert threading.get_ident() not in threads
    assert slices >= 2 * n_whole // 16  # the dictionary work alone: one slice per 16 ids
    assert sliced.vocabulary.ids == whole.vocabulary.ids
    assert _per_track(sliced) == _per_track(whole)
    assert sliced.artist_of == whole.artist_of
