"""Hot-path timings of the recommendation core (no Kafka/Redis): learn_one and recommend per
call, over the MovieLens-100K stream, with river's FunkMF update measured in the same run as
a machine-speed reference (the issue quotes ~9 us for it on the reference box).

    python -m load_tests.core_timing [--events 20000] [--datasets ../shared/datasets]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from river import optim, reco

from stream.core.recommender import VARIANTS, Recommender
from stream.core.session import update_session
from stream.tools.datasets import default_datasets_dir, load_events


def _per_call_us(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        "p50_us": round(samples[len(samples) // 2] * 1e6, 1),
        "p99_us": round(samples[int(len(samples) * 0.99)] * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--datasets", type=Path, default=default_datasets_dir())
    args = parser.parse_args()
    events = load_events(args.datasets / "movielens-100k", "movielens", limit=args.events)

    funk = reco.FunkMF(n_factors=10, optimizer=optim.SGD(0.05), seed=0)
    t = time.process_time()
    for e in events[:5000]:
        funk.learn_one(e.user_id, e.track_id, 1.0)
    river_us = (time.process_time() - t) / 5000 * 1e6

    rec = Recommender(seed=0)
    states: dict = {}
    learn: list[float] = []
    recommend: dict[str, list[float]] = {v: [] for v in VARIANTS}
    clock = time.perf_counter
    for i, e in enumerate(events):
        up = update_session(states.get(e.user_id), e)
        if up.duplicate:
            continue
        if i >= len(events) // 2:  # time on a warm model only
            for v in VARIANTS:
                t0 = clock()
                rec.recommend(up.before, 10, e.ts_ms, variant=v)
                recommend[v].append(clock() - t0)
        t0 = clock()
        rec.learn_one(up, e)
        learn.append(clock() - t0)
        states[e.user_id] = up.state
    print(f"river FunkMF learn_one (reference): {river_us:.1f} us/update (CPU time)")
    print(f"learn_one: {_per_call_us(learn[len(learn) // 2 :])}")
    for v, samples in recommend.items():
        print(f"recommend[{v}]: {_per_call_us(samples)}")
    print(f"catalogue: {rec.catalogue_size()} tracks, {len(states)} listeners")


if __name__ == "__main__":
    main()
