"""``python -m load_tests.ids_memory``: does parsing still share one string per id, and what
does the worker's heap cost with it? Plays are encoded to JSON first and parsed by the real
``Processor.process_batch`` (``parse_event``: where ids are shared), in batches of 64 with
``rank_pending`` after each, a dict session table, the default settings. Reports the RSS
growth over the processing after the first 1,024 plays (the encoded plays are made before), the listeners' recent-ring
entries, the distinct strings among them and the distinct string OBJECTS among them (equal
to the strings when every track id is one shared object). Runs in any tree: ``PYTHONPATH``
decides.

    python -m load_tests.ids_memory [--dataset 30music | --synthetic LISTENERS] [--plays N]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(dataset: str, listeners: int, plays: int) -> dict[str, Any]:
    from load_tests.traffic import SessionTraffic
    from stream.config import load_settings
    from stream.core.evaluation import Prequential
    from stream.core.events import encode_event, key_partition
    from stream.processing.pipeline import Processor, Record
    from stream.tools.datasets import default_datasets_dir, load_events
    from stream.worker.app import configure_recommender

    if dataset == "30music":
        events = load_events(default_datasets_dir() / "30music-200ks", "sessionrec", plays)
    else:
        traffic = SessionTraffic(users=listeners, tracks=listeners, artists=listeners // 10,
                                 sequential_users=True)
        events = list(traffic.events(plays))
    now = int(time.time() * 1000)
    records = [Record("plays", key_partition(ev.user_id.encode(), 4), i, ev.user_id.encode(),
                      encode_event(ev), now)
               for i, ev in enumerate(events)]
    del events
    settings = load_settings(env={}, file=None)
    rec = configure_recommender(None, settings)
    table: dict[str, Any] = {}
    proc = Processor(settings, rec, table, lambda w: None, lambda d: None, defer_ranking=True,
                     partitions=4, evaluator=Prequential(k=10, window=settings.quality_window))
    warm = 1024  # the first calls' allocations (kernels, caches) out of the measurement
    for start in range(0, warm, 64):
        proc.process_batch(records[start : start + 64])
        proc.rank_pending()
    gc.collect()
    before = _rss()
    started = time.perf_counter()
    for start in range(warm, len(records), 64):
        proc.process_batch(records[start : start + 64])
        proc.rank_pending()
        if start % 20_480 == 0:
            print(f"[ids_memory] {start} plays, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    gc.collect()
    grown = _rss() - before
    ring = [t for state in table.values() for t in state.recent]
    return {"plays": len(records), "listeners": len(table), "rss_growth_mb": round(grown / 2**20, 1),
            "ring_entries": len(ring), "distinct_ids": len(set(ring)),
            "distinct_objects": len({id(t) for t in ring})}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="30music", choices=("30music", "synthetic"))
    parser.add_argument("--synthetic", type=int, default=0, metavar="LISTENERS")
    parser.add_argument("--plays", type=int, default=None)
    args = parser.parse_args()
    kind = "synthetic" if args.synthetic else args.dataset
    count = args.plays or (300_000 if kind == "synthetic" else 100_000)
    print(run(kind, args.synthetic or 200_000, count), flush=True)
