"""The learned ranking's cost per call, hot (session 17, docs/benchmarks.md "Issue 19,
session 17"): the replay's ``TestThenTrain`` over the first 10,000 MovieLens plays, then
the listeners of plays 10,000-14,000 (at most 89; 33 on MovieLens-100K) each ranked 15
times with their excluded plays, the minimum per listener, averaged over the listeners;
three passes, the best printed. The minimum drops the machine's load out; a replay pays
more per ranking (its arrays come cold from memory after learning). Run it alternately in
two trees to compare them:

    PYTHONPATH=<tree> python load_tests/blend_ranking.py [--datasets ../shared/datasets]

``--params '{"blend_cooc_window": 20}'``: the recommender's constructor arguments (a
fan-out's cost).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import stream
from stream.core.events import PlayEvent
from stream.core.recommender import Recommender, SeenTracks
from stream.core.session import UserState
from stream.tools.datasets import default_datasets_dir, load_events
from stream.tools.replay import TestThenTrain


def _listeners(events: list[PlayEvent], states: dict[str, UserState], limit: int) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for e in events:
        if e.user_id in states and e.user_id not in out and len(out) < limit:
            out[e.user_id] = e.ts_ms
    return list(out.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=Path, default=default_datasets_dir())
    p.add_argument("--params", type=json.loads, default={},
                   help="Recommender constructor arguments, as JSON")
    args = p.parse_args()
    events = load_events(args.datasets / "movielens-100k", "movielens", limit=14_000)
    rec = Recommender(seed=0, **args.params)
    rec.emit_item_steps(False)
    step = TestThenTrain(("blend",), k=10, exclude_seen=True, max_recent=30)
    states: dict[str, UserState] = {}
    for e in events[:10_000]:
        step.play(rec, states, e)
    users = _listeners(events[10_000:], states, 89)
    passes = []
    for _ in range(3):
        total = 0.0
        for user, ts in users:
            state, seen = states[user], step.seen.get(user) or SeenTracks(rec.vocabulary)
            best = 1.0
            for _ in range(15):
                t = time.perf_counter()
                rec.recommend(state, 10, ts, exclude=seen, variant="blend")
                best = min(best, time.perf_counter() - t)
            total += best
        passes.append(total / len(users) * 1e6)
    tree = Path(stream.__file__).parent.parent
    print(f"{tree} {json.dumps(args.params)}: {len(users)} listeners, per learned ranking "
          f"{min(passes):.1f} us "
          f"(passes {', '.join(f'{x:.1f}' for x in passes)})")


if __name__ == "__main__":
    main()
