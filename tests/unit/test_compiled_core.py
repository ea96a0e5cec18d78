"""The compiled (numba) hot path against plain-Python / numpy references."""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.core.models import _blend_kernels as _bk
from stream.core.models import _kernels as _k
from stream.core.models.base import Interaction
from stream.core.models.cooccurrence import SessionCooccurrence
from stream.core.models.popularity import DecayedPopularity
from stream.core.models.stan import best_order
from stream.core.recommender import VARIANTS, Recommender, SeenTracks, session_token
from stream.core.session import UserState, update_session
from stream.core.shards import ShardedDict
from stream.tools.datasets import load_events


def _reference_cooc(plays: list[tuple[str, tuple[str, ...]]], window: int, decay: float,
                    backward: float) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for track, history in plays:
        w = 1.0
        for prev in reversed(history[-window:]):
            if prev != track:
                rows[prev][track] += w
                rows[track][prev] += w * backward
            w *= decay
    return rows


def test_arena_matches_a_dict_of_dicts_through_moves_and_compactions() -> None:
    rng = random.Random(3)
    tracks = [f"t{i}" for i in range(300)]
    model = SessionCooccurrence(window=5, decay=0.7, backward=0.5, max_neighbours=10_000)
    plays: list[tuple[str, tuple[str, ...]]] = []
    history: list[str] = []
    for i in range(6000):
        track = tracks[min(int(rng.paretovariate(1.2)) - 1, 299)] if i % 3 else rng.choice(tracks)
        plays.append((track, tuple(history)))
        model.learn_one(Interaction("u", track, i, history=tuple(history)))
        history = (history + [track])[-5:]
    expected = _reference_cooc(plays, 5, 0.7, 0.5)
    ids = model._vocab.ids
    for src, neighbours in expected.items():
        row = model._vocab.index[src]
        idx, val = model.neighbours(row)
        got = {ids[int(d)]: float(v) for d, v in zip(idx, val, strict=True)}
        assert got.keys() == neighbours.keys()
        for dst, w in neighbours.items():
            assert got[dst] == pytest.approx(w, rel=1e-5)  # float32 weights, summed
    # rows moved many times: the arena holds holes, and compaction kept every list intact
    assert model._used >= int(model._cap.sum())


def test_a_full_row_keeps_its_heaviest_neighbours() -> None:
    model = SessionCooccurrence(window=1, backward=0.0, max_neighbours=2)
    for dst, times in (("b", 5), ("c", 1), ("d", 3), ("e", 2)):
        for i in range(times):
            model.learn_one(Interaction("u", dst, i, history=("a",)))
    model.learn_one(Interaction("u", "f", 99, history=("a",)))  # 5th neighbour: prune first
    idx, val = model.neighbours(model._vocab.index["a"])
    got = {model._vocab.ids[int(d)]: float(v) for d, v in zip(idx, val, strict=True)}
    assert got == {"b": 5.0, "d": 3.0, "f": 1.0}


def test_heavy_rows_are_rescaled_so_float32_weights_keep_their_ratios() -> None:
    # one pair played millions of times: float32 weights alone would stop adding 0.13
    model = SessionCooccurrence(window=10, decay=0.8, backward=0.0)
    history = tuple(f"h{i}" for i in range(9)) + ("a",)
    for i in range(20_000):
        model.learn_one(Interaction("u", "b", i, history=history))
    row = model._vocab.index["a"]
    idx, val = model.neighbours(row)
    assert float(model._total[row]) < 16384.0 * 1.01  # rescaled, not growing
    for h in range(9):  # every prev -> b share stays exact: its row holds one neighbour
        r = model._vocab.index[f"h{h}"]
        share = float(model.neighbours(r)[1][0]) / float(model._total[r])
        assert share == pytest.approx(1.0, rel=1e-3)  # (unscaled: 0.86 off at 3e6)
    scores = model.score_all(Interaction("v", history=("a",)))
    assert scores[model._vocab.index["b"]] == pytest.approx(1.0, rel=1e-3)


