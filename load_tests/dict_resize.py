"""``python -m load_tests.dict_resize``: the longest insert into a dict and an OrderedDict
at the sizes where each grows its hash table and the junk-ids drill's longest turns fell
(2/3 of 2**18, 2**19, 2**20 keys), and into an OrderedDict kept at 500,000 live keys by
dropping the oldest (the session and MF listener caps): its table grows when 699,050 keys
were ever inserted (deleted slots count). Prints (ms, index of that insert).

``--junk-batches N``: N junk plays (a new listener and a new track each) through the real
``Processor.process_batch`` in batches of 64, with the worker's caps and processor options
(``configure_recommender``, ``defer_eviction``: a due catalogue eviction and the session cap's
``evict_sessions`` run between batches, untimed, as the worker runs them off the batch).
The collector is kept off the long-lived objects as in the worker (``freeze_startup_heap``
after set-up, ``freeze_survivors`` every 5,000 plays: the worker's 5 s at the drill's 1,000
plays/s; untimed), and the catalogue's owed writes are taken at the same pace (the
worker's catalogue flush, every 5 s). Ranking is not run (the drill's junk listeners are first plays: their queue is capped and
sheds). Reports the longest batch and the 10 longest with the key counts at which they
happened (listeners ever seen = tracks ever seen = plays so far). Bounded by N and
``--seconds``; progress every 50,000 plays. Runs in any tree: ``PYTHONPATH`` decides.

    python -m load_tests.dict_resize --junk-batches 1000000 [--seconds 1500]
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


def worst_insert(cls: type, n: int, cap: int | None = None) -> tuple[float, int]:
    d: Any = cls()
    worst = (0.0, -1)
    for i in range(n + 10):
        t = time.perf_counter()
        d[f"j0000000-ju{i}"] = i
        dt = time.perf_counter() - t
        if cap is not None and len(d) > cap:
            if cls is OrderedDict:
                d.popitem(last=False)
            else:
                del d[next(iter(d))]
        if i >= n - 10 and dt > worst[0]:
            worst = (dt, i)
    return round(worst[0] * 1e3, 1), worst[1]


def junk_batches(plays: int, seconds: float, batch: int = 64) -> dict[str, Any]:
    import sys

    from stream.config import load_settings
    from stream.core.evaluation import Prequential
    from stream.core.events import PlayEvent, encode_event
    from stream.processing.pipeline import Processor, Record
    from stream.worker.app import configure_recommender
    from stream.worker.heap import freeze_startup_heap, freeze_survivors

    settings = load_settings(env={}, file=None)
    rec = configure_recommender(None, settings)
    try:  # the worker's session table store: sharded where the tree has the shards
        from stream.core.shards import ShardedDict
        table: Any = ShardedDict()
    except ImportError:
        table = {}
    proc = Processor(settings, rec, table, lambda w: None, lambda d: None,
                     defer_ranking=True, defer_eviction=True,
                     evaluator=Prequential(k=10, window=settings.quality_window))
    now = int(time.time() * 1000)

    def record(i: int) -> Record:
        user = f"j0000000-ju{i}"
        ev = PlayEvent(user, f"j0000000-jt{i}", now, 100_000, f"j0000000-je{i}",
                       artist_id=f"j0000000-ja{i}", context="playlist")
        return Record("plays", 0, i, user.encode(), encode_event(ev), now)

    proc.process_batch([record(plays + i) for i in range(batch)])  # first calls: compiles
    freeze_startup_heap()
    times: list[tuple[float, float, int]] = []  # (wall ms, thread CPU ms, plays before)
    started = time.perf_counter()
    done = 0
    while done < plays and time.perf_counter() - started < seconds:
        records = [record(i) for i in range(done, min(plays, done + batch))]
        t, c = time.perf_counter(), time.thread_time()
        proc.process_batch(records)
        times.append(((time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3, done))
        done += len(records)
        if proc.eviction_due:
            proc.evict_due()
        while proc.sessions_over():
            proc.evict_sessions(1024)
        if done % 5_000 < batch:
            proc.catalog.take_changes()
            proc.catalog.take_counts()
            freeze_survivors()
        if done % 50_000 < batch:
            print(f"[dict_resize] {done} plays, {time.perf_counter() - started:.0f} s, "
                  f"longest batch so far {max(x[0] for x in times):.1f} ms", file=sys.stderr,
                  flush=True)
    walls = sorted(times, reverse=True)
    return {
        "plays": done, "batches": len(times), "seconds": round(time.perf_counter() - started),
        "longest_ms": round(walls[0][0], 1),
        "over_20ms": sum(x[0] > 20 for x in times), "over_50ms": sum(x[0] > 50 for x in times),
        "mean_ms": round(sum(x[0] for x in times) / len(times), 2),
        "top10": [{"wall_ms": round(w, 1), "cpu_ms": round(c, 1), "plays_before": n}
                  for w, c, n in walls[:10]],
        "evicted_tracks": proc.evicted_tracks,
        "sessions_evicted": proc.sessions_evicted,
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junk-batches", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=1500.0)
    args = parser.parse_args()
    if args.junk_batches:
        print(json.dumps(junk_batches(args.junk_batches, args.seconds), indent=1))
        raise SystemExit(0)
    for n in (174_762, 349_525, 699_050):
        print(n, "dict", worst_insert(dict, n), "OrderedDict", worst_insert(OrderedDict, n),
              flush=True)
    print("500k live, 699,050 inserted: OrderedDict",
          worst_insert(OrderedDict, 699_050, cap=500_000))
