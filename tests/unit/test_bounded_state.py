"""Per-listener and free-text model state stays bounded under hostile ids (issue 15, item 5):
MF user factors are capped (least recently learned out), and free-text play contexts are
folded into a closed set before they become skip-model features."""

from __future__ import annotations

import orjson
import pytest

from stream.config import load_settings
from stream.core.contexts import CONTEXTS, fold_context
from stream.core.events import PlayEvent
from stream.core.models.base import Interaction
from stream.core.models.factorization import ImplicitMF
from stream.core.models.skip import SkipClassifier
from stream.core.recommender import Recommender
from stream.core.session import update_session
from stream.errors import ConfigError


def test_mf_keeps_at_most_max_users_listeners_least_recent_out() -> None:
    mf = ImplicitMF(n_factors=4, seed=0, max_users=3)
    for user in ("a", "b", "c"):
        mf.learn_one(Interaction(user, "t1", 0))
    mf.learn_one(Interaction("a", "t2", 1))  # a is now the most recent
    mf.learn_one(Interaction("d", "t1", 2))  # b (least recent) goes
    assert list(mf.user_factors) == ["c", "a", "d"] and mf.users_evicted == 1
    for i in range(1000):
        mf.learn_one(Interaction(f"junk-{i}", f"j{i}", 3 + i))
    assert len(mf.user_factors) == 3 and mf.users_evicted == 1001


def test_limit_users_trims_at_once_and_rejects_bad_values() -> None:
    rec = Recommender(seed=0)
    states: dict = {}
    for i in range(20):
        event = PlayEvent(f"u{i}", f"t{i % 5}", 1_700_000_000_000 + i, 200_000, f"e{i}")
        up = update_session(states.get(f"u{i}"), event)
        rec.learn_one(up)
        states[f"u{i}"] = up.state
    assert len(rec.mf.user_factors) == 20
    assert rec.limit_users(5) == 15
    assert list(rec.mf.user_factors) == [f"u{i}" for i in range(15, 20)]
    restored = Recommender.restore(rec.snapshot()).mf
    assert list(restored.user_factors) == list(rec.mf.user_factors)
    with pytest.raises(ValueError, match="max_users"):
        ImplicitMF(max_users=0)
    with pytest.raises(ValueError, match="max_users"):
        rec.limit_users(-1)


def test_max_users_setting_is_validated_at_start_up() -> None:
    assert load_settings(env={}, file=None).max_users == 500_000
    assert load_settings(env={"STREAM_MAX_USERS": "0"}, file=None).max_users == 0
    with pytest.raises(ConfigError, match="'max_users'"):
        load_settings(env={"STREAM_MAX_USERS": "-5"}, file=None)
    with pytest.raises(ConfigError, match="'max_users'"):
        load_settings(env={"STREAM_MAX_USERS": "many"}, file=None)


@pytest.mark.parametrize(
    ("raw", "folded"),
    [("playlist", "playlist"), ("  ALBUM ", "album"), ("editorial_playlist", "playlist"),
     ("Library", "collection"), ("my radio mix", "radio"), ("\u202e", "other"),
     ("x" * 256, "other"), ("", "none"), (None, "none")],
)
def test_contexts_fold_into_the_closed_set(raw: str | None, folded: str) -> None:
    assert fold_context(raw) == folded


def test_skip_model_weights_stay_bounded_under_free_text_contexts() -> None:
    model = SkipClassifier(seed=0)
    for i in range(3000):  # every play a never-seen context string
        model.learn_one(Interaction("u", "t", i, skipped=i % 3 == 0, context=f"junk-{i}"))
    model.learn_one(Interaction("u", "t", 0, context="Radio"))
    names = set(model.classifier.weights)
    contexts = {n for n in names if n.startswith("context=")}
    assert contexts == {"context=other", "context=radio"}
    assert contexts <= {f"context={c}" for c in CONTEXTS} and len(names) <= 4 + len(CONTEXTS)