def test_a_nested_query_gets_its_own_scratch() -> None:
    model = SessionCooccurrence()
    model.learn_one(Interaction("u", "b", 1, history=("a",)))
    model.learn_one(Interaction("u", "c", 2, history=("a",)))
    anchors = model.anchors(("a",))
    with model.accumulate(anchors) as outer:
        inner = model.score_all(Interaction("v", history=("a",)))
        assert inner[model._vocab.index["b"]] == pytest.approx(0.5)
        assert outer.scratch.acc[model._vocab.index["b"]] == pytest.approx(0.5)
    again = model.score_all(Interaction("v", history=("a",)))
    np.testing.assert_allclose(again, inner)


def test_mf_step_is_the_numpy_update() -> None:
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(10, 8))
    user = rng.normal(size=8)
    rows = np.array([3, 7, 1])
    targets = np.array([1.0, 0.0, 0.0])
    lr, l2 = 0.1, 0.01
    items = factors[rows]
    err = targets - items @ user
    want_items = (1 - lr * l2) * items + lr * np.outer(err, user)
    want_user = (1 - lr * l2) * user + lr * (err @ items)
    _k.mf_step(factors, user, rows, targets, lr, l2)
    np.testing.assert_allclose(factors[rows], want_items, rtol=1e-12)
    np.testing.assert_allclose(user, want_user, rtol=1e-12)


def _trained(datasets_dir: Path, limit: int = 4000) -> tuple[Recommender, dict[str, UserState]]:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=limit)
    rec, states = Recommender(seed=2), {}
    for e in events:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    return rec, states


def _trained_with_artists(
    datasets_dir: Path, mf_candidates: bool, seed: int
) -> tuple[Recommender, dict[str, UserState]]:
    """``_trained``, with an artist per track (so the per-artist cap is exercised too)."""
    rec, states = _trained(datasets_dir)
    rec.mf_candidates = mf_candidates
    rng = random.Random(seed)
    rec.artist_of = ShardedDict((t, f"a{rng.randrange(40)}") for t in rec.vocabulary.ids)
    return rec, states


@pytest.mark.parametrize("mf_candidates", [False, True])
@pytest.mark.parametrize("variant", ["fixed", "popularity", "mf", "cooccurrence"])
def test_compiled_ranking_matches_the_reference_path(
    datasets_dir: Path, variant: str, mf_candidates: bool
) -> None:
    rec, states = _trained_with_artists(datasets_dir, mf_candidates, seed=1)
    now = 893_000_000_000
    compared = 0
    for state in list(states.values())[:120]:
        seen = SeenTracks(rec.vocabulary)
        for t in state.recent[:-3]:
            seen.add(t)
        fast = rec.recommend(state, 10, now, exclude=seen, variant=variant)
        # "fixed": the fixed-weight blend (variant "blend" is the learned one)
        weights = rec.blend_weights if variant == "fixed" else {variant: 1.0}
        blend = weights if variant == "fixed" else {variant: 1.0, "popularity": 1e-6}
        ref = rec._rank_reference(
            _query(state, now), 10, _banned(rec, state, set(seen)), weights, blend,
            rec.cooccurrence.anchors(tuple(state.recent)),
        )
        assert [r.score for r in fast] == pytest.approx([r.score for r in ref], abs=3e-6)
        same = {r.track_id: r.reason for r in ref}
        for r in fast:
            if r.track_id in same:
                assert r.reason == same[r.track_id]
        counts: dict[str, int] = defaultdict(int)
        for r in fast:
            counts[rec.artist_of[r.track_id]] += 1
            assert r.track_id not in seen and r.track_id not in state.recent
        assert max(counts.values(), default=0) <= 3
        compared += len(fast)
    assert compared >= 400  # ~49 listeners x 10


def _query(state: UserState, now: int) -> Interaction:
    return Interaction(user_id=state.user_id, ts_ms=now, history=tuple(state.recent),
                       session_position=state.session_plays)


def _banned(rec: Recommender, state: UserState, exclude: set[str]) -> list[str]:
    recent = state.recent[-rec.recent_filter :] if rec.recent_filter else []
    return [*recent, *exclude]


