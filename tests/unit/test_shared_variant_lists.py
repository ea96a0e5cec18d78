"""The all-variant ranking's shared queries (``Recommender._shared_rows``): the learned
blend's collection call (:func:`_blend_kernels.blend_collect_variants`) returns the blend's
candidates exactly as :func:`_blend_kernels.blend_collect` does, and each other variant's
outcome or ranked rows exactly as that variant's own compiled call (``rank_stan``,
``rank_sr``, ``rank_components``); ``rank_components`` (one co-occurrence query for
``cooccurrence`` and ``fixed``) is four ``rank_query`` calls. On real logs, with bans from
an exclusion, ties at the cuts and (30Music) artists."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.core.models import _kernels as _k
from stream.core.models import _session_kernels as _sk
from stream.core.recommender import (
    _NO_FACTORS,
    VARIANTS,
    Recommender,
    SeenTracks,
    _VariantShare,
)
from stream.core.session import UserState, update_session
from stream.tools.datasets import load_events, load_sessionrec


def _share(rec: Recommender, state: UserState, k: int) -> tuple[_VariantShare, Any, Any]:
    """A request for every variant, as :meth:`Recommender._shared_rows` builds it."""
    size = len(rec.vocabulary)
    want, fixed = rec._component_variants(VARIANTS)
    flags, user = rec._component_args(state, k, want, fixed)
    _members, _pop_w, pop_total = rec.popularity.ranking_inputs(size)
    share = _VariantShare((
        True, True, True, 3 * k, pop_total or 1.0, *rec._knn_pair_scratch(size), *flags,
        pop_total, rec.mf.factors(), _NO_FACTORS if user is None else user,
        user is not None))
    return share, want, fixed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b)


def _check_play(rec: Recommender, before: UserState, now: int, history: Any, k: int,
                counts: Counter[str]) -> None:
    size = len(rec.vocabulary)
    share, want, fixed = _share(rec, before, k)
    shared = rec._learned_order(before, now, history, share)
    alone = rec._learned_order(before, now, history)
    assert (shared is None) == (alone is None)
    if shared is None or share.out is None:
        return
    assert _same(tuple(shared), tuple(alone))  # the blend: rows, scores, reasons, leads
    (stan, sknn, sr), lists = share.unpacked()
    # each session model's own compiled call, with the same bans and fill arguments
    recent = rec._recent_rows(before)
    assert np.array_equal(share.recent, recent)
    n_recent = len(before.recent)
    n_session = min(max(before.session_plays, 1), n_recent)
    members, pop_w, pop_total = rec.popularity.ranking_inputs(size)
    ban_rows = rec._banned_rows(before, history, recent)
    fill_args = (rec._ban_buffer(size), ban_rows, 3 * k, members, pop_w, pop_total or 1.0,
                 size)
    own_stan, own_sknn = rec._rank_knn(before, now, recent, n_session, 2, size, fill_args)
    own_sr = rec._rank_rules(recent, n_session, size, fill_args)
    for name, got, own in (("stan", stan, own_stan), ("sknn", sknn, own_sknn),
                           ("sr", sr, own_sr)):
        # the same status, rows, scores and fill (the ids need no model flags)
        assert _same(got[:3] + got[4:], own[:3] + own[4:]), name
        counts[f"status{got[0]}"] += 1
        if got[0] == _sk.NEED_MODEL_CUT:  # the fill given is trending's top set
            ban = rec._ban_buffer(size)
            ban[ban_rows] = True
            try:
                top = rec.popularity.top_set(3 * k, ban)
            finally:
                ban[ban_rows] = False
            assert sorted(got[4].tolist()) == sorted(top.tolist())
    # the single components and the fixed blend: rank_components' lists
    assert rec._component_rows(lists, want, fixed, k) == rec._compiled_rows(
        before, k, history, VARIANTS)
    assert not rec._ban_buffer(size).any()  # every call left the bans as found
    counts["checked"] += 1


def _replay(events: list[Any], exclude_seen: bool, k: int) -> Counter[str]:
    rec = Recommender(seed=0)
    states: dict[str, UserState] = {}
    seen: dict[str, SeenTracks] = {}
    counts: Counter[str] = Counter()
    for i, event in enumerate(events):
        update = update_session(states.get(event.user_id), event, max_recent=30)
        if update.duplicate:
            continue
        history: Any = seen.setdefault(event.user_id, SeenTracks(rec.vocabulary)) \
            if exclude_seen else ()
        if i % 2 == 0:
            _check_play(rec, update.before, event.ts_ms, history, k, counts)
        rec.learn_one(update, event)
        states[event.user_id] = update.state
        if exclude_seen:
            history.add(event.track_id)
    return counts


def test_shared_collection_is_each_variants_own_call_on_movielens(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=1500)
    counts = _replay(events, exclude_seen=True, k=10)
    assert counts["checked"] > 600
    # ties at the model's cut (numpy's choice) were met, and the fill came with them
    assert counts[f"status{_sk.NEED_MODEL_CUT}"] > 20 and counts[f"status{_sk.DONE}"] > 600


def test_shared_collection_is_each_variants_own_call_on_30music(datasets_dir: Path) -> None:
    events, _ = load_sessionrec(datasets_dir / "30music-200ks", limit=1500)
    counts = _replay(events, exclude_seen=True, k=5)
    assert counts["checked"] > 500
    assert counts[f"status{_sk.DONE}"] > 300


def test_rank_components_is_four_rank_queries(datasets_dir: Path) -> None:
    """One co-occurrence query for ``cooccurrence`` and ``fixed`` (component_lists) gives
    the lists of four whole queries, each with its own bans and accumulation."""
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=1200)
    rec = Recommender(seed=0)
    states: dict[str, UserState] = {}
    seen: dict[str, SeenTracks] = {}
    checked = 0
    for i, event in enumerate(events):
        update = update_session(states.get(event.user_id), event, max_recent=30)
        history = seen.setdefault(event.user_id, SeenTracks(rec.vocabulary))
        size = len(rec.vocabulary)
        if i % 3 == 0 and size:
            before = update.before
            size, hist, ban_recent, (members, pop_w, pop_total), arena, factors = (
                rec._compiled_query(before, size))
            other = rec._exclude_rows(history)
            user = rec._user_vector(before)
            has_user = user is not None
            u = user if has_user else _NO_FACTORS
            sc = rec.cooccurrence.acquire_scratch(size)
            try:
                common = (members, pop_w, pop_total, *arena, hist,
                          rec.cooccurrence.query_decay, sc.acc, sc.best, sc.anchor,
                          sc.touched, factors)
                tail = (rec._ban_buffer(size), rec._mark_buffer(size), ban_recent, other)
                # (size, n_pop, n, use_cooc, use_mf, pick_mf, bw_pop, bw_cooc, bw_mf)
                ref = [
                    _k.rank_query(size, 50, 50, False, False, True, 1e-6, 0.0, 0.0,
                                  *common, u[:0], *tail)[0],
                    _k.rank_query(size, 10, 50, False, has_user, True, 1e-6, 0.0, 1.0,
                                  *common, u, *tail)[0],
                    _k.rank_query(size, 10, 50, True, False, False, 1e-6, 1.0, 0.0,
                                  *common, u[:0], *tail)[0],
                    _k.rank_query(size, 50, 50, True, has_user, False, 0.3, 1.0, 0.5,
                                  *common, u, *tail)[0],
                ]
                got = _k.rank_components(
                    size, 10, 50, True, True, True, False, True, 50, True, has_user, False,
                    0.3, 1.0, 0.5, members, pop_w, pop_total, *arena, hist,
                    rec.cooccurrence.query_decay, sc.acc, sc.best, sc.anchor, sc.touched,
                    factors, u, has_user, *tail)
            finally:
                rec.cooccurrence.release_scratch(sc)
            for a, b in zip(got, ref, strict=True):
                assert np.array_equal(a, b), i
            assert not sc.acc.any() and not rec._ban_buffer(size).any()
            checked += 1
        rec.learn_one(update, event)
        states[event.user_id] = update.state
        history.add(event.track_id)
    assert checked > 350


def test_knn_scores_refuses_a_short_position_table() -> None:
    """An index from outside (the table's length) is checked: reading past it was
    garbage, not an error."""
    rec = Recommender(seed=0)
    states: dict[str, UserState] = {}
    from stream.core.events import PlayEvent

    for i in range(40):
        e = PlayEvent(f"u{i % 3}", f"t{i % 11}", 1_700_000_000_000 + i * 1000, 200_000,
                      f"e{i}")
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    state = states["u0"]
    recent = rec._recent_rows(state)
    knn = rec.session_knn
    inputs = list(knn.query_inputs("u0", 1_700_000_100_000, len(recent)))
    inputs[0] = inputs[0][:1]  # a one-row table for a longer query
    acc2, touched2 = rec._knn_pair_scratch(len(rec.vocabulary))
    with pytest.raises(ValueError, match="position table"):
        _sk.knn_scores(recent, len(recent), 0, *inputs, acc2, touched2)
    knn.clear_scratch()


def test_the_blend_alone_collects_through_its_own_call(
    datasets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--variants blend`` shares nothing: the blend's own call (the shared one returns
    more and cost ~20 us a play more); with another variant the shared call runs."""
    calls: Counter[str] = Counter()
    collect = _VariantShare.collect

    def counted(self: _VariantShare, *args: Any) -> Any:
        calls["shared"] += 1
        return collect(self, *args)

    monkeypatch.setattr(_VariantShare, "collect", counted)
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=300)
    rec = Recommender(seed=0)
    states: dict[str, UserState] = {}
    for event in events:
        update = update_session(states.get(event.user_id), event)
        if update.before.recent:
            alone = rec.component_ids(update.before, 10, event.ts_ms, ("blend",))
            assert calls["shared"] == 0
            both = rec.component_ids(update.before, 10, event.ts_ms, ("blend", "sr"))
            assert both[0] == alone[0] and calls["shared"] > 0
            calls["shared"] = 0
            calls["checked"] += 1
        rec.learn_one(update, event)
        states[event.user_id] = update.state
    assert calls["checked"] > 200
