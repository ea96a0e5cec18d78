"""Catalogue eviction at the track cap: how long one ``Recommender.evict_tracks`` holds the
caller (in the worker: the event loop).

Builds a recommender whose catalogue is ``--tracks`` + 1 tracks (the worker evicts when the
catalogue passes ``max_tracks``, down to 90 % of it), then evicts, adds 10 % fresh tracks
and evicts again, ``--rounds`` times, timing each eviction. Odd rounds evict inline (the
time an event loop would be held if it ran there); even rounds evict as the worker does
(stream.worker.eviction: slices on the loop, compiled passes in a thread; ``--threaded``:
all of it in a thread, as before session 13), with a 1 ms lag probe on the asyncio loop: its
longest lag is what the event loop feels, its longest busy stretch the loop's own work. The catalogue is synthetic (no public
log has 500k tracks here): skewed sessions of 10 plays over the catalogue, learned by the
popularity, co-occurrence and MF models exactly as in the worker (the skip model and the
drift detector hold no per-track state and are left out to keep the build short).

    python -m load_tests.eviction --tracks 500000 --report eviction.json

Run it against another tree (e.g. the code before a change) with
``PYTHONPATH=/path/to/tree python -m load_tests.eviction ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.core.models._vocab import EvictionSteps
from stream.core.models.base import Interaction
from stream.core.recommender import Recommender, warm_up
from stream.worker.eviction import run_steps
from stream.worker.watchdog import LoopLagProbe

SESSION = 10


def learn_sessions(rec: Recommender, tracks: np.ndarray, first_user: int, ts0: int) -> None:
    """Learn ``tracks`` (track numbers) as sessions of SESSION plays, one listener each."""
    pop, cooc, mf = rec.popularity, rec.cooccurrence, rec.mf
    names = [f"t{t}" for t in tracks.tolist()]
    for s in range(0, len(names), SESSION):
        user = f"u{first_user + s // SESSION}"
        session = names[s : s + SESSION]
        for i, track in enumerate(session):
            x = Interaction(user, track, ts0 + s + i, history=tuple(session[:i]))
            pop.learn_one(x)
            cooc.learn_one(x)
            mf.learn_one(x)
    rec.n_learned += len(names)


def build(n_tracks: int, plays_per_track: float, seed: int) -> tuple[Recommender, int]:
    """A recommender with exactly ``n_tracks`` tracks; returns it and the next track number."""
    rng = np.random.default_rng(seed)
    rec = Recommender(seed=seed)
    n_plays = int(n_tracks * plays_per_track) // SESSION * SESSION
    started = time.perf_counter()
    chunk = 200_000
    for lo in range(0, n_plays, chunk):
        u = rng.random(min(chunk, n_plays - lo))
        learn_sessions(rec, (n_tracks * u**2).astype(np.int64), lo // SESSION, lo)
        print(f"[eviction] built {lo + len(u):,}/{n_plays:,} plays, "
              f"{rec.catalogue_size():,} tracks, {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    # top up with never-seen tracks (sessions of fresh ids) to the exact size
    next_track = n_tracks
    missing = n_tracks - rec.catalogue_size()
    if missing > 0:
        learn_sessions(rec, np.arange(next_track, next_track + missing), 10**7, n_plays)
        next_track += missing
    return rec, next_track


async def evict_beside_loop(rec: Recommender, keep: int, mode: str
                            ) -> tuple[int, float, float, float, float]:
    """Evict as the worker does (``mode`` "sliced": stream.worker.eviction.run_steps, the
    slices on this loop and the compiled passes in a thread; "thread": the whole eviction
    in a thread, as before session 13) while a 1 ms lag probe runs on this loop; returns
    (evicted, seconds, longest loop lag, longest lag of the same probe over as long a span
    just before, with no eviction: the machine's own noise, and the longest CPU stretch of
    the loop's thread between two probe turns during the eviction: the loop's own work)."""
    probe = LoopLagProbe(on_lag=lambda _s: None, interval_s=0.001)
    task = asyncio.get_running_loop().create_task(probe.run())
    await asyncio.sleep(0.05)
    probe.max_lag = 0.0
    await asyncio.sleep(max(0.5, 2 * rec.catalogue_size() / 1e6))
    control = probe.max_lag
    probe.max_lag = probe.max_busy = 0.0
    started = time.perf_counter()
    if mode == "thread":
        evicted = await asyncio.to_thread(rec.evict_tracks, keep)
    else:
        out: list[int] = []
        await run_steps(counted(rec.eviction_steps(keep), out))
        evicted = out[0]
    seconds = time.perf_counter() - started
    await asyncio.sleep(0.01)
    task.cancel()
    return evicted, seconds, probe.max_lag, control, probe.max_busy


def counted(steps: EvictionSteps[int], out: list[int]) -> EvictionSteps[None]:
    """``steps``, with their result appended to ``out``."""
    out.append((yield from steps))


def arena_entries(rec: Recommender) -> int:
    _, size, _, _, _, _ = rec.cooccurrence.arena()
    return int(size.sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.eviction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=500_000, help="max_tracks (the cap)")
    p.add_argument("--plays-per-track", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=4,
                   help="evictions to time (odd rounds inline, even ones as the worker runs "
                        "them beside an event loop)")
    p.add_argument("--threaded", action="store_true",
                   help="even rounds: the whole eviction in a thread (before session 13) "
                        "instead of slices on the loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tracks < 10 or args.rounds < 1:
        p.error("--tracks must be >= 10 and --rounds >= 1")
    cap = args.tracks
    keep = int(cap * 0.9)  # as stream.processing.pipeline.Processor._evict
    warm_up()  # as the worker does before it joins: kernels compiled or loaded from cache
    rec, next_track = build(cap + 1, args.plays_per_track, args.seed)
    # as the worker does every gc_freeze_interval_s: the build's millions of objects out of
    # the collector's walks (otherwise a full collection lands in some eviction slice)
    gc.collect()
    gc.freeze()
    rounds: list[dict[str, Any]] = []
    ts = 10**9
    for r in range(args.rounds):
        before = rec.catalogue_size()
        entries = arena_entries(rec)
        mode = "inline" if r % 2 == 0 else ("thread" if args.threaded else "sliced")
        if mode == "inline":  # on the caller's thread: what an event loop would be held
            started, cpu = time.perf_counter(), time.thread_time()
            evicted = rec.evict_tracks(keep)
            seconds = time.perf_counter() - started
            lag, control, busy = seconds, None, time.thread_time() - cpu
        else:  # as the worker runs it, with a lag probe on an event loop
            evicted, seconds, lag, control, busy = asyncio.run(
                evict_beside_loop(rec, keep, mode))
        rounds.append({"mode": mode, "catalogue_before": before, "evicted": evicted,
                       "arena_entries_before": entries, "seconds": round(seconds, 4),
                       "max_loop_lag_s": round(lag, 4),
                       "max_loop_busy_s": round(busy, 4),
                       "max_loop_lag_no_eviction_s": None if control is None
                       else round(control, 4)})
        print(f"[eviction] round {r + 1} ({mode}): {before:,} -> {rec.catalogue_size():,} "
              f"tracks ({entries:,} neighbour entries): {seconds * 1000:.1f} ms, longest "
              f"event-loop lag {lag * 1000:.1f} ms (loop's own CPU {busy * 1000:.1f} ms)"
              + ("" if control is None else f" (without eviction: {control * 1000:.1f} ms)"),
              file=sys.stderr, flush=True)
        if r + 1 < args.rounds:  # grow past the cap again with fresh and known tracks
            fresh = cap + 1 - rec.catalogue_size()
            rng = np.random.default_rng(args.seed + r + 1)
            mix = np.concatenate([np.arange(next_track, next_track + fresh),
                                  (cap * rng.random(fresh) ** 2).astype(np.int64)])
            rng.shuffle(mix)
            next_track += fresh
            learn_sessions(rec, mix, 2 * 10**7 + r * 10**6, ts)
            ts += len(mix)
            if rec.catalogue_size() <= cap:
                extra = cap + 1 - rec.catalogue_size()
                learn_sessions(rec, np.arange(next_track, next_track + extra), 3 * 10**7, ts)
                next_track += extra
            gc.collect()
            gc.freeze()
    report = {
        "benchmark": "eviction",
        "command": " ".join(["python -m load_tests.eviction", *(argv or sys.argv[1:])]),
        "max_tracks": cap,
        "keep": keep,
        "plays_per_track": args.plays_per_track,
        "rounds": rounds,
        "max_seconds": max(r["seconds"] for r in rounds),
        "max_loop_lag_s_beside": max((r["max_loop_lag_s"] for r in rounds
                                      if r["mode"] != "inline"), default=None),
        "max_loop_busy_s_beside": max((r["max_loop_busy_s"] for r in rounds
                                       if r["mode"] != "inline"), default=None),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=1))
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