def test_seen_tracks_rows_follow_eviction(datasets_dir: Path) -> None:
    rec, states = _trained(datasets_dir, limit=3000)
    seen = SeenTracks(rec.vocabulary)
    picked = rec.vocabulary.ids[:50]
    for t in picked + ["never-heard-of"]:
        seen.add(t)
    assert len(seen) == 51 and "never-heard-of" in seen and set(seen) == {*picked,
                                                                          "never-heard-of"}
    assert sorted(seen.rows().tolist()) == list(range(50))
    rec.evict_tracks(200)
    index = rec.vocabulary.index
    assert sorted(seen.rows().tolist()) == sorted(index[t] for t in picked if t in index)
    # an id the catalogue learns later is banned from then on; rows stay a cheap view
    seen.add("brand-new")
    assert len(seen.rows()) == sum(t in index for t in picked)
    rec.vocabulary.add("brand-new")
    view = seen.rows()
    assert index["brand-new"] in view.tolist()
    seen.add(rec.vocabulary.ids[0])  # adding while a view exists is fine
    assert len(seen.rows()) == len(view) + (rec.vocabulary.ids[0] not in picked)


@pytest.mark.parametrize("mf_candidates", [False, True])
def test_ranking_many_listeners_at_once_matches_ranking_each(
    datasets_dir: Path, mf_candidates: bool
) -> None:
    rec, states = _trained_with_artists(datasets_dir, mf_candidates, seed=4)
    now = 893_000_000_000
    listeners = list(states.values())[:150]
    # a listener the MF has no factors for, and one whose recent tracks are all unknown
    listeners.append(UserState(user_id="new", recent=[listeners[0].recent[-1]]))
    listeners.append(UserState(user_id="stranger", recent=["never-seen-1", "never-seen-2"]))
    each = [rec.recommend(state, 10, now) for state in listeners]
    assert rec.recommend_many(listeners, 10, now) == each
    assert sum(len(r) for r in each) >= 400  # (many early MovieLens lists are short)
    assert rec.recommend_many(listeners[:1], 10, now) == each[:1]
    assert rec.recommend_many(listeners, 0, now) == [[] for _ in listeners]
    assert Recommender().recommend_many(listeners[:3], 10, now) == [[], [], []]


@pytest.mark.parametrize("mf_candidates", [False, True])
def test_component_ids_are_the_ids_of_each_variants_list(
    datasets_dir: Path, mf_candidates: bool
) -> None:
    """The live per-component quality ranks the single components together
    (Recommender.component_ids): the same track ids, in the same order, as recommend()."""
    rec, states = _trained_with_artists(datasets_dir, mf_candidates, seed=5)
    now = 893_000_000_000
    listeners = list(states.values())[:150]
    listeners.append(UserState(user_id="new", recent=[listeners[0].recent[-1]]))
    listeners.append(UserState(user_id="stranger", recent=["never-seen-1", "never-seen-2"]))
    variants = ("popularity", "mf", "cooccurrence", "fixed")
    compared = 0
    for state in listeners:
        want = [[r.track_id for r in rec.recommend(state, 10, now, variant=v)]
                for v in variants]
        assert rec.component_ids(state, 10, now, variants) == want
        compared += sum(map(len, want))
    assert compared >= 1500
    for state in listeners[:20] + listeners[-2:]:  # any subset, in any order, one call
        for subset in (("cooccurrence", "popularity"), ("mf",), ("cooccurrence",),
                       ("mf", "popularity"), ("fixed", "cooccurrence", "mf")):
            assert rec.component_ids(state, 10, now, subset) == [
                [r.track_id for r in rec.recommend(state, 10, now, variant=v)]
                for v in subset]
    rec.artist_of = ShardedDict()  # no artist cap
    state = listeners[0]
    assert rec.component_ids(state, 10, now, ("mf",)) == [
        [r.track_id for r in rec.recommend(state, 10, now, variant="mf")]]
    assert rec.component_ids(state, 0, now, ("mf", "fixed")) == [[], []]
    assert Recommender().component_ids(state, 10, now, ("mf", "popularity")) == [[], []]


