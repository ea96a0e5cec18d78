"""``Prequential.observe_rows`` (the replay's evaluation of vocabulary rows) against
``Prequential.observe`` of the same lists as ids: the same summary, on real plays."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.core.evaluation import Prequential
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session
from stream.tools.datasets import load_events
from stream.tools.replay import TestThenTrain


class _Names:
    """A row numbering (``RowNames``) whose rows the test renumbers."""

    def __init__(self, ids: list[str]) -> None:
        self.ids, self.generation = ids, 0


def test_rows_and_ids_give_the_same_summary_on_real_plays(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=1500)
    rec = Recommender(seed=0)
    rec.emit_item_steps(False)
    by_ids, by_rows = Prequential(k=10), Prequential(k=10)
    step = TestThenTrain(VARIANTS, k=10, exclude_seen=True, max_recent=30)
    states: dict[str, UserState] = {}
    hits = 0
    for event in events:
        update = update_session(states.get(event.user_id), event, max_recent=30)
        if update.duplicate:
            continue
        seen = step.seen.setdefault(event.user_id, SeenTracks(rec.vocabulary))
        lists = rec.component_rows(update.before, 10, event.ts_ms, VARIANTS, exclude=seen)
        ids = rec.vocabulary.ids
        played = rec.vocabulary.index.get(event.track_id, -1)
        ranks = by_rows.observe_rows(VARIANTS, lists, played, event.track_id, rec.vocabulary)
        for v, rows, rank in zip(VARIANTS, lists, ranks, strict=True):
            assert by_ids.observe(v, [ids[r] for r in rows], event.track_id) == rank
            hits += rank is not None
        rec.learn_one(update, event)
        states[event.user_id] = update.state
        seen.add(event.track_id)
    assert hits > 100  # the lists do hit: the ranks were compared, not only misses
    assert by_rows.summary() == by_ids.summary()


def test_a_renumbering_or_another_numbering_looks_rows_up_again() -> None:
    names = _Names(["a", "b", "c"])
    ev = Prequential(k=2)
    ev.observe_rows(["x"], [[0, 1]], 0, "a", names)
    names.ids = ["c", "b", "a"]  # renumbered: row 0 is another track now
    names.generation += 1
    ev.observe_rows(["x"], [[0, 1]], 2, "a", names)
    other = _Names(["d", "a"])  # another worker's vocabulary (stream simulate)
    assert ev.observe_rows(["x"], [[0]], 1, "a", other) == [None]
    summary = ev.summary()["x"]
    assert summary["coverage"] == 1.0  # shown: a, b, c, d; played: a
    assert summary["hr@2"] == pytest.approx(1 / 3)
    same = Prequential(k=2)
    for top, actual in ((["a", "b"], "a"), (["c", "b"], "a"), (["d"], "a")):
        same.observe("x", top, actual)
    assert same.summary() == ev.summary()


def test_a_window_keeps_the_ids() -> None:
    names = _Names(["a", "b", "c"])
    rows, ids = Prequential(k=2, window=2), Prequential(k=2, window=2)
    for top, played in (([0, 1], 1), ([2], 0), ([1, 2], 2)):
        rows.observe_rows(["x"], [top], played, names.ids[played], names)
        ids.observe("x", [names.ids[r] for r in top], names.ids[played])
    assert rows.summary() == ids.summary()
    assert rows.summary(cumulative=True) == ids.summary(cumulative=True)
