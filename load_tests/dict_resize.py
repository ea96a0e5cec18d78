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
        [--worker-like] [--sample-ms 20]

The report has the longest batches by wall time (``top10``: on a loaded machine mostly
the machine), the longest steps by the thread's own CPU (``steps_by_cpu``: what the drill's
stall target counts), the longest garbage collections and, with ``--sample-ms``, the
sampler's lines for the steps over 20 ms of CPU.
"""
from __future__ import annotations

import resource
import time
from collections import OrderedDict
from typing import Any

#: ``getrusage`` of the calling thread (Linux)
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


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


def junk_batches(plays: int, seconds: float, batch: int = 64, worker_like: bool = False,
                 sample_ms: float = 0.0) -> dict[str, Any]:
    """See the module. ``worker_like``: also what the worker's other tasks do with the
    same state between batches -- a budgeted ranking pass (``rank_pending``, the ranker's
    15 ms) after every batch, the "more like this" refresh (``similar_due``, 20 lists or
    2.5 ms) every 100 plays (0.1 s at 1,000 plays/s) and ``refresh_short_lists`` every
    5,000 -- each timed as a step of its own. ``sample_ms``: the worker's stall sampler
    (``StallSampler``) over every step, so a step over that says where it was."""
    import gc
    import sys

    from stream.worker.heap import freeze_startup_heap, freeze_survivors

    proc, record = _junk_processor(plays)
    proc.process_batch([record(plays + i) for i in range(batch)])  # first calls: compiles
    if worker_like:  # the ranking and "more like this" kernels too
        proc.rank_pending()
        proc.similar_due(time.time())
    freeze_startup_heap()
    steps: list[tuple[float, float, int, str]] = []  # (wall ms, thread CPU ms, plays, step)
    kernel: dict[int, tuple[float, int]] = {}  # step index -> (system CPU ms, page faults)
    collections: list[tuple[float, float, int, int, int]] = []  # ms, CPU ms, gen, plays, freed
    sampler, stalls = _sampler(sample_ms)
    gc_started = [0.0, 0.0]
    done = 0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[:] = time.perf_counter(), time.thread_time()
        else:
            collections.append(((time.perf_counter() - gc_started[0]) * 1e3,
                                (time.thread_time() - gc_started[1]) * 1e3,
                                info["generation"], done, info["collected"]))

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if sampler is not None:
            sampler.beat()
        r0 = resource.getrusage(_RUSAGE_THREAD)
        t, c = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        steps.append(((time.perf_counter() - t) * 1e3, (time.thread_time() - c) * 1e3,
                      done, name))
        if steps[-1][1] > 20:  # where its CPU went: the kernel's share, page faults
            r1 = resource.getrusage(_RUSAGE_THREAD)
            kernel[len(steps) - 1] = ((r1.ru_stime - r0.ru_stime) * 1e3,
                                      r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt)
        if sampler is not None:
            sampler.beat()
        return out

    gc.callbacks.append(on_gc)
    started = time.perf_counter()
    try:
        while done < plays and time.perf_counter() - started < seconds:
            records = [record(i) for i in range(done, min(plays, done + batch))]
            timed("batch", proc.process_batch, records)
            done += len(records)
            if proc.eviction_due:
                proc.evict_due()
            while proc.sessions_over():  # the worker's after_batch: on its loop
                timed("evict_sessions", proc.evict_sessions, 1024)
            if worker_like:
                _worker_steps(proc, timed, done, batch)
            if done % 5_000 < batch:
                proc.catalog.take_changes()
                proc.catalog.take_counts()
                timed("freeze", freeze_survivors)  # the worker's 5 s timer: on its loop
            if done % 50_000 < batch:
                print(f"[dict_resize] {done} plays, {time.perf_counter() - started:.0f} s, "
                      f"longest step so far {max(x[0] for x in steps):.1f} ms, by CPU "
                      f"{max(x[1] for x in steps):.1f} ms", file=sys.stderr, flush=True)
    finally:
        gc.callbacks.remove(on_gc)
        if sampler is not None:
            sampler.beat()
            time.sleep(0.05)
            sampler.stop()
    return _junk_report(proc, steps, kernel, collections, stalls, done, started)


def _junk_processor(plays: int) -> tuple[Any, Any]:
    """A Processor as the worker builds it (caps, options) and the junk record maker."""
    from stream.config import load_settings
    from stream.core.evaluation import Prequential
    from stream.core.events import PlayEvent, encode_event
    from stream.processing.pipeline import Processor, Record
    from stream.worker.app import configure_recommender

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

    return proc, record


def _worker_steps(proc: Any, timed: Any, done: int, batch: int) -> None:
    """The worker's other tasks between two batches (``--worker-like``)."""
    if proc.pending_rank or proc.pending_first:
        timed("rank_pending", proc.rank_pending, budget_s=0.015)
    if done % 100 < batch and proc.touched_tracks:
        timed("similar_due", proc.similar_due, time.time(), limit=20, budget_s=0.0025)
    if done % 5_000 < batch:
        timed("refresh_short_lists", proc.refresh_short_lists)