def test_the_full_mf_scan_is_the_row_by_row_dot_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 4, 5, 257):
        factors = rng.normal(0, 0.3, (size + 7, 32)).astype(np.float32)
        user = rng.normal(0, 0.3, 32).astype(np.float32)
        want = _k._dot_rows(factors, user, np.arange(size))
        assert np.array_equal(_k._dot_all(factors, user, size), want)


def test_a_failing_batch_ranking_falls_back_to_one_listener_at_a_time() -> None:
    from stream.adapters.redis_store import PendingWrite
    from stream.config import load_settings
    from stream.core.events import PlayEvent
    from stream.processing.pipeline import Processor, Record

    class Flaky(Recommender):
        def rank_items_many(self, states, k, now_ms):  # type: ignore[no-untyped-def]
            raise RuntimeError("kernel bug")  # the processor's batched ranking

        def recommend(self, state, k, now_ms, **kw):  # type: ignore[no-untyped-def]
            if state.user_id == "bad":
                raise ValueError("this listener only")
            return super().recommend(state, k, now_ms, **kw)

    from stream.core.events import encode_event

    writes: list[PendingWrite] = []
    p = Processor(load_settings(env={}, file=None), Flaky(), {}, writes.append,
                  lambda d: None, clock=lambda: 1_700_000_100.0, defer_ranking=True)
    for i, user in enumerate(["u1", "bad", "u2"]):
        raw = encode_event(PlayEvent(user, f"t{i}", 1_700_000_000_000 + i, 200_000, f"e{i}"))
        p.process(Record("plays", 0, i, user.encode(), raw, None))
    assert p.rank_pending() == 3
    assert sorted(w.key for w in writes) == ["reco:u1", "reco:u2"]
    assert p.model_errors == 2  # the batch, then the one listener


def test_top_n_heap_keeps_the_n_best_with_ties_to_the_lower_row() -> None:
    """The kernels' top-n (a heap since session 7) against a sort by (key desc, row asc),
    NaN keys last, over random sizes, tie-heavy keys, NaN and -inf."""
    rng = np.random.default_rng(0)
    for t in range(2000):
        m, n = int(rng.integers(0, 300)), int(rng.integers(1, 60))
        rows = rng.permutation(1000)[:m].astype(np.int64)
        key = rng.integers(0, 5, m).astype(float) if t % 2 else rng.random(m)
        if t % 5 == 0 and m:
            key[rng.integers(0, m, 3)] = np.nan
        if t % 7 == 0 and m:
            key[rng.integers(0, m, 3)] = -np.inf
        order = sorted(range(m), key=lambda i: (-(-np.inf if np.isnan(key[i]) else key[i]),
                                                 rows[i]))
        expected = sorted(rows[order[:n]].tolist())
        assert sorted(_k._top_n(rows, key, n).tolist()) == expected, (t, m, n)



def test_top_unbanned_is_top_n_of_the_kept_entries() -> None:
    """The blend's per-source pick (a heap fed as the entries come) against ``_top_n`` of
    the entries ``blend_gather`` keeps (a positive score, an unbanned row): the same set,
    over random sizes, tie-heavy keys, zero, negative and NaN scores and bans."""
    rng = np.random.default_rng(5)
    for t in range(2000):
        m, n = int(rng.integers(0, 300)), int(rng.integers(1, 60))
        rows = rng.permutation(1000)[:m].astype(np.int64)
        vals = rng.integers(-1, 4, m).astype(float) if t % 2 else rng.random(m) - 0.1
        if t % 5 == 0 and m:
            vals[rng.integers(0, m, 3)] = np.nan
        ban = rng.random(1000) < (0.3 if t % 3 else 0.0)
        keep = (vals > 0) & ~ban[rows]
        out = np.full(n + 7, -9, dtype=np.int64)
        end = _bk._top_unbanned(rows, vals, ban, n, out, 7)
        expected = sorted(_k._top_n(rows[keep], vals[keep], n).tolist())
        assert sorted(out[7:end].tolist()) == expected and (out[:7] == -9).all(), (t, m, n)


