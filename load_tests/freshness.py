"""P2 freshness under sustained load: a full `stream worker` (its own topic, group, Redis
prefix, channel and metrics port) is fed at ``--rate`` events/s for ``--seconds``.

Freshness of an event = the wall-clock time its producer called ``send`` -> the arrival of
the pub/sub notification carrying its ``event_id`` (recorded by a separate subscriber
process, load_tests/subscriber.py). Also recorded: ``generated_at - send time`` (ranked),
consumer lag every second (the worker's ``stream_consumer_lag_messages`` and Kafka end
offsets minus the group's committed offsets), worker RSS, events/s produced and processed.
A user's later event within one flush interval replaces the earlier write (coalescing), so
a few events get no notification of their own: the report gives the match coverage.

Targets: p50 <= 10 ms, p99 <= 50 ms, lag not growing.

    python -m load_tests.freshness --rate 1000 --seconds 60     # P2
    python -m load_tests.freshness --rate 1000 --seconds 10     # quick variant
    python -m load_tests.freshness --rate 1000 --seconds 60 --workers 2   # scaled out
    python -m load_tests.freshness --source lastfm --rate 500 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from load_tests.common import (
    GroupLag,
    Proc,
    Report,
    base_settings,
    baseline_tree,
    histogram_summary,
    live_quality,
    metric_sum,
    percentiles,
    rss_bytes,
    run_id,
    scrape,
    slope,
    start_worker,
    table,
    wait_assigned,
    wait_group_stable,
)
from load_tests.traffic import make_events, produce, source_label
from stream.config import Settings
from stream.core.events import PlayEvent

Sample = dict[str, Any]


async def sample_loop(
    settings: Settings,
    workers: list[Proc],
    group: str,
    topic: str,
    samples: list[Sample],
    stop: asyncio.Event,
    max_seconds: float,
) -> None:
    """Once a second: worker metrics (events, lag), group lag from Kafka, worker RSS
    (summed over the workers of the group)."""
    lag = GroupLag(settings, group, topic)
    await lag.start()
    deadline = time.monotonic() + max_seconds
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            t = time.time()
            scraped = [await asyncio.to_thread(scrape, w.metrics_url, 1.0) for w in workers]
            m = None if any(x is None for x in scraped) else [s for x in scraped for s in x or ()]
            rss = [rss_bytes(w.pid) for w in workers]
            samples.append(
                {
                    "t": t,
                    "processed": metric_sum(m, "stream_events_total", topic=topic) if m else None,
                    "metrics_lag": metric_sum(m, "stream_consumer_lag_messages", topic=topic)
                    if m
                    else None,
                    "group_lag": await lag.lag(),
                    "rss": None if None in rss else sum(r or 0 for r in rss),
                    "redis_pending": metric_sum(m, "stream_redis_pending_writes") if m else None,
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, 1.0 - (time.time() - t)))
    finally:
        await lag.stop()


async def scenario(args: argparse.Namespace, rid: str, report: Report) -> dict[str, Any]:
    topic = f"{rid}-plays"
    # its own control topic too: it must have the plays topic's partition count
    settings: Settings = base_settings().replace(
        plays_topic=topic, dlq_topic=f"{topic}-dlq", partitions=args.partitions,
        control_topic=f"{topic}-control",
    )
    worker_id = f"{rid}-full"
    channel = f"{worker_id}-updates"
    total = int(args.rate * args.seconds)
    warm = int(args.rate * args.warmup)
    events = make_events(args.source, warm + total, users=args.users)
    # create the topic before the worker so it gets --partitions
    from stream.adapters.kafka import ensure_topics

    await ensure_topics(settings)
    # --workers N: one consumer group, the Kafka way (partitions split between them)
    workers = [
        start_worker(worker_id, topic, report.dir, name="worker" if i == 0 else f"worker-{i}",
                     tree=args.tree,
                     extra_env={"STREAM_CONTROL_TOPIC": settings.control_topic})
        for i in range(args.workers)
    ]
    notes_path = report.dir / "notifications.tsv"
    sub_seconds = args.warmup + args.seconds * 1.5 + args.drain + 60
    sub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "load_tests.subscriber",
            "--redis-url",
            settings.redis_url,
            "--channel",
            channel,
            "--seconds",
            str(sub_seconds),
            "--out",
            str(notes_path),
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    samples: list[Sample] = []
    sent_at: dict[str, float] = {}
    sent_user: dict[str, str] = {}
    phase = {"measured": False}
    stop = asyncio.Event()
    sampler: asyncio.Task[None] | None = None
    try:
        waited = max([await asyncio.to_thread(wait_assigned, w, topic) for w in workers])
        if getattr(args, "stable_s", 0) and len(workers) > 1:
            # workers join one by one: let the group's last rebalance end before measuring
            waited += await asyncio.to_thread(
                wait_group_stable, workers, topic, args.partitions, args.stable_s)
        assert sub.stdout is not None
        line = await asyncio.to_thread(sub.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError("subscriber did not start")
        sampler = asyncio.create_task(
            sample_loop(settings, workers, worker_id, topic, samples, stop, sub_seconds)
        )

        def on_send(ev: PlayEvent, t: float) -> None:
            if phase["measured"]:
                sent_at[ev.event_id] = t
                sent_user[ev.event_id] = ev.user_id

        it = iter(events)
        t_warm = time.time()
        if warm:
            await produce(
                settings,
                it,
                topic=topic,
                max_count=warm,
                max_seconds=args.warmup * 3,
                rate=args.rate,
                linger_ms=args.linger_ms,
                desc="warm-up",
            )
        phase["measured"] = True
        t_start = time.time()
        prod = await produce(
            settings,
            it,
            topic=topic,
            max_count=total,
            max_seconds=args.seconds * 1.5,
            rate=args.rate,
            on_send=on_send,
            linger_ms=args.linger_ms,
            desc=f"P2 {args.rate:g} ev/s",
        )
        t_end = time.time()
        # drain: until the worker has processed everything we sent (bounded)
        expected = warm + prod["sent"]
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline:
            if samples and (samples[-1]["processed"] or 0) >= expected:
                break
            await asyncio.sleep(0.25)
        # settle: the workers' report timer (2 s) exports the last plays' quality gauges
        await asyncio.sleep(getattr(args, "settle_s", 1.0))
        t_drained = time.time()
    finally:
        stop.set()
        if sampler is not None:
            await sampler
        sub.terminate()
        try:
            sub.wait(30)
        except subprocess.TimeoutExpired:
            sub.kill()
        final = [s for w in workers for s in scrape(w.metrics_url) or ()]
        for w in workers:
            w.stop()
    notes = read_notes(notes_path)
    return analyse(
        args,
        settings,
        sent_at,
        sent_user,
        notes,
        samples,
        prod,
        final,
        t_warm=t_warm,
        t_start=t_start,
        t_end=t_end,
        t_drained=t_drained,
        wait_assigned_s=waited,
        warm=warm,
    )


def read_notes(path: Path) -> list[tuple[float, dict[str, Any]]]:
    out: list[tuple[float, dict[str, Any]]] = []
    try:
        for line in path.read_bytes().splitlines():
            t, _, data = line.partition(b"\t")
            out.append((float(t), orjson.loads(data)))
    except OSError:
        pass
    return out


def analyse(
    args: argparse.Namespace,
    settings: Settings,
    sent_at: dict[str, float],
    sent_user: dict[str, str],
    notes: list[tuple[float, dict[str, Any]]],
    samples: list[Sample],
    prod: dict[str, float],
    final: Any,
    *,
    t_warm: float,
    t_start: float,
    t_end: float,
    t_drained: float,
    wait_assigned_s: float,
    warm: int,
) -> dict[str, Any]:
    fresh: list[tuple[float, float, float]] = []  # (send time, freshness ms, generated ms)
    for recv, note in notes:
        t_send = sent_at.get(note.get("event_id", ""))
        if t_send is None:
            continue
        fresh.append((t_send, (recv - t_send) * 1000.0, note["generated_at"] - t_send * 1000.0))
    fresh.sort()
    f_ms = [f for _, f, _ in fresh]
    g_ms = [g for _, _, g in fresh]
    per_second: list[dict[str, float]] = []
    if fresh:
        for sec in range(int(math.ceil(t_end - t_start)) + 1):
            lo, hi = t_start + sec, t_start + sec + 1
            xs = [f for t, f, _ in fresh if lo <= t < hi]
            if xs:
                p = percentiles(xs)
                per_second.append(
                    {"t": sec, "p50": p["p50"], "p99": p["p99"], "max": p["max"], "n": len(xs)}
                )
    run_samples = [s for s in samples if t_start <= s["t"] <= t_end]

    def trend(key: str) -> dict[str, float]:
        pts = [(s["t"] - t_start, s[key]) for s in run_samples if s[key] is not None]
        ys = [y for _, y in pts]
        third = max(1, len(ys) // 3)
        return {
            "slope_per_s": slope(pts),
            "first_third_mean": sum(ys[:third]) / third if ys else math.nan,
            "last_third_mean": sum(ys[-third:]) / third if ys else math.nan,
            "max": max(ys) if ys else math.nan,
            "after_drain": next(
                (s[key] for s in reversed(samples) if s[key] is not None), math.nan
            ),
        }

    processed = [(s["t"], s["processed"]) for s in samples if s["processed"] is not None]
    proc_rate = math.nan
    inside = [(t, c) for t, c in processed if t_start <= t <= t_end]
    if len(inside) >= 2:
        proc_rate = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    lag_m, lag_g = trend("metrics_lag"), trend("group_lag")
    fp = percentiles(f_ms)
    users_sent = len(set(sent_user.values()))
    result = {
        "scenario": "P2 sustained-rate freshness",
        "traffic": source_label(args.source),
        "target_rate": args.rate,
        "seconds": args.seconds,
        "warmup_events": warm,
        "producer": prod,
        "producer_linger_ms": args.linger_ms,
        "worker_assign_wait_s": wait_assigned_s,
        "processed_rate_during_run": proc_rate,
        "events_sent": len(sent_at),
        "distinct_users_sent": users_sent,
        "notifications_matched": len(fresh),
        "match_coverage": len(fresh) / len(sent_at) if sent_at else math.nan,
        "freshness_ms": fp,
        "generated_minus_send_ms": percentiles(g_ms),
        "freshness_per_second": per_second,
        "lag_metrics": lag_m,
        "lag_group_committed": lag_g,
        "targets": {
            "p50_le_10ms": fp["p50"] <= 10.0,
            "p99_le_50ms": fp["p99"] <= 50.0,
            # "not growing": the fitted trend over the run is below 1 % of the input rate and
            # the backlog is gone after the drain
            "lag_not_growing": (
                lag_m["slope_per_s"] < 0.01 * args.rate
                if not math.isnan(lag_m["slope_per_s"])
                else False
            ),
        },
        # the workers' own prequential quality, combined over them (load_tests.scaleout)
        "live_quality": live_quality(final),
        "track_signals": {d: metric_sum(final, "stream_track_signals_total", direction=d)
                          for d in ("sent", "applied", "error")},
        "signals_rejected": metric_sum(final, "stream_signals_rejected_total"),
        # item-state replication delay: a signals message sent -> applied by another worker
        "signal_delay_s": histogram_summary(final, "stream_signal_delay_seconds"),
        "worker_rss_mib": {
            "start": (run_samples[0]["rss"] or 0) / 2**20 if run_samples else math.nan,
            "end": (run_samples[-1]["rss"] or 0) / 2**20 if run_samples else math.nan,
            "max": max((s["rss"] or 0 for s in samples), default=0) / 2**20,
        },
        "worker_histograms": {
            "processing_seconds_mean": metric_sum(final, "stream_processing_seconds_sum")
            / max(1.0, metric_sum(final, "stream_processing_seconds_count")),
            "stage_seconds_mean": {
                st: metric_sum(final, "stream_stage_seconds_sum", stage=st)
                / max(1.0, metric_sum(final, "stream_stage_seconds_count", stage=st))
                for st in ("decode", "session", "learn", "rank", "enqueue")
            },
            # periodic model checkpoints during the run: how many, and how long each held
            # the event loop (the fork of the snapshot child) and took end to end
            "checkpoints": metric_sum(final, "stream_checkpoints_total", result="written"),
            "checkpoint_pause_seconds_mean": metric_sum(
                final, "stream_checkpoint_pause_seconds_sum"
            )
            / max(1.0, metric_sum(final, "stream_checkpoint_pause_seconds_count")),
            "checkpoint_seconds_mean": metric_sum(final, "stream_checkpoint_seconds_sum")
            / max(1.0, metric_sum(final, "stream_checkpoint_seconds_count")),
        },
        "samples": [{**s, "t": s["t"] - t_start} for s in samples],
        "times": {
            "warmup_start": t_warm - t_start,
            "end": t_end - t_start,
            "drained": t_drained - t_start,
        },
    }
    return result


def plot(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ax = axes[0]
    samples = res["samples"]
    pts = [(s["t"], s["processed"]) for s in samples if s["processed"] is not None]
    rates = [
        ((t1 + t0) / 2, (c1 - c0) / (t1 - t0))
        for (t0, c0), (t1, c1) in zip(pts, pts[1:], strict=False)
        if t1 > t0
    ]
    ax.plot([r[0] for r in rates], [r[1] for r in rates], label="processed by worker (events/s)")
    ax.axhline(res["target_rate"], color="grey", ls="--", label=f"target {res['target_rate']:g}/s")
    ax.set_ylabel("events/s")
    ax.set_title(f"P2 freshness at {res['target_rate']:g} events/s -- {res['traffic']}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    ps = res["freshness_per_second"]
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        ax.plot([p["t"] + 0.5 for p in ps], [p[key] for p in ps], style, label=f"freshness {key}")
    ax.axhline(10, color="green", ls="--", lw=0.8, label="p50 target 10 ms")
    ax.axhline(50, color="red", ls="--", lw=0.8, label="p99 target 50 ms")
    ax.set_yscale("log")
    ax.set_ylabel("send -> notification (ms)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    ax.plot(
        [s["t"] for s in samples],
        [s["metrics_lag"] for s in samples],
        label="lag (worker /metrics)",
    )
    ax.plot(
        [s["t"] for s in samples], [s["group_lag"] for s in samples], label="lag (end - committed)"
    )
    ax.set_ylabel("messages")
    ax.set_xlabel("seconds since the measured phase started")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(
        [s["t"] for s in samples],
        [(s["rss"] or 0) / 2**20 for s in samples],
        color="purple",
        alpha=0.6,
        label="worker RSS (MiB)",
    )
    ax2.set_ylabel("RSS (MiB)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.freshness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured phase length")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds at --rate before measuring")
    ap.add_argument("--drain", type=float, default=30.0, help="max seconds to wait for the backlog")
    ap.add_argument(
        "--source", choices=("synthetic", "lastfm", "movielens", "spotify"), default="synthetic"
    )
    ap.add_argument("--users", type=int, default=20_000, help="synthetic listeners")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1,
                    help="workers in the consumer group (RSS and metrics are summed)")
    ap.add_argument(
        "--linger-ms",
        type=int,
        default=0,
        help="producer linger (0: measure the pipeline, not producer batching)",
    )
    ap.add_argument(
        "--worker-commit",
        metavar="COMMIT",
        help="run the worker(s) from a git worktree of this commit (a baseline for a paired "
        "comparison: run once with it and once without, in the same session)",
    )
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        ap.error("--rate and --seconds must be > 0")
    if not 1 <= args.workers <= args.partitions:
        ap.error("--workers must be between 1 and --partitions")
    rid = run_id("p2")
    report = Report("freshness", rid)
    print(
        f"run {rid}: {args.rate:g} events/s for {args.seconds:g} s, {source_label(args.source)}",
        file=sys.stderr,
    )
    with baseline_tree(args.worker_commit) as tree:
        args.tree = tree
        res = asyncio.run(scenario(args, rid, report))
    res["workers"] = args.workers
    res["worker_commit"] = args.worker_commit or "this tree"
    report.data = res
    path = report.write()
    png = report.dir / "freshness.png"
    plot(png, res)
    f, g = res["freshness_ms"], res["generated_minus_send_ms"]
    print(
        f"\nP2 freshness ({res['traffic']}; target {args.rate:g} ev/s for {args.seconds:g} s; "
        f"sent {res['events_sent']:,} to {res['distinct_users_sent']:,} users at "
        f"{res['producer']['rate']:.0f} ev/s; {args.workers} worker(s) processed "
        f"{res['processed_rate_during_run']:.0f} ev/s; worker code: {res['worker_commit']})"
    )
    print(
        table(
            [
                ["send -> notification", f["p50"], f["p95"], f["p99"], f["max"], f["n"]],
                ["send -> generated_at", g["p50"], g["p95"], g["p99"], g["max"], g["n"]],
            ],
            ["ms", "p50", "p95", "p99", "max", "n"],
        )
    )
    print(
        f"  matched {res['notifications_matched']:,}/{res['events_sent']:,} events "
        f"({res['match_coverage']:.1%}; the rest: not processed before the drain ended, "
        "or coalesced into a later write)"
    )
    for name in ("lag_metrics", "lag_group_committed"):
        lg = res[name]
        print(
            f"  {name}: slope {lg['slope_per_s']:+.1f} msg/s, first third {lg['first_third_mean']:.0f}, "
            f"last third {lg['last_third_mean']:.0f}, max {lg['max']:.0f}, after drain {lg['after_drain']:.0f}"
        )
    rss = res["worker_rss_mib"]
    print(f"  worker RSS (all workers): {rss['start']:.0f} -> {rss['end']:.0f} MiB "
          f"(max {rss['max']:.0f})")
    print(
        "  targets: "
        + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in res["targets"].items())
    )
    print(f"report: {path}\nplot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
