"""What a model checkpoint costs: build time, size and restore time after N real plays.

Feeds the first ``--plays`` MovieLens-100K ratings (in time order, a rating <= 2 counted
as a skip) through one Recommender, then builds the signed checkpoint blob and restores it
``--repeat`` times each, reporting the median and the fastest. The checkpoint path is the
worker's own (the forked child runs exactly this build). Also reports the feed's cost per
play and the drift detector's alone (``SkipRateDrift.learn_one``, which changed with the
format: see docs/benchmarks.md).

Self-contained on purpose (no ``load_tests`` imports), so the same file measures another
tree too: ``PYTHONPATH=/path/to/other/tree python load_tests/checkpoint_cost.py`` runs
against that tree's ``stream`` package (the format-1 checkpoint when it predates
``stream.core.checkpoint.seal_models``).

    python load_tests/checkpoint_cost.py --plays 60000 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET = "benchmark-secret-0123456789"


def feed(plays: int, datasets: Path) -> Any:
    from stream.core.recommender import Recommender
    from stream.core.session import update_session
    from stream.tools.datasets import load_events

    events = load_events(datasets / "movielens-100k", "movielens", limit=plays)
    rec = Recommender(seed=0)
    states: dict[str, Any] = {}
    started = time.perf_counter()
    for n, ev in enumerate(events, 1):
        up = update_session(states.get(ev.user_id), ev)
        rec.learn_one(up, ev)
        states[ev.user_id] = up.state
        if n % 20_000 == 0:
            print(f"  fed {n:,} plays ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return rec, len(events)


def codec(app_id: str) -> tuple[str, Any, Any]:
    """(format name, build(rec) -> bytes, restore(bytes) -> rec) for the tree on the path."""
    import stream.core.checkpoint as ck

    if hasattr(ck, "seal_models"):
        keys = ck.KeySet.parse(f"bench:{SECRET}")

        def build(rec: Any) -> bytes:
            return bytes(ck.seal_models(rec, keys=keys, app_id=app_id,
                                        created_ms=int(time.time() * 1000)))

        def restore(blob: bytes) -> Any:
            return ck.open_models(blob, keys=keys, app_id=app_id,
                                  now_ms=int(time.time() * 1000))[0]

        return "format 2 (JSON manifest + raw arrays, HMAC)", build, restore
    from stream.core.recommender import Recommender

    def build_v1(rec: Any) -> bytes:
        return bytes(ck.frame(rec.snapshot(), SECRET))

    def restore_v1(blob: bytes) -> Any:
        return Recommender.restore(ck.unframe(blob, SECRET))

    return "format 1 (pickled, HMAC)", build_v1, restore_v1


def drift_us_per_play(n: int = 200_000, repeat: int = 3) -> float:
    """``SkipRateDrift.learn_one`` per play (fastest of ``repeat`` passes over ``n`` skip
    indicators whose rate rises every 50,000 plays)."""
    from stream.core.models.base import Interaction
    from stream.core.models.drift import SkipRateDrift

    xs = [Interaction("u", "t", i, skipped=(i * 7919) % 10 < 3 + i // 50_000) for i in range(n)]
    best = float("inf")
    for _ in range(repeat):
        d = SkipRateDrift()
        started = time.perf_counter()
        for x in xs:
            d.learn_one(x)
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def timed(fn: Any, arg: Any, repeat: int) -> tuple[list[float], Any]:
    out: Any = None
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - started)
    return times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plays", type=int, default=60_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.repeat <= 50 or not 1 <= args.plays <= 100_000:
        p.error("--repeat must be 1-50 and --plays 1-100000")

    import stream

    print(f"tree: {Path(stream.__file__).resolve().parents[1]}", file=sys.stderr)
    started = time.perf_counter()
    rec, n = feed(args.plays, args.datasets)
    feed_s = time.perf_counter() - started
    name, build, restore = codec("bench")
    build_s, blob = timed(build, rec, args.repeat)
    restore_s, twin = timed(restore, blob, args.repeat)
    listeners = sorted(rec.mf.user_factors)[:50]
    from stream.core.session import UserState

    same = all(
        twin.recommend(UserState(user_id=u), 10, 0) == rec.recommend(UserState(user_id=u), 10, 0)
        for u in listeners
    )
    result = {
        "format": name, "plays": n, "tracks": rec.catalogue_size(),
        "listeners": len(rec.mf.user_factors), "bytes": len(blob),
        "build_ms_median": round(1000 * statistics.median(build_s), 1),
        "build_ms_min": round(1000 * min(build_s), 1),
        "restore_ms_median": round(1000 * statistics.median(restore_s), 1),
        "restore_ms_min": round(1000 * min(restore_s), 1),
        "repeat": args.repeat, "restored_recommends_the_same": same,
        "feed_us_per_play": round(feed_s / n * 1e6, 1),
        "drift_learn_us_per_play": round(drift_us_per_play(), 2),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:<30} {v}" for k, v in
                                                          result.items()))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