def test_pop_top_is_top_set_or_defers_to_it() -> None:
    """``pop_top`` (trending's top set in the blend's compiled call) returns the set
    ``DecayedPopularity.top_set`` returns whenever it answers, and defers to it (False)
    where numpy's choice among weights tied at the cut decides -- over random weights,
    tie-heavy ones and bans that leave the kept set short."""
    rng = np.random.default_rng(4)
    answered = deferred = 0
    for t in range(400):
        pop = DecayedPopularity(half_life_ms=1e12)
        n_tracks = int(rng.integers(1, 400))
        plays = rng.integers(0, n_tracks, int(rng.integers(1, 3000)))
        for i, tr in enumerate(plays.tolist()):  # t % 3 == 0: every play at one time
            pop.learn_one(Interaction("u", f"t{tr}", 0 if t % 3 == 0 else i, skipped=False))
        size = len(pop._vocab)
        ban = np.zeros(size + int(rng.integers(0, 5)), dtype=np.bool_)
        ban[rng.integers(0, size, int(rng.integers(0, size + 1)))] = True
        n = int(rng.integers(1, 60))
        members, weights, _ = pop.ranking_inputs(size)
        rows, unique = _bk.pop_top(members, weights, ban, size, n)
        if unique:
            assert sorted(rows.tolist()) == sorted(pop.top_set(n, ban).tolist()), t
            answered += 1
        else:
            deferred += 1
    assert answered > 200 and deferred > 20


def _sources(rec: Recommender, state: UserState, now: int, seen: SeenTracks, compiled: bool
             ) -> tuple[np.ndarray, ...]:
    size = len(rec.vocabulary)
    recent = rec._recent_rows(state)
    if compiled:  # the bans, the top set and the last-play scores inside the call
        return rec._blend_sources(state, now, recent, seen, size)
    ban_rows = rec._banned_rows(state, seen, recent)
    ban = rec._ban_buffer(size)
    ban[ban_rows] = True
    try:
        session = rec._session_items(state)
        n = rec.blend_candidates
        cands, comp, lead = rec._blend_sources_python(
            state, session, rec.session_knn.score(session, session_token(state), now),
            rec._artist_source(state), rec._own_source(state), rec.popularity.top_set(n, ban),
            ban, size)
    finally:
        ban[ban_rows] = False
    assert not ban.any()
    return cands, comp, lead, rec._last_play_scores(state, cands, size)


_NO_LAMBDAS = {"lambda_position": None, "lambda_recency_ms": None, "lambda_distance": None}


@pytest.mark.parametrize("settings", [
    {}, {"repeats": 200}, {"session_scope": "recent"}, {"stan_params": _NO_LAMBDAS},
    {"stan_params": {"query_window": 1}}, {"stan_params": {"query_window": 40}},
    {"blend_cooc_window": 5}, {"blend_cooc_window": 0},
], ids=["default", "repeats", "recent-scope", "stan-no-lambdas", "stan-window-1",
        "stan-window-40", "long-view-shorter", "long-view-off"])
