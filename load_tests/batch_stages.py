"""One play at a time vs stage by stage: ``Processor.process`` per record against
``Processor.process_batch`` over chunks, in-process (dict table, no Kafka or Redis), with
and without a cache polluter between calls.

The polluter stands in for what runs between two plays in the worker (Faust, asyncio,
aiokafka, the Redis writer): it sweeps a few MiB of numpy and Python objects, so the
core's code and data are cold again at the next call, as they are in the worker. Rankings
are done once per listener per flush (``rank_pending`` after each chunk), as in the worker.
Synthetic traffic (``SessionTraffic``). Rounds alternate the modes; medians are printed.

    python -m load_tests.batch_stages                      # 16,000 plays, batches of 32
    python -m load_tests.batch_stages --batch 8 --pollute-mib 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from load_tests.traffic import SessionTraffic
from stream.config import load_settings
from stream.core.events import encode_event
from stream.core.recommender import Recommender
from stream.processing.pipeline import Processor, Record


class Polluter:
    def __init__(self, mib: float) -> None:
        self.array = np.ones(int(mib * 1024 * 1024 / 8))
        self.objects = [{"a": i, "b": str(i)} for i in range(int(mib * 5000))]

    def __call__(self) -> None:
        if len(self.array):
            self.array.sum()
            for d in self.objects[::7]:
                d["a"]


def run(records: list[Record], batch: int, pollute: Polluter) -> float:
    """Seconds per play over the second half (warm models), ``batch`` = 1: one by one."""
    p = Processor(load_settings(env={}, file=None), Recommender(seed=0), {},
                  lambda w: None, lambda d: None, clock=time.time, defer_ranking=True)
    half = len(records) // 2
    spent = 0.0
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        pollute()
        t0 = time.perf_counter()
        if batch == 1:
            p.process(chunk[0])
        else:
            p.process_batch(chunk)
        p.rank_pending()
        if start >= half:
            spent += time.perf_counter() - t0
    return spent / (len(records) - half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=16_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pollute-mib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    now = int(time.time() * 1000)
    records = [
        Record("plays", 0, i, ev.user_id.encode(), encode_event(ev), now)
        for i, ev in enumerate(SessionTraffic().events(args.plays))
    ]
    polluter = Polluter(args.pollute_mib)
    results: dict[str, list[float]] = {"one at a time": [], f"batches of {args.batch}": []}
    for r in range(args.rounds):
        for name, size in (("one at a time", 1), (f"batches of {args.batch}", args.batch)):
            us = run(records, size, polluter) * 1e6
            results[name].append(us)
            print(f"round {r + 1}: {name:>16}: {us:6.1f} us/play", flush=True)
    med: dict[str, Any] = {k: statistics.median(v) for k, v in results.items()}
    one, many = med["one at a time"], med[f"batches of {args.batch}"]
    print(f"median: one at a time {one:.1f} us/play, batches of {args.batch} {many:.1f} "
          f"us/play ({one / many:.2f}x), polluter {args.pollute_mib:g} MiB")


if __name__ == "__main__":
    main()