def test_freeze_survivors_collects_young_cycles_then_freezes_the_rest() -> None:
    import gc
    import weakref

    from stream.worker.heap import freeze_survivors

    class Node:
        pass

    gc.collect()
    try:
        garbage = Node()
        garbage.me = garbage  # type: ignore[attr-defined]  # a young reference cycle
        gone = weakref.ref(garbage)
        del garbage
        kept = [Node() for _ in range(1000)]
        before = gc.get_freeze_count()
        seconds = freeze_survivors()
        assert gone() is None  # collected, not frozen
        assert gc.get_freeze_count() >= before + 1000 and seconds >= 0
        assert len(gc.get_objects(generation=2)) < 1000  # the full scans skip them now
        del kept  # frozen objects are still freed by reference counting
    finally:
        gc.unfreeze()
    with pytest.raises(ConfigError, match="'gc_freeze_interval_s'"):
        load_settings(env={"STREAM_GC_FREEZE_INTERVAL_S": "-1"}, file=None)


def test_the_listener_cap_and_its_lru_order_survive_a_checkpoint() -> None:
    mf = ImplicitMF(n_factors=4, seed=0, max_users=3)
    for i, user in enumerate(("a", "b", "c", "a", "d")):
        mf.learn_one(Interaction(user, f"t{i % 2}", i))
    manifest, arrays = mf.export_state()
    back = ImplicitMF.import_state(manifest, arrays)
    assert back.max_users == 3 and back.users_evicted == mf.users_evicted == 1
    assert list(back.user_factors) == list(mf.user_factors) == ["c", "a", "d"]
    back.learn_one(Interaction("e", "t0", 9))  # the least recent ("c") goes, as it would have
    assert list(back.user_factors) == ["a", "d", "e"]
    # a checkpoint holding more listeners than its own cap is refused, naming the field
    manifest["params"]["max_users"] = 2
    with pytest.raises(ValueError, match="user_ids"):
        ImplicitMF.import_state(manifest, arrays)


# --------------------------------------------------------------------------- ranking budget


def _processor(**kw):  # type: ignore[no-untyped-def]
    from stream.processing.pipeline import Processor

    writes: list = []
    p = Processor(load_settings(env={}, file=None), Recommender(seed=0), {}, writes.append,
                  lambda d: None, clock=lambda: 1_700_000_100.0, defer_ranking=True, **kw)
    return p, writes


def _play(p, user: str, i: int) -> None:  # type: ignore[no-untyped-def]
    from stream.core.events import encode_event
    from stream.processing.pipeline import Record

    ev = PlayEvent(user, f"t{i % 7}", 1_700_000_000_000 + i, 200_000, f"{user}-{i}")
    p.process(Record("plays", 0, i, user.encode(), encode_event(ev), None))