def _sampler(sample_ms: float) -> tuple[Any, list[str]]:
    """The worker's stall sampler, its log lines kept (``--sample-ms``), or (None, [])."""
    import logging

    if sample_ms <= 0:
        return None, []
    from stream.worker.watchdog import StallSampler

    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            lines.append(rec.getMessage())

    log = logging.getLogger("load_tests.dict_resize.stalls")
    log.propagate = False
    log.addHandler(_Keep())
    sampler = StallSampler(sample_ms / 1e3, interval_s=0.002, depth=6, min_gap_s=0.0, log=log)
    sampler.start()
    return sampler, lines


def _junk_report(proc: Any, steps: list[tuple[float, float, int, str]],
                 kernel: dict[int, tuple[float, int]],
                 collections: list[tuple[float, float, int, int, int]], stalls: list[str],
                 done: int, started: float) -> dict[str, Any]:
    batches = [x for x in steps if x[3] == "batch"]
    walls = sorted(batches, reverse=True)
    by_cpu = sorted(range(len(steps)), key=lambda i: -steps[i][1])
    return {
        "plays": done, "batches": len(batches), "seconds": round(time.perf_counter() - started),
        "longest_ms": round(walls[0][0], 1),
        "over_20ms": sum(x[0] > 20 for x in batches),
        "over_50ms": sum(x[0] > 50 for x in batches),
        "mean_ms": round(sum(x[0] for x in batches) / len(batches), 2),
        "top10": [{"wall_ms": round(w, 1), "cpu_ms": round(c, 1), "plays_before": n}
                  for w, c, n, _ in walls[:10]],
        "steps_by_cpu": {"longest_ms": round(steps[by_cpu[0]][1], 1),
                         "over_20ms": sum(x[1] > 20 for x in steps),
                         "over_50ms": sum(x[1] > 50 for x in steps),
                         "top10": [{"step": steps[i][3], "cpu_ms": round(steps[i][1], 1),
                                    "system_ms": round(kernel.get(i, (0.0, 0))[0], 1),
                                    "page_faults": kernel.get(i, (0.0, 0))[1],
                                    "wall_ms": round(steps[i][0], 1),
                                    "plays_before": steps[i][2]} for i in by_cpu[:10]]},
        "per_step": {name: {"count": len(xs), "mean_cpu_ms": round(sum(xs) / len(xs), 3),
                            "max_cpu_ms": round(max(xs), 1)}
                     for name in sorted({x[3] for x in steps})
                     for xs in [[x[1] for x in steps if x[3] == name]]},
        "gc_longest_cpu": [{"cpu_ms": round(c, 1), "wall_ms": round(w, 1), "generation": g,
                            "plays_before": n, "freed": f}
                           for w, c, g, n, f in sorted(collections, key=lambda x: -x[1])[:10]],
        "gc_by_generation": {g: {"count": len(cs), "max_cpu_ms": round(max(cs or [0.0]), 1),
                                 "mean_cpu_ms": round(sum(cs) / max(len(cs), 1), 3)}
                             for g in (0, 1, 2)
                             for cs in [[x[1] for x in collections if x[2] == g]]},
        "stalls_sampled": sorted([line for line in stalls if _cpu_ms(line) >= 20],
                                 key=lambda line: -_cpu_ms(line))[:40],
        "evicted_tracks": proc.evicted_tracks,
        "sessions_evicted": proc.sessions_evicted,
    }


def _cpu_ms(line: str) -> float:
    import re

    found = re.search(r"\((\d+) ms of it", line)
    return float(found.group(1)) if found else 0.0


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junk-batches", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=1500.0)
    parser.add_argument("--worker-like", action="store_true",
                        help="also rank, refresh similar and short lists between batches")
    parser.add_argument("--sample-ms", type=float, default=0.0,
                        help="sample the stack of every step over this many ms")
    args = parser.parse_args()
    if args.junk_batches:
        print(json.dumps(junk_batches(args.junk_batches, args.seconds,
                                      worker_like=args.worker_like, sample_ms=args.sample_ms),
                         indent=1))
        raise SystemExit(0)
    for n in (174_762, 349_525, 699_050):
        print(n, "dict", worst_insert(dict, n), "OrderedDict", worst_insert(OrderedDict, n),
              flush=True)
    print("500k live, 699,050 inserted: OrderedDict",
          worst_insert(OrderedDict, 699_050, cap=500_000))
