"""What track names cost the worker's pipeline: ``Processor.process_batch`` over real
MovieLens-100K plays (in-process: dict table, no Kafka or Redis; rankings once per
listener per chunk, as in the worker), the same plays with their titles and without,
in alternating rounds of one run. Also the per-call cost of the catalogue's two hot
methods against the plain item dicts they replaced.

    python -m load_tests.names_cost                  # 20,000 plays, 3 rounds
    python -m load_tests.names_cost --plays 50000 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import timeit

from stream.config import load_settings
from stream.core.catalog import TrackCatalog
from stream.core.events import PlayEvent, encode_event
from stream.core.ranking import Recommendation
from stream.processing.pipeline import Processor, Record
from stream.tools.datasets import default_datasets_dir, load_events


def run_once(events: list[PlayEvent], batch: int) -> float:
    """Microseconds per play for the whole stream through a fresh Processor."""
    from stream.core.recommender import Recommender

    proc = Processor(load_settings(env={}, file=None), Recommender(), {}, lambda _w: None,
                     lambda _d: None, clock=lambda: events[-1].ts_ms / 1000 + 1,
                     defer_ranking=True)
    records = [Record("plays", 0, i, e.user_id.encode(), encode_event(e), e.ts_ms)
               for i, e in enumerate(events)]
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        proc.process_batch(records[i : i + batch])
        proc.rank_pending()
    return (time.perf_counter() - started) / len(records) * 1e6


def micro() -> tuple[float, float, float]:
    cat = TrackCatalog()
    for i in range(5000):
        cat.observe(f"t{i}", f"Song {i}", f"Band {i % 300}", None, ts_ms=i)
    cat.take_changes()
    recs = [Recommendation(f"t{i}", 0.5, "because you played t1", "played", "t1")
            for i in range(10)]
    n = 20_000
    observe = timeit.timeit(
        lambda: cat.observe("t42", "Song 42", "Band 42", None, ts_ms=1), number=n) / n
    items = timeit.timeit(lambda: cat.items(recs), number=n) / n
    plain = timeit.timeit(lambda: [{"track_id": r.track_id, "score": float(r.score),
                                    "reason": r.reason} for r in recs], number=n) / n
    return observe * 1e6, items * 1e6, plain * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plays", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    named = load_events(default_datasets_dir() / "movielens-100k", "movielens", limit=args.plays)
    bare = [dataclasses.replace(e, track_name=None) for e in named]
    print(f"{len(named)} MovieLens-100K plays, {len({e.user_id for e in named})} listeners, "
          f"{sum(1 for e in named if e.track_name)} with a title", flush=True)
    results: dict[str, list[float]] = {"without names": [], "with names": []}
    for r in range(args.rounds):
        for label, events in (("without names", bare), ("with names", named)):
            us = run_once(events, args.batch)
            results[label].append(us)
            print(f"round {r + 1}: {label:>14}: {us:6.1f} us/play", flush=True)
    a, b = (statistics.median(results[k]) for k in ("without names", "with names"))
    print(f"median: without names {a:.1f} us/play, with names {b:.1f} us/play "
          f"(ratio {b / a:.3f})")
    observe, items, plain = micro()
    print(f"TrackCatalog.observe {observe:.2f} us/play; items() {items:.2f} us per 10-item "
          f"document (plain item dicts: {plain:.2f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
