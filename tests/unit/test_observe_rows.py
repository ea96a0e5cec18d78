"""``Prequential.observe_rows`` (the replay's evaluation of vocabulary rows) against
``Prequential.observe`` of the same lists as ids: the same summary, on real plays."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.core.evaluation import Prequential
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session
from stream.tools.datasets import load_events, load_sessionrec
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


def test_a_window_keeps_the_ids() -> None:
    names = _Names(["a", "b", "c"])
    rows, ids = Prequential(k=2, window=2), Prequential(k=2, window=2)
    for top, played in (([0, 1], 1), ([2], 0), ([1, 2], 2)):
        rows.observe_rows(["x"], [top], played, names.ids[played], names)
        ids.observe("x", [names.ids[r] for r in top], names.ids[played])
    assert rows.summary() == ids.summary()
    assert rows.summary(cumulative=True) == ids.summary(cumulative=True)


def test_coverage_counts_the_tracks_a_renumbered_or_other_row_names() -> None:
    """The coverage (not capped at 1.0: more tracks played than shown) of lists whose rows
    name other tracks after a renumbering, and in another numbering of the same
    generation: only a cache forgotten per generation and kept per numbering counts them."""
    names = _Names(["a", "b", "c", "d", "e", "f"])
    other = _Names(["e", "f"])  # another worker's vocabulary
    ev, same = Prequential(k=2), Prequential(k=2)

    def both(numbering: _Names, rows: list[int], actual: str) -> None:
        played = numbering.ids.index(actual) if actual in numbering.ids else -1
        ev.observe_rows(["x"], [rows], played, actual, numbering)
        same.observe("x", [numbering.ids[r] for r in rows], actual)

    both(names, [0, 1], "c")  # shows a, b
    names.ids = ["c", "d", "a", "b", "e", "f"]  # renumbered: rows 0, 1 are c, d now
    names.generation += 1
    other.generation = names.generation  # the same generation, another numbering
    both(names, [0, 1], "e")  # shows c, d
    both(other, [0], "f")  # shows e
    for track in ("g", "h", "i"):  # played, never shown, unknown to both numberings
        both(names, [], track)
    assert ev.summary()["x"]["coverage"] == pytest.approx(5 / 6)  # a..e of c, e, f, g, h, i
    assert ev.summary() == same.summary()


def test_rows_and_ids_give_the_same_summary_across_evictions(datasets_dir: Path) -> None:
    """Two recommenders' vocabularies through one evaluator (``replay --workers``), both
    evicting a third of their catalogues every 300 plays (Vocabulary.fill_holes: rows renamed
    in place, a new generation): ``observe_rows`` against ``observe`` of the lists' ids."""
    events, _ = load_sessionrec(datasets_dir / "30music-200ks", limit=1500)
    recs = [Recommender(seed=0), Recommender(seed=0)]
    states: list[dict[str, UserState]] = [{}, {}]
    by_ids, by_rows = Prequential(k=10), Prequential(k=10)
    evicted = 0
    for i, event in enumerate(events):
        w = sum(map(ord, event.user_id)) % 2  # a listener plays at one worker
        rec = recs[w]
        update = update_session(states[w].get(event.user_id), event, max_recent=30)
        if update.duplicate:
            continue
        vocab = rec.vocabulary
        played = vocab.index.get(event.track_id, -1)
        lists = rec.component_rows(update.before, 10, event.ts_ms, VARIANTS)
        ranks = by_rows.observe_rows(VARIANTS, lists, played, event.track_id, vocab)
        for v, rows, rank in zip(VARIANTS, lists, ranks, strict=True):
            assert by_ids.observe(v, [vocab.ids[r] for r in rows], event.track_id) == rank
        rec.learn_one(update, event)
        states[w][event.user_id] = update.state
        if i % 300 == 299:
            evicted += sum(r.evict_tracks(len(r.vocabulary) * 2 // 3) for r in recs)
    assert evicted > 500 and min(r.vocabulary.generation for r in recs) >= 2
    assert by_rows.summary() == by_ids.summary()