def test_compiled_blend_candidates_match_the_python_queries(
    datasets_dir: Path, settings: dict[str, Any]
) -> None:
    """``blend_collect`` (one compiled call: the bans, trending's top set, co-occurrence's
    two views -- in one pass by default, in two when the long view is shorter or off --,
    SR, STAN through the position table, the gathering, the last play's scores) against
    the models' own queries, under the settings that change the STAN query (its window,
    its weights), the session the queries read and the long co-occurrence view."""
    repeats = settings.get("repeats", 0)
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=3000)
    rec, states = Recommender(seed=2, **settings), {}
    rng = random.Random(3)
    for e in events:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    rec.artist_of = ShardedDict((t, f"a{rng.randrange(40)}") for t in rec.vocabulary.ids)
    rec.tracks_of = defaultdict(list)
    for t, a in rec.artist_of.items():
        rec.tracks_of[a].append(t)
    now = 893_000_000_000
    checked, by_source = 0, np.zeros(6)
    for state in list(states.values())[:80]:
        seen = SeenTracks(rec.vocabulary)
        for t in state.recent[:-5]:
            seen.add(t)
        fast = _sources(rec, state, now, seen, compiled=True)
        assert not rec._ban_buffer(len(rec.vocabulary)).any()  # the bans left as found
        ref = _sources(rec, state, now, seen, compiled=False)
        for a, b in zip(fast, ref, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        checked += 1
        by_source += (fast[1] > 0).sum(axis=0)
    assert checked >= 30
    # every source proposed candidates (own history only with repeats, the long view
    # only when on)
    assert (by_source[[0, 1, 2, 3]] > 100).all() and (by_source[4] > 100) == bool(repeats)
    assert (by_source[5] > 100) == (settings.get("blend_cooc_window", 30) > 0)


def test_blend_log_and_last_play_features_match_the_python_reference(
    datasets_dir: Path
) -> None:
    """Session 16's features in the compiled ``blend_features``: ``log_*`` is
    ``blend.log_score`` of the normalised scores; ``*_last`` are the SR and co-occurrence
    scores of a query from the last play alone (the models' own ``accumulate``), scaled to
    their maximum and reciprocal-ranked like the other sources."""
    from stream.core.models.blend import FEATURES, log_score

    col = {f: i for i, f in enumerate(FEATURES)}
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=3000)
    rec, states = Recommender(seed=2), {}
    for e in events:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    now = 893_000_000_000
    checked, nonzero = 0, np.zeros(4)
    for state in list(states.values())[:60]:
        rows, X, _comp, _lead = rec._blend_candidates(state, now, ())
        if not len(rows):
            continue
        for name, src in (("log_cooc", "s_cooc"), ("log_stan", "s_stan"), ("log_sr", "s_sr"),
                          ("log_cooc_long", "s_cooc_long")):
            np.testing.assert_array_equal(X[:, col[name]], log_score(X[:, col[src]]))
        for j, (model, name) in enumerate(((rec.rules, "sr"), (rec.cooccurrence, "cooc"))):
            with model.accumulate(model.anchors(state.recent, window=1)) as touched:
                raw = touched.scratch.acc[rows].copy()
            want = np.zeros((len(rows), 2))
            _k._scale_into(raw, want, 0)
            order = np.argsort(-raw, kind="stable")
            want[order, 1] = 1.0 / (np.arange(len(rows)) + 1)
            want[raw <= 0, 1] = 0.0
            np.testing.assert_array_equal(X[:, col[f"s_{name}_last"]], want[:, 0])
            np.testing.assert_array_equal(X[:, col[f"r_{name}_last"]], want[:, 1])
            nonzero[2 * j] += (raw > 0).sum()
        nonzero[[1, 3]] += (X[:, [col["log_sr"], col["log_cooc"]]] > 0).sum(axis=0)
        checked += 1
    assert checked >= 30 and (nonzero > 100).all()
    # the dense scratch is left all zero
    assert not rec.__dict__["_last_dense"].any()


def test_stan_best_order_is_the_stable_sort_prefix() -> None:
    rng = np.random.default_rng(5)
    for n, k in ((0, 3), (5, 10), (200, 10), (1000, 100), (50, 50)):
        sims = np.round(rng.random(n), 1) * (rng.random(n) > 0.3)  # many ties and zeros
        want = np.argsort(-sims, kind="mergesort")[:k]
        np.testing.assert_array_equal(best_order(sims, k), want)


def test_reciprocal_ranks_of_the_positive_scores_only() -> None:
    rng = np.random.default_rng(6)
    for n in (0, 1, 7, 150):
        values = np.round(rng.random(n), 1) - 0.3 * (rng.random(n) > 0.5)
        for signed in (False, True):
            out = np.full((n, 3), 9.0)
            _k._recip_rank_into(values, out, 1, signed)
            order = np.argsort(-values, kind="mergesort")
            want = np.zeros(n)
            for j, i in enumerate(order):
                want[i] = 1.0 / (j + 1) if signed or values[i] > 0.0 else 0.0
            np.testing.assert_array_equal(out[:, 1], want)
            assert (out[:, [0, 2]] == 9.0).all()