class _Clock:
    """A fake ``time.perf_counter`` for the pipeline, advanced by a fake ranking."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _timed_ranking(p, monkeypatch, cost):  # type: ignore[no-untyped-def]
    """Make ``p``'s rankings take ``cost(listener_number)`` seconds each on a fake clock
    (listeners numbered from 0 in the order ranked); returns the clock and the sizes of
    the batched calls."""
    import stream.processing.pipeline as pipeline

    clock = _Clock()
    monkeypatch.setattr(pipeline.time, "perf_counter", clock)
    many = p.recommender.rank_items_many  # what the processor ranks with
    calls: list[int] = []

    def timed(states, k, now_ms):  # type: ignore[no-untyped-def]
        first = sum(calls)
        calls.append(len(states))
        clock.now += sum(cost(first + i) for i in range(len(states)))
        return many(states, k, now_ms)

    p.recommender.rank_items_many = timed
    return clock, calls


def test_a_budgeted_ranking_takes_a_bounded_chunk_listeners_with_history_first(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """The junk-ids drill's 56 s loop stall: the writer's hook ranked every waiting
    listener in one call. With a budget it ranks as many as fit in it, the listeners with
    a history before first plays; the rest wait for the next call."""
    import json

    p, writes = _processor()
    _play(p, "real", 0)
    p.rank_pending()  # "real" now has a history
    writes.clear()
    for i in range(100):
        _play(p, f"junk-{i}", 1 + i)
    _play(p, "real", 200)  # queued after 100 first plays...
    assert len(p.pending_first) == 100 and list(p.pending_rank) == ["real"]
    clock, _ = _timed_ranking(p, monkeypatch, lambda i: 0.125)
    started = clock.now
    assert p.rank_pending(budget_s=1.0) == 8  # 1 s at 125 ms a listener
    assert clock.now - started <= 1.0
    # ...and ranked first
    assert json.loads(writes[0].doc)["user_id"] == "real"
    assert len(p.pending_first) == 93 and p.rank_waiting()
    ranked = 8
    while p.rank_waiting():
        ranked += p.rank_pending(budget_s=1.0)
    assert ranked == 101 and len(writes) == 101
    _play(p, "junk-x", 500)  # slower than the budget: still one listener a call
    _play(p, "junk-y", 501)
    _timed_ranking(p, monkeypatch, lambda i: 10.0)
    assert p.rank_pending(budget_s=0.010) == 1


def test_a_budgeted_ranking_holds_its_budget_per_listener_whatever_the_estimate(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """The 1M junk-ids drill of session 11: the cost estimate came from cheap listeners,
    one call ranked hundreds of expensive ones and held the loop 7.8 s (the consumer's
    group session expired and the worker re-read its whole changelog); then a fixed
    sub-chunk of 8 at 5-10+ ms each still held it 74-113 ms. Now the first listener is
    ranked alone and each sub-chunk is sized from the dearest listener so far, so the call
    ends within its budget, whatever the recent average said."""
    from stream.processing.pipeline import RANK_SUB_CHUNK

    p, writes = _processor()
    for i in range(100):
        _play(p, f"junk-{i}", i)
    clock, calls = _timed_ranking(p, monkeypatch, lambda i: 0.005)  # 5 ms a listener
    p.rank_cost_s = 1e-6  # the old estimate: 1024 fit in the budget
    started = clock.now
    ranked = p.rank_pending(budget_s=0.015)
    assert clock.now - started <= 0.015 + 1e-9  # not 8 x 5 ms = 40 ms
    assert ranked == 3 and calls[0] == 1 and len(writes) == 3
    assert p.rank_cost_s > 0.001  # and the estimate learned the cost
    # one dear listener after cheap ones costs at most a sub-chunk at twice the cheap cost
    calls.clear()
    clock, calls = _timed_ranking(p, monkeypatch, lambda i: 0.001 if i < 4 else 0.002)
    started = clock.now
    p.rank_pending(budget_s=0.015)
    assert clock.now - started <= 0.015 + 1e-9
    assert max(calls) <= RANK_SUB_CHUNK


def test_first_play_rankings_are_bounded_and_the_oldest_shed() -> None:
    import stream.processing.pipeline as pipeline

    p, _ = _processor()
    old = pipeline.MAX_PENDING_FIRST
    pipeline.MAX_PENDING_FIRST = 5
    try:
        for i in range(12):
            _play(p, f"junk-{i}", i)
    finally:
        pipeline.MAX_PENDING_FIRST = old
    assert list(p.pending_first) == [f"junk-{i}" for i in range(7, 12)]
    assert p.rank_shed == 7


# --------------------------------------------------------------------------- session cap


def test_the_session_table_is_capped_least_recently_active_out_through_the_table() -> None:
    """max_sessions: the least recently active listeners above the cap are deleted
    through the table (bounded per call); one on a partition this worker no longer owns
    leaves only its memory (no changelog tombstone, no Redis delete)."""
    from stream.config import Settings

    settings = load_settings(env={}, file=None).replace(max_sessions=3)
    from stream.processing.pipeline import Processor

    assert isinstance(settings, Settings)
    table: dict = {}
    p = Processor(settings, Recommender(seed=0), table, lambda w: None, lambda d: None,
                  clock=lambda: 1_700_000_100.0, defer_ranking=True)
    for i, user in enumerate(["a", "b", "c", "d", "e", "f"]):
        _play(p, user, i)
    _play(p, "a", 10)  # a is recent again
    assert p.sessions_over() == 3
    deleted: list[tuple[str, int, bool]] = []

    def delete(user: str, partition: int, changelog: bool) -> None:
        deleted.append((user, partition, changelog))
        del table[user]

    # b lives on partition 0 (owned); pretend c's partition was revoked
    table["c"].last_partition = 5
    assert p.evict_sessions(2, delete=delete, owned=lambda part: part == 0) == ["b"]
    assert deleted == [("b", 0, True), ("c", 5, False)]
    assert p.sessions_over() == 1
    assert p.evict_sessions(10, delete=delete, owned=lambda part: part == 0) == ["d"]
    assert sorted(table) == ["a", "e", "f"] and p.sessions_evicted == 2
    assert p.sessions_over() == 0 and p.evict_sessions(10, delete=delete) == []
    # listeners restored from the changelog join the order as the least recent
    table["old"] = table["e"]
    assert p.track_sessions(["old", "e"]) == 1
    assert next(iter(p.session_order)) == "old"


def test_last_published_lists_are_capped_least_recently_published_out() -> None:
    """``last_recs`` (sharded since session 16): at most ``max_tracked_users`` listeners,
    the least recently published out, in exactly an OrderedDict's order; a listener
    published again moves to the end; the next play is scored against the list kept."""
    p, writes = _processor(max_tracked_users=3)
    for i, user in enumerate(["a", "b", "c", "d"]):
        _play(p, user, i)
        p.rank_pending()
    assert list(p.last_recs) == ["b", "c", "d"]
    _play(p, "b", 10)
    p.rank_pending()
    assert list(p.last_recs) == ["c", "d", "b"] and len(p.last_recs) == 3
    assert p.last_recs["b"] == tuple(item["track_id"] for item in
                                     orjson.loads(writes[-1].doc)["items"])
    p.forget_user("d")
    assert list(p.last_recs) == ["c", "b"]


def test_max_sessions_setting_is_validated_at_start_up() -> None:
    with pytest.raises(ConfigError, match="max_sessions"):
        load_settings(env={"STREAM_MAX_SESSIONS": "-1"}, file=None)


# --------------------------------------------------------------------------- reserved rows


def _learn_catalogue(n_tracks: int) -> tuple[Recommender, list]:
    rec = Recommender(seed=0)
    states: dict = {}
    for i in range(3 * n_tracks):
        user = f"u{i % 13}"
        ev = PlayEvent(user, f"t{(i * 7919) % n_tracks}", 1_700_000_000_000 + i * 1000,
                       200_000, f"e{i}", artist_id=f"a{i % 17}")
        up = update_session(states.get(user), ev)
        rec.learn_one(up, ev)
        states[user] = up.state
    return rec, list(states.values())


def test_reserved_rows_change_no_result_and_grow_each_array_once() -> None:
    """The junk-ids drill's longest stalls were growth copies of the MF item matrix on
    the event loop (``_vocab.grow_rows``). With rows reserved up to the cap, each array
    is allocated once; learning, ranking, "more like this" and eviction give exactly the
    results they give without the reservation."""
    from stream.core.models import _vocab

    plain, states = _learn_catalogue(300)
    copies: list[int] = []
    grow = _vocab.grow_rows

    def counting(matrix, needed, growth=2.0):  # type: ignore[no-untyped-def]
        out = grow(matrix, needed, growth)
        if out is not matrix:
            copies.append(out.shape[0])
        return out

    Recommender.reserve_tracks(1000)
    try:
        import stream.core.models.factorization as fact

        fact.grow_rows = counting  # type: ignore[assignment]
        try:
            reserved, states2 = _learn_catalogue(300)
        finally:
            fact.grow_rows = grow  # type: ignore[assignment]
        assert reserved.mf.item_factors.shape[0] == 1100 and copies == [1100]
        now = 1_700_000_900_000
        for a, b in zip(states, states2, strict=True):
            assert [r.track_id for r in plain.recommend(a, 10, now)] == [
                r.track_id for r in reserved.recommend(b, 10, now)]
        assert [[r.track_id for r in recs] for recs in plain.recommend_many(states, 10, now)] \
            == [[r.track_id for r in recs] for recs in reserved.recommend_many(states2, 10, now)]
        assert [t for t, *_ in plain.similar("t5", 10)] == [
            t for t, *_ in reserved.similar("t5", 10)]
        assert plain.evict_tracks(200) == reserved.evict_tracks(200)
        assert [r.track_id for r in plain.recommend(states[0], 10, now)] == [
            r.track_id for r in reserved.recommend(states2[0], 10, now)]
    finally:
        Recommender.reserve_tracks(0)
