"""Pauses in a drain: how long the full pipeline goes without applying a play while a
backlog waits.

P1 (load_tests/throughput.py) polls the worker's metrics once a second, so it sees a
drain's rate but not its gaps. This drill pre-fills a topic, drains it with a `stream
worker` (this tree's, or ``--worker-commit``'s, alternating round by round) and polls the
worker's ``stream_events_total`` every ``--interval`` s (a /metrics exposition costs the
worker ~10 ms of CPU, so the drain is a little slower than in P1: compare the pauses, not
the rates). It reports each round's longest time without progress before the last play,
and the plays done when it began. Session 15 found a 0.4-1 s pause at ~15.7k of 20k plays
in every P1 drain with 64-play batches: the seam's fetch waited Faust's whole 1 s while a
partition was out of it for a full buffer (stream/faustx/delivery.py, BUFFERED_WAIT_S).

    python -m load_tests.drain_pauses --count 20000 --rounds 2
    STREAM_AGENT_BATCH=64 python -m load_tests.drain_pauses --worker-commit fc982c7
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from load_tests.common import (
    Report,
    base_settings,
    baseline_tree,
    metric_sum,
    run_id,
    scrape,
    start_worker,
    table,
)
from load_tests.throughput import prefill, wait_series

Series = list[tuple[float, int]]


def longest_pause(series: Series, n: int) -> tuple[float, int]:
    """The longest time between two polls with the same count, below ``n`` (seconds, and
    the count it stood at); 0 if the count grew at every poll.

    >>> longest_pause([(0.0, 10), (0.1, 20), (0.2, 20), (0.5, 20), (0.6, 30)], 30)
    (0.4, 20)
    """
    best, at = 0.0, 0
    since: tuple[float, int] | None = None
    for t, c in series:
        if since is not None and c == since[1] and c < n:
            if t - since[0] > best:
                best, at = round(t - since[0], 6), c
            continue
        since = (t, c)
    return best, at


def drain(rid: str, topic: str, n: int, log_dir: Path, interval: float, timeout_s: float,
          name: str, tree: Path | None) -> Series:
    """Drain ``topic`` with one worker, polling its applied plays; the (time, count) series
    from the first applied play."""
    proc = start_worker(f"{rid}-{name}", topic, log_dir, name=name, tree=tree)

    def done() -> int:
        m = scrape(proc.metrics_url, timeout=1.0)
        return int(metric_sum(m, "stream_events_total", topic=topic)) if m else 0

    try:
        series = wait_series(proc, name, n, timeout_s, done, [], interval=interval)
    finally:
        proc.stop()
    return [(t, c) for t, c in series if c > 0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.drain_pauses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000, help="plays pre-filled and drained")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between polls")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=240.0, help="max seconds per drain")
    ap.add_argument("--worker-commit", metavar="COMMIT",
                    help="also drain with this commit's worker, alternating round by round")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.interval <= 0 or args.count < 1:
        ap.error("--rounds, --interval and --count must be positive")
    rid = run_id("pauses")
    topic = f"{rid}-plays"
    settings = base_settings().replace(
        partitions=args.partitions, plays_topic=topic, dlq_topic=f"{topic}-dlq")
    report = Report("drain_pauses", rid)
    fill = asyncio.run(prefill(settings, topic, "synthetic", args.count, 120.0, rid))
    n = int(fill["sent"])
    rows: list[list[Any]] = []
    runs: list[dict[str, Any]] = []
    with baseline_tree(args.worker_commit) as base:
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if base is not None:
            trees.insert(0, (f"worker {args.worker_commit}", base))
        for i in range(args.rounds):
            for label, tree in trees:
                name = f"w{i + 1}{'b' if tree is not None else ''}"
                series = drain(rid, topic, n, report.dir, args.interval, args.timeout, name, tree)
                pause, at = longest_pause(series, n)
                seconds = series[-1][0] - series[0][0] if len(series) > 1 else float("nan")
                runs.append({"tree": label, "round": i + 1, "longest_pause_s": pause,
                             "pause_at_plays": at, "seconds": seconds, "series": series})
                rows.append([label, i + 1, f"{pause * 1000:.0f}", at, f"{seconds:.2f}"])
    report.data.update({"scenario": "pauses in a drain (polled every --interval s)",
                        "count": n, "interval_s": args.interval, "runs": runs})
    print(table(rows, ["tree", "round", "longest pause ms", "at plays", "drain s"]))
    print(f"report: {report.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