def test_desc_order_is_the_stable_mergesort() -> None:
    rng = np.random.default_rng(7)
    # the run length, its neighbours and the merge passes' uneven tails
    for n in (0, 1, 2, 15, 16, 17, 30, 33, 48, 100, 129, 256, 257, 600):
        values = np.round(rng.normal(size=n), 1)  # ties, negatives and zeros
        if n > 5:
            values[3] = -0.0
        idx = np.arange(n)[rng.random(n) > 0.2]
        want = idx[np.argsort(-values[idx], kind="mergesort")]
        np.testing.assert_array_equal(_k._desc_order(values, idx), want)
    values = np.array([1.0, np.nan, 2.0, 1.0])
    idx = np.arange(4)
    np.testing.assert_array_equal(_k._desc_order(values, idx),
                                  idx[np.argsort(-values, kind="mergesort")])


def test_counted_order_is_the_stable_argsort() -> None:
    """desc_order_all (ranks by counting up to _COUNT_MAX values, else _desc_order) and
    _stable_ranks against numpy's stable argsort: ties, -0.0, NaN, both sides of the cap."""
    rng = np.random.default_rng(11)
    for t in range(400):
        m = int(rng.integers(0, 2 * _k._COUNT_MAX))
        values = np.round(rng.normal(size=m), int(rng.integers(0, 3)))
        if m > 5 and t % 3 == 0:
            values[2] = -0.0
        want = np.argsort(-values, kind="stable")
        if m <= _k._COUNT_MAX:
            ranks = np.empty(m, dtype=np.int64)
            ranks[want] = np.arange(m)
            np.testing.assert_array_equal(_k._stable_ranks(values), ranks)
        if m > 5 and t % 7 == 0:
            values[4] = np.nan
            want = np.argsort(-values, kind="stable")
        np.testing.assert_array_equal(_k.desc_order_all(values), want)


def test_blend_bans_never_write_past_the_ban_flags() -> None:
    """``blend_collect`` sets and clears the bans itself (``_set_bans``, no bounds checks):
    an ``exclude`` whose rows lie beyond this catalogue (a ``SeenTracks`` of another
    recommender's vocabulary) must not write past the ban flags. Before session 17 numpy
    raised IndexError there; here the ban buffer is a view of a larger array, so a write
    past its end shows (review17a)."""
    from stream.core.events import PlayEvent

    def trained(n_tracks: int, n: int) -> tuple[Recommender, dict[str, UserState]]:
        rec, states = Recommender(seed=0), {}
        for i in range(n):
            e = PlayEvent(f"u{i % 3}", f"t{(i * 7) % n_tracks}", 1_700_000_000_000 + i * 1000,
                          200_000, f"e{i}")
            up = update_session(states.get(e.user_id), e)
            rec.learn_one(up, e)
            states[e.user_id] = up.state
        return rec, states

    small, states = trained(40, 300)
    big, _ = trained(500, 1000)
    foreign = SeenTracks(big.vocabulary)
    foreign.add("t499")
    assert int(foreign.rows()[0]) >= 64
    backing = np.ones(4096, dtype=bool)
    backing[:64] = False
    small.__dict__["_ban"] = backing[:64]
    # the learned blend (blend_collect), the compiled single queries (rank_query) and the
    # session kernels (rank_stan / rank_sr, review17b), through recommend() and the
    # replay's component_ids()
    for variant in VARIANTS:
        for call in ("recommend", "component_ids"):
            if call == "recommend":
                small.recommend(states["u1"], 10, 1_700_000_400_000, exclude=foreign,
                                variant=variant)
            else:
                small.component_ids(states["u1"], 10, 1_700_000_400_000, (variant,),
                                    exclude=foreign)
            assert backing[64:].all(), (variant, call, np.flatnonzero(~backing[64:]) + 64)
            assert not backing[:64].any(), (variant, call)  # and the bans were cleared


