"""Digests of what the rank stage publishes, to show that a speed-up changed no output
(session 14): the documents' bytes and notifications, the remembered lists, short lists,
the track names asked for and the "more like this" documents; for the fixed and the
learned ranker, ranked in whole passes and in the budgeted shape (one listener, then 8s:
``perf_counter`` frozen), with and without track names (quotes and accents included), and
a 300-track / 20-artist catalogue whose artist cap reads past each list's prefix. Run it
in each tree and compare the lines (they must be equal; the names depend on ``hash``):

    PYTHONHASHSEED=0 PYTHONPATH=<tree> python load_tests/rank_outputs.py
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from load_tests.rank_path import drain_budgeted
from load_tests.traffic import SessionTraffic
from stream.config import load_settings
from stream.core.evaluation import Prequential
from stream.core.events import PlayEvent, encode_event
from stream.core.recommender import Recommender
from stream.processing.pipeline import Processor, Record

NOW_MS = 1_765_000_000_000


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _named(ev: PlayEvent, i: int) -> PlayEvent:
    """Two plays in three name their track (some parts missing)."""
    if not i % 3:
        return ev
    h = hash(ev.track_id) % 7
    return dataclasses.replace(
        ev, track_name=f'Song "{ev.track_id}" \u00e9' if h else None,
        artist_name=f"Artist {ev.artist_id}" if h != 2 else None,
        album_name="Alb\u00fcm" if h == 3 else None)


def _rank(proc: Processor, budgeted: bool) -> None:
    if budgeted:
        drain_budgeted(proc)
    else:
        proc.rank_pending()


def run(plays: int, ranker: str, budgeted: bool, names: bool, tracks: int = 50_000,
        artists: int = 5_000) -> dict[str, Any]:
    events = SessionTraffic(tracks=tracks, artists=artists).events(plays)
    records = [Record("plays", 0, i, ev.user_id.encode(),
                      encode_event(_named(ev, i) if names else ev), NOW_MS)
               for i, ev in enumerate(events)]
    settings = load_settings(env={"STREAM_RANKER": ranker}, file=None)
    rec = Recommender(blend=settings.ranker, session_models=settings.ranker == "learned")
    rec.emit_item_steps(False)
    writes: list[Any] = []
    proc = Processor(settings, rec, {}, writes.append, lambda d: None, defer_ranking=True,
                     evaluator=Prequential(k=10, window=settings.quality_window),
                     clock=lambda: NOW_MS / 1000)
    wanted, similar = [], []
    for start in range(0, len(records), 64):
        proc.process_batch(records[start:start + 64])
        _rank(proc, budgeted)
        if start % 640 == 0:
            wanted.append(proc.catalog.take_wanted(50))
            similar.append(proc.similar_due(NOW_MS / 1000 + start, limit=20))
    return {
        "writes": _digest([(w.key, w.seq, w.doc, w.notification, w.event_ts_ms,
                            w.ingest_ts_ms, w.lineage, w.fresh) for w in writes]),
        "last_recs": _digest(list(proc.last_recs.items())),
        "short": _digest([(u, e[0].event_id, e[2]) for u, e in proc.short_lists.items()]),
        "wanted": _digest((wanted, list(proc.catalog.take_wanted(10**6)))),
        "similar": _digest(similar),
        "n": len(writes),
    }


def main() -> None:
    for ranker, plays in (("fixed", 6000), ("learned", 3000)):
        for budgeted in (False, True):
            for names in (True, False):
                print(ranker, "budgeted" if budgeted else "whole",
                      "names" if names else "no-names", run(plays, ranker, budgeted, names))
    print("small-catalogue", run(4000, "fixed", True, True, tracks=300, artists=20))


if __name__ == "__main__":
    main()
