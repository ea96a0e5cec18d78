"""The rank path's cost per ranking, in-process (session 14, docs/benchmarks.md "Session
14: P1, the rank stage"): the processor as the worker builds it (``partitions=4``, the live
evaluator), 12,000 synthetic plays in batches of 64; the second half's ranking passes are
captured and re-ranked with the final models in the budgeted pass's shape (one listener,
then sub-chunks of 8: ``perf_counter`` frozen), ``rank_pending`` including the documents.
Prints CPU per ranking (the minimum of 7 repeats) and the compiled kernels' wall share.
Run it alternately in two trees to compare them:

    PYTHONPATH=<tree> python load_tests/rank_path.py LABEL
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

import stream.core.recommender as recommender_module
import stream.processing.pipeline as pipeline
from load_tests.traffic import SessionTraffic
from stream.config import load_settings
from stream.core.evaluation import Prequential
from stream.core.events import encode_event, key_partition
from stream.core.recommender import Recommender
from stream.processing.pipeline import Processor, Record

NOW_MS = 1_765_000_000_000
REAL_CLOCK = pipeline.time.perf_counter


def drain_budgeted(p: Processor) -> None:
    """Rank everything waiting in budgeted passes with a frozen clock (1, then 8s)."""
    pipeline.time.perf_counter = lambda: 100.0
    try:
        while p.rank_waiting():
            p.rank_pending(budget_s=0.015)
    finally:
        pipeline.time.perf_counter = REAL_CLOCK


def _processor(plays: int) -> tuple[Processor, list[list[Any]]]:
    """The processor after ``plays`` plays, and the second half's passes (their entries)."""
    records = [Record("plays", key_partition(ev.user_id.encode(), 4), i, ev.user_id.encode(),
                      encode_event(ev), NOW_MS)
               for i, ev in enumerate(SessionTraffic().events(plays))]
    settings = load_settings(env={}, file=None)
    rec = Recommender(blend=settings.ranker, session_models=False)
    rec.emit_item_steps(False)
    p = Processor(settings, rec, {}, lambda w: None, lambda d: None, defer_ranking=True,
                  partitions=4, evaluator=Prequential(k=10, window=settings.quality_window),
                  clock=lambda: NOW_MS / 1000)
    passes: list[list[Any]] = []
    half = (plays // 2) // 64 * 64
    for start in range(0, plays, 64):
        p.process_batch(records[start:start + 64])
        if start >= half:
            passes.append([*p.pending_rank.values(), *p.pending_first.values()])
        drain_budgeted(p)
    return p, passes


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "tree"
    p, passes = _processor(12_000)
    n = sum(len(x) for x in passes)
    kernel_s = [0.0]

    def timed(kernel: Any) -> Any:
        def call(*args: Any) -> Any:
            t = REAL_CLOCK()
            out = kernel(*args)
            kernel_s[0] += REAL_CLOCK() - t
            return out
        return call

    kernels = recommender_module._k
    kernels.rank_many = timed(kernels.rank_many)
    kernels.rank_query = timed(kernels.rank_query)
    best: tuple[float, float] | None = None
    for _ in range(7):
        gc.collect()
        kernel_s[0] = 0.0
        t = time.process_time()
        for entries in passes:
            for entry in entries:
                p.pending_rank[entry[0].user_id] = entry
            drain_budgeted(p)
        cpu = time.process_time() - t
        if best is None or cpu < best[0]:
            best = (cpu, kernel_s[0])
    assert best is not None
    cpu, kernel = best
    print(f"{label}: rank path (rank_pending incl. documents) {cpu / n * 1e6:.1f} us CPU per "
          f"ranking, of which the kernels {kernel / n * 1e6:.1f} (wall), the rest "
          f"{(cpu - kernel) / n * 1e6:.1f}; {n} rankings in {len(passes)} passes")


if __name__ == "__main__":
    main()