def test_learned_ranking_glue_feeds_the_models_own_scores(datasets_dir: Path) -> None:
    """The Python glue of a learned ranking (``Recommender._blend_inputs``): MF's scores of
    the candidates are ``ImplicitMF.score_all``'s at their rows, and the skip feature is
    ``SkipClassifier.predict_many`` of the listener's query (time, session position,
    recent skip rate) -- so a wrong row, position or skip rate fails here, not only in a
    replay's numbers."""
    from stream.core.models.blend import FEATURES
    from stream.core.recommender import _recent_skip_rate

    skip_col = FEATURES.index("skip")
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=3000)
    rec, states = Recommender(seed=2), dict[str, UserState]()
    contexts = ("car", "gym", "radio", None)  # half the plays name a listening context
    for i, e in enumerate(events):
        e = dataclasses.replace(e, context=contexts[(i // 2) % 4] if i % 2 else None)
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
        if i % 3 == 0:  # MovieLens has no skips: give some listeners a skip history
            states[e.user_id].recent_skipped[-1] = True
    weights = rec.skip.classifier._weights
    assert min(abs(weights["position"]), abs(weights["recent_skip_rate"])) > 1e-4
    assert min(abs(weights.get(f"context={c}", 0.0)) for c in ("radio", "other")) > 1e-4
    now = 893_000_000_000
    checked = other_position = with_context = 0
    for state in list(states.values())[:80]:
        cands, _comp, _lead, _X, args = rec._blend_inputs(state, now, ())
        if not len(cands):
            continue
        mf = args[2]
        full = rec.mf.score_all(Interaction(state.user_id, history=tuple(state.recent)))
        assert full is not None
        np.testing.assert_allclose(mf, full[cands], rtol=1e-5, atol=1e-6)
        rows, X, _c, _l = rec._blend_candidates(state, now, ())
        np.testing.assert_array_equal(rows, cands)
        # the skip model scores the next play in the last play's context
        query = Interaction(state.user_id, ts_ms=now, session_position=state.session_plays,
                            recent_skip_rate=_recent_skip_rate(state),
                            context=state.last_context or None)
        want = rec.skip.predict_many(
            query, {"popularity": rec.popularity.score_rows(cands), "mf": mf})
        np.testing.assert_allclose(X[:, skip_col], want, rtol=0, atol=1e-12)
        checked += 1
        other_position += state.session_plays != state.plays_total
        with_context += bool(state.last_context)
    assert checked >= 30 and other_position >= 5 and with_context >= 5


def test_blend_recent_artist_weighs_the_artists_of_the_recent_plays(datasets_dir: Path) -> None:
    """Session 17's ``recent_artist``: a candidate's artist's share of the listener's last
    ARTIST_WINDOW plays with a known artist, each weighted ARTIST_DECAY ** (plays since)
    (plain Python here), 0 without a known artist; ``same_artist`` is still the last
    play's artist."""
    from stream.core.models.blend import FEATURES
    from stream.core.recommender import ARTIST_DECAY, ARTIST_WINDOW
    from stream.tools.datasets import load_sessionrec

    col = {f: i for i, f in enumerate(FEATURES)}
    events, _ = load_sessionrec(datasets_dir / "30music-200ks", limit=6000)
    rec, states = Recommender(seed=1), {}
    for e in events:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    now = events[-1].ts_ms
    checked = shared = partial = 0
    for state in sorted(states.values(), key=lambda s: -len(s.recent))[:80]:
        rows, X, _comp, _lead = rec._blend_candidates(state, now, ())
        if not len(rows):
            continue
        plays = [rec.artist_of.get(t) for t in state.recent[-ARTIST_WINDOW:]][::-1]
        weights = [ARTIST_DECAY ** i for i in range(len(plays))]
        total = sum(w for w, a in zip(weights, plays, strict=True) if a is not None)
        last = rec.artist_of.get(state.recent[-1])
        for i, r in enumerate(rows.tolist()):
            a = rec.artist_of.get(rec.vocabulary.ids[r])
            mass = sum(w for w, b in zip(weights, plays, strict=True) if a is not None and b == a)
            want = mass / total if total else 0.0
            assert X[i, col["recent_artist"]] == pytest.approx(want, rel=1e-12, abs=1e-15)
            assert X[i, col["same_artist"]] == float(a is not None and a == last)
            shared += want > 0
            partial += 0 < want < 0.5 and a != last
        checked += 1
    assert checked >= 50 and shared > 100 and partial > 50
