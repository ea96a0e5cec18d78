"""P1 throughput: three consumers drain the same pre-filled topic on the same broker.

(a) raw aiokafka consume + orjson decode, (b) a Faust agent that only counts
(load_tests/count_app.py), (c) the full pipeline (`stream worker` subprocess). Each reads the
topic from the earliest offset in its own consumer group, one after the other (never at the
same time: the machine has 2 cores). Rate = events / (time of the N-th event - time of the
first), so start-up and group join are excluded. Target P1: full / count-only >= 0.5.

    python -m load_tests.throughput --count 40000            # synthetic sessions
    python -m load_tests.throughput --source lastfm --count 20000
    python -m load_tests.throughput --only count,full --baseline 0e753f0 --rounds 2

Writes load_tests/results/<run>/throughput.json and throughput.png; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from tqdm import tqdm

from load_tests import profile as profiler
from load_tests.common import (
    Proc,
    Report,
    base_settings,
    baseline_tree,
    metric_sum,
    rss_bytes,
    run_id,
    scrape,
    spawn,
    start_worker,
    table,
    wait_assigned,
)
from load_tests.traffic import make_events, produce, source_label
from stream.adapters.kafka import client_kwargs
from stream.config import Settings

Series = list[tuple[float, int]]  # (epoch seconds, events done so far)


def drain_rate(series: Series, n: int) -> dict[str, float]:
    """Rates from a (time, count) series: whole drain (first event -> N-th) and the steady
    middle (10 % -> 90 % of N), by interpolating the times those counts were reached."""
    pts = [(t, c) for t, c in series if c > 0]
    if len(pts) < 2:
        return {
            "events": pts[-1][1] if pts else 0,
            "complete": False,
            "seconds": float("nan"),
            "rate": float("nan"),
            "steady_rate": float("nan"),
        }
    complete = pts[-1][1] >= n
    n = min(n, pts[-1][1])  # timed out: rate over what was drained (marked incomplete)

    def t_at(target: float) -> float:
        prev = pts[0]
        for t, c in pts:
            if c >= target:
                if c == prev[1]:
                    return t
                return prev[0] + (t - prev[0]) * (target - prev[1]) / (c - prev[1])
            prev = (t, c)
        return pts[-1][0]

    t0, c0 = pts[0]
    t_end = t_at(n)
    seconds = t_end - t0
    mid = t_at(0.9 * n) - t_at(0.1 * n)
    return {
        "events": n,
        "complete": complete,
        "seconds": seconds,
        "rate": (n - c0) / seconds if seconds > 0 else float("nan"),
        "steady_rate": 0.8 * n / mid if mid > 0 else float("nan"),
    }


async def raw_consume(
    settings: Settings, topic: str, group: str, n: int, timeout_s: float
) -> Series:
    """Baseline (a): aiokafka getmany + orjson.loads of every value, own group, earliest."""
    consumer = AIOKafkaConsumer(
        topic,
        **client_kwargs(settings),
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        max_poll_records=2000,
    )
    await consumer.start()
    series: Series = []
    count = 0
    checksum = 0
    bar = tqdm(total=n, desc="(a) raw aiokafka", unit="ev", file=sys.stderr, mininterval=0.5)
    try:
        deadline = time.monotonic() + timeout_s
        while count < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for r in records:
                    checksum += len(orjson.loads(r.value))
                count += sum(len(r) for r in batches.values())
                series.append((time.time(), count))
            bar.update(min(count, n) - bar.n)
    finally:
        bar.close()
        await consumer.stop()
    return series


def read_progress(path: Path) -> Series:
    series: Series = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                series.append((float(parts[0]), int(parts[1])))
    except OSError:
        pass
    return series


def _next_poll(series: Series, n: int, interval: float) -> float:
    """Seconds to the next poll: ``interval``, but denser as the drain nears ``n`` (at
    least 20 Hz), so the end time is not overstated by up to a whole interval: with 1 s
    polls of a ~6 s drain that bias alone cost the full pipeline up to ~15 % of its rate
    (the count-only agent logs its own progress, every 500 events)."""
    if len(series) < 2 or series[-1][1] <= series[-2][1]:
        return interval
    (t1, c1), (t2, c2) = series[-2], series[-1]
    remaining_s = (n - c2) * (t2 - t1) / (c2 - c1)
    return min(interval, max(0.05, remaining_s / 3))


def wait_series(
    proc: Proc,
    label: str,
    n: int,
    timeout_s: float,
    sample: Any,
    rss: list[tuple[float, int]],
    interval: float = 0.1,
) -> Series:
    """Poll ``sample()`` (-> events done) every ``interval`` s until ``n`` or the timeout."""
    series: Series = []
    bar = tqdm(total=n, desc=label, unit="ev", file=sys.stderr, mininterval=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
            got = sample()
            if isinstance(got, list):
                series = got
                done = got[-1][1] if got else 0
            else:
                done = got
                series.append((time.time(), done))
            r = rss_bytes(proc.pid)
            if r:
                rss.append((time.time(), r))
            bar.update(min(done, n) - bar.n)
            if done >= n:
                break
            time.sleep(_next_poll(series, n, interval))
    finally:
        bar.close()
    return series


def count_only(
    rid: str,
    topic: str,
    partitions: int,
    n: int,
    timeout_s: float,
    log_dir: Path,
    rss: list[tuple[float, int]],
) -> Series:
    progress = log_dir / "count_app.progress"
    env = {
        "LT_APP_ID": f"{rid}-count",
        "LT_TOPIC": topic,
        "LT_PARTITIONS": str(partitions),
        "LT_PROGRESS": str(progress),
        "LT_EXPECT": str(n),
        "LT_EVERY": "500",
    }
    proc = spawn(
        "count_app", [sys.executable, "-m", "load_tests.count_app", "worker"], env, log_dir
    )
    try:
        return wait_series(
            proc, "(b) faust count-only", n, timeout_s, lambda: read_progress(progress), rss
        )
    finally:
        proc.stop()


def full_pipeline(
    rid: str,
    topic: str,
    n: int,
    timeout_s: float,
    log_dir: Path,
    rss: list[tuple[float, int]],
    profile_s: float = 0.0,
    *,
    name: str = "worker",
    label: str = "(c) full pipeline",
    tree: Path | None = None,
) -> tuple[Series, dict[str, Any]]:
    proc = start_worker(f"{rid}-{name}", topic, log_dir, name=name, tree=tree)
    spy = None
    if profile_s > 0:
        wait_assigned(proc, topic)
        spy = profiler.start(proc.pid, profile_s, log_dir / f"{name}.pyspy.txt")

    def done() -> int:
        m = scrape(proc.metrics_url, timeout=1.0)
        return int(metric_sum(m, "stream_events_total", topic=topic)) if m else 0

    try:
        # 1 s: a /metrics exposition costs the worker ~10 ms of CPU (py-spy), so scraping it
        # at 10 Hz would slow the very thing measured; the drain lasts many seconds anyway
        series = wait_series(proc, label, n, timeout_s, done, rss, interval=1.0)
        time.sleep(1.0)  # let the writer flush and the 2 s reporter run once more
        m = scrape(proc.metrics_url) or []
        extra = {
            "outcomes": {
                o: metric_sum(m, "stream_events_total", topic=topic, outcome=o)
                for o in ("processed", "rejected", "duplicate")
            },
            "redis_written": metric_sum(m, "stream_redis_writes_total", result="written"),
            "stage_seconds_mean": {
                st: metric_sum(m, "stream_stage_seconds_sum", stage=st)
                / max(1.0, metric_sum(m, "stream_stage_seconds_count", stage=st))
                for st in ("decode", "session", "learn", "rank", "enqueue")
            },
            "stage_count": {
                st: metric_sum(m, "stream_stage_seconds_count", stage=st)
                for st in ("decode", "session", "learn", "rank", "enqueue")
            },
            "processing_seconds_mean": metric_sum(m, "stream_processing_seconds_sum")
            / max(1.0, metric_sum(m, "stream_processing_seconds_count")),
        }
        if spy is not None:
            profiler.finish(spy, profile_s + 60)
            extra["profile"] = profiler.summarise(log_dir / f"{name}.pyspy.txt")
        return series, extra
    finally:
        proc.stop()


def plot(
    path: Path, results: dict[str, Any], rss: dict[str, list[tuple[float, int]]], label: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, res in results.items():
        series = [(t, c) for t, c in res["series"] if c > 0]
        if len(series) < 2:
            continue
        t0 = series[0][0]
        xs, ys = [], []
        # rate over ~0.5 s windows
        j = 0
        for i in range(1, len(series)):
            if series[i][0] - series[j][0] >= 0.5 or i == len(series) - 1:
                dt = series[i][0] - series[j][0]
                if dt > 0:
                    xs.append(series[i][0] - t0)
                    ys.append((series[i][1] - series[j][1]) / dt)
                j = i
        ax.plot(xs, ys, label=f"{name}: {res['rate']:,.0f} ev/s", marker=".", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since first event")
    ax.set_ylabel("events/s (0.5 s windows)")
    ax.set_title(f"P1 drain throughput -- {label}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    for name, pts in rss.items():
        if pts:
            t0 = pts[0][0]
            ax2.plot([t - t0 for t, _ in pts], [r / 2**20 for _, r in pts], label=name)
    ax2.set_xlabel("seconds since process start")
    ax2.set_ylabel("RSS (MiB)")
    ax2.set_title("consumer process RSS")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def prefill(
    settings: Settings, topic: str, source: str, n: int, seconds: float, rid: str
) -> dict[str, float]:
    events = make_events(source, n, prefix="syn")
    return await produce(
        settings,
        events,
        topic=topic,
        max_count=n,
        max_seconds=seconds,
        rate=None,
        time_mode="now",
        linger_ms=5,
        desc="prefill",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--source", choices=("synthetic", "lastfm", "movielens", "spotify"), default="synthetic"
    )
    ap.add_argument("--count", type=int, default=40_000, help="events pre-filled and drained")
    ap.add_argument("--timeout", type=float, default=240.0, help="max seconds per consumer")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--only", default="raw,count,full", help="subset, e.g. count,full")
    ap.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the full worker for SECONDS of its drain (slows it a little); keep it "
        "below the drain's length: py-spy samples the worker until SECONDS are up, and after "
        "the drain its timers (e.g. the 10 Hz similar-list refresh) fill the profile",
    )
    ap.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also drain with this commit's worker (a git worktree), alternating with this "
        "tree's, round by round: a paired speed-up in the same session",
    )
    ap.add_argument("--rounds", type=int, default=1, help="full-pipeline rounds (with --baseline)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    rid = run_id("p1")
    topic = f"{rid}-plays"
    settings = base_settings().replace(
        partitions=args.partitions, plays_topic=topic, dlq_topic=f"{topic}-dlq"
    )
    report = Report("throughput", rid)
    log_dir = report.dir
    label = source_label(args.source)
    print(f"run {rid}: topic {topic}, {args.count:,} events, {label}", file=sys.stderr)
    fill = asyncio.run(
        prefill(settings, topic, args.source, args.count, max(120.0, args.timeout), rid)
    )
    n = int(fill["sent"])
    results: dict[str, Any] = {}
    rss: dict[str, list[tuple[float, int]]] = {}
    only = set(args.only.split(","))
    if "raw" in only:
        series = asyncio.run(raw_consume(settings, topic, f"{rid}-raw", n, args.timeout))
        results["raw aiokafka+orjson"] = {"series": series, **drain_rate(series, n)}
    if "count" in only:
        rss["faust count-only"] = []
        series = count_only(
            rid, topic, args.partitions, n, args.timeout, log_dir, rss["faust count-only"]
        )
        results["faust count-only"] = {"series": series, **drain_rate(series, n)}
    paired: list[dict[str, float]] = []
    if "full" in only:
        with baseline_tree(args.baseline) as base:
            for i in range(args.rounds):
                suffix = f" r{i + 1}" if args.rounds > 1 else ""
                base_rate = float("nan")
                if base is not None:
                    key = f"baseline {args.baseline}{suffix}"
                    rss[key] = []
                    series, extra = full_pipeline(
                        rid, topic, n, args.timeout, log_dir, rss[key],
                        name=f"base{i + 1}", label=f"(c0) baseline {args.baseline}{suffix}",
                        tree=base,
                    )
                    results[key] = {"series": series, **drain_rate(series, n), **extra}
                    base_rate = results[key]["rate"]
                key = f"full pipeline{suffix}"
                rss[key] = []
                series, extra = full_pipeline(
                    rid, topic, n, args.timeout, log_dir, rss[key],
                    args.profile if i == 0 else 0.0,
                    name=f"worker{i + 1}" if args.rounds > 1 else "worker",
                    label=f"(c) full pipeline{suffix}",
                )
                results[key] = {"series": series, **drain_rate(series, n), **extra}
                if base is not None:
                    paired.append({"round": i + 1, "baseline": base_rate,
                                   "this_tree": results[key]["rate"],
                                   "ratio": results[key]["rate"] / base_rate})
        if args.rounds > 1:  # the P1 ratio uses this tree's median round
            rates = sorted(results[f"full pipeline r{i + 1}"]["rate"] for i in range(args.rounds))
            median_key = next(f"full pipeline r{i + 1}" for i in range(args.rounds)
                              if results[f"full pipeline r{i + 1}"]["rate"] == rates[len(rates) // 2])
            results["full pipeline"] = results[median_key]
            rss["full pipeline"] = rss[median_key]

    def ratio(a: str, b: str) -> float:
        if a in results and b in results:
            return results[a]["rate"] / results[b]["rate"]
        return float("nan")

    ratios = {
        "full/count_only (P1, target >= 0.5)": ratio("full pipeline", "faust count-only"),
        "full/raw": ratio("full pipeline", "raw aiokafka+orjson"),
        "count_only/raw": ratio("faust count-only", "raw aiokafka+orjson"),
    }
    full = results.get("full pipeline", {})
    per_event_us = {name: 1e6 / r["rate"] for name, r in results.items() if r["rate"] == r["rate"]}
    rows = [
        [
            name + ("" if r["complete"] else " (timed out)"),
            r["events"],
            r["seconds"],
            r["rate"],
            r["steady_rate"],
            per_event_us.get(name, float("nan")),
        ]
        for name, r in results.items()
        if not (args.rounds > 1 and name == "full pipeline")  # an alias of the median round
    ]
    print(
        f"\nP1 throughput ({label}; {n:,} events pre-filled in {fill['seconds']:.1f} s, "
        f"{args.partitions} partitions, each consumer alone, own group, from earliest)"
    )
    print(table(rows, ["consumer", "events", "seconds", "events/s", "steady 10-90%", "us/event"]))
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    for row in paired:
        print(f"  round {row['round']}: this tree / baseline {args.baseline} = "
              f"{row['this_tree']:,.0f} / {row['baseline']:,.0f} = {row['ratio']:.2f}x")
    if full.get("stage_seconds_mean"):
        stages = ", ".join(f"{k} {v * 1e6:.0f}" for k, v in full["stage_seconds_mean"].items())
        counts = full.get("stage_count", {})
        if counts.get("decode"):
            stages += f" (rankings per play {counts.get('rank', 0) / counts['decode']:.2f})"
        print(
            f"  full pipeline mean stage us/event (worker histograms): {stages}; "
            f"processing {full['processing_seconds_mean'] * 1e6:.0f}"
        )
    peak = {k: max((r for _, r in v), default=0) / 2**20 for k, v in rss.items()}
    for k, v in peak.items():
        print(f"  peak RSS {k}: {v:.0f} MiB")
    if full.get("profile"):
        profiler.print_summary(full["profile"])
    report.data = {
        "scenario": "P1 throughput (drain of a pre-filled topic)",
        "traffic": label,
        "topic": topic,
        "partitions": args.partitions,
        "prefill": fill,
        "results": results,
        "ratios": ratios,
        "baseline": args.baseline,
        "paired_rounds": paired,
        "us_per_event": per_event_us,
        "peak_rss_mib": peak,
        "rss": rss,
    }
    path = report.write()
    png = report.dir / "throughput.png"
    plot(png, results, rss, label)
    print(f"report: {path}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
