"""Live scale-out parity (issue #17 item 6): the same log through 1, 2, 3 ... real
``stream worker`` processes in one consumer group::

    python -m load_tests.scaleout --workers 1,2,3 --source movielens

For each N, one run of :func:`load_tests.freshness.scenario` (its own plays topic with
``--partitions`` partitions, app id, signals topic, Redis prefix and channel on the shared
stack): the first ``--plays`` plays of the log are produced at ``--rate`` plays/s (stamped
with their send time, keyed by listener), N workers share them the Kafka way and exchange
track signals (signed with a key made for the run). After the drain it reports, per N:

- the workers' own live prequential quality (``stream_quality_*`` gauges, each worker's
  HR@10/NDCG@10 weighted by its evaluated plays; the quality window is set above the
  run's plays so the gauges cover the whole run);
- lost and double-applied plays: every listener's Redis document vs the plays produced
  for them (``seq`` = plays applied), as the fault drills count them;
- the track signals: sent, applied, and the ones not applied by every other worker
  (``(N-1) x sent - applied``);
- freshness percentiles (send -> pub/sub notification) and the processed rate.

Targets: HR@10 within 3 % (relative) of 1 worker; lost 0; double 0. Writes
``scaleout.json`` and ``scaleout.png`` under load_tests/results/<run id>/. Every phase is
bounded in time (produce: 1.5 x plays / rate; drain: ``--drain``); progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from load_tests.common import Report, base_settings, run_id, table
from load_tests.faults import reader_for, wait_for_match
from load_tests.freshness import scenario
from load_tests.traffic import make_events, source_label

HR_TOLERANCE = 0.03


def log(msg: str) -> None:
    print(f"[scaleout] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run_one(args: argparse.Namespace, n: int, report: Report) -> dict[str, Any]:
    """One N: the freshness scenario with N workers, then lost/double from Redis."""
    rid = run_id(f"scale{n}")
    ns = argparse.Namespace(
        source=args.source, rate=args.rate, seconds=args.plays / args.rate, warmup=0.0,
        drain=args.drain, users=20_000, partitions=args.partitions, workers=n,
        linger_ms=0, tree=None, settle_s=3.0, stable_s=8.0,
    )
    log(f"{n} worker(s): run {rid}, {args.plays:,} plays at {args.rate:g}/s")
    sub = Report("scaleout", f"{report.rid}/{rid}")
    res = asyncio.run(scenario(ns, rid, sub))
    expected = Counter(e.user_id for e in make_events(args.source, args.plays))
    sent = int(res["producer"]["sent"])
    worker_id = f"{rid}-full"  # scenario's app id and Redis prefix
    settings = base_settings().replace(redis_prefix=f"{worker_id}:reco:")
    consistency, waited = wait_for_match(reader_for(settings), dict(expected), timeout=30.0)
    signals = res["track_signals"]
    blend = res["live_quality"].get("blend", {})
    out = {
        "workers": n,
        "run": rid,
        "plays_sent": sent,
        "complete": sent == args.plays,
        "processed_rate": res["processed_rate_during_run"],
        "live_quality": res["live_quality"],
        "hr@10": blend.get("hr@10"),
        "ndcg@10": blend.get("ndcg@10"),
        "evaluated": blend.get("events"),
        "lost": consistency["lost"],
        "double_applied": consistency["double_applied"],
        "users_missing": consistency["users_missing"],
        "consistency_wait_s": waited,
        "signals_sent": signals["sent"],
        "signals_applied": signals["applied"],
        "signals_error": signals["error"],
        "signals_not_applied": (n - 1) * signals["sent"] - signals["applied"],
        "signals_rejected": res["signals_rejected"],
        "signal_delay_s": res.get("signal_delay_s"),
        "freshness_ms": res["freshness_ms"],
        "generated_minus_send_ms": res["generated_minus_send_ms"],
        "match_coverage": res["match_coverage"],
        "worker_rss_mib_max": res["worker_rss_mib"]["max"],
    }
    log(f"{n} worker(s): HR@10 {out['hr@10']}, lost {out['lost']}, double "
        f"{out['double_applied']}, signals sent {signals['sent']:.0f} applied "
        f"{signals['applied']:.0f}")
    return out


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = rows[0]["hr@10"] if rows and rows[0]["workers"] == 1 else None
    checks: dict[str, Any] = {}
    for r in rows:
        rel = (r["hr@10"] / base - 1.0) if base and r["hr@10"] is not None else None
        r["hr_vs_1"] = rel
        checks[f"n{r['workers']}"] = {
            "hr_within_3pct": rel is not None and abs(rel) <= HR_TOLERANCE,
            "lost_0": r["lost"] == 0 and r["users_missing"] == 0,
            "double_0": r["double_applied"] == 0,
            "all_plays_sent": r["complete"],
        }
    return checks


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["workers"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    hr = [r["hr@10"] or 0.0 for r in rows]
    ax.bar([str(n) for n in ns], hr, color="tab:blue")
    if rows and rows[0]["hr@10"]:
        b = rows[0]["hr@10"]
        ax.axhspan(b * (1 - HR_TOLERANCE), b * (1 + HR_TOLERANCE), color="green", alpha=0.15,
                   label="1 worker +/- 3 %")
        ax.legend(fontsize=8)
    ax.set_xlabel("workers")
    ax.set_ylabel("live HR@10 (blend, all workers)")
    ax.set_title("live prequential quality")
    ax = axes[1]
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(ns, [r["freshness_ms"].get(key) for r in rows], style, label=key)
    ax.set_xlabel("workers")
    ax.set_ylabel("send -> notification (ms)")
    ax.set_yscale("log")
    ax.set_title("freshness")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    x = range(len(ns))
    ax.bar([i - 0.2 for i in x], [r["lost"] for r in rows], width=0.4, label="lost plays")
    ax.bar([i + 0.2 for i in x], [r["double_applied"] for r in rows], width=0.4,
           label="double-applied plays")
    ax.plot(list(x), [r["signals_not_applied"] for r in rows], "kx", label="signals not applied")
    ax.set_xticks(list(x), [str(n) for n in ns])
    ax.set_xlabel("workers")
    ax.set_title("consistency")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.scaleout", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,3", help="comma-separated worker counts")
    ap.add_argument("--source", choices=("movielens", "lastfm", "spotify", "synthetic"),
                    default="movielens")
    ap.add_argument("--plays", type=int, default=20_000, help="plays of the log replayed")
    ap.add_argument("--rate", type=float, default=200.0, help="plays/s produced")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--drain", type=float, default=120.0,
                    help="max seconds to wait for the workers to catch up")
    ap.add_argument("--ranker", choices=("fixed", "learned"), default=None,
                    help="the workers' ranker (default: the worker's setting)")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    if not counts or any(not 1 <= n <= args.partitions for n in counts):
        ap.error("--workers: counts between 1 and --partitions")
    if args.plays < 1 or args.rate <= 0 or not 1 <= args.partitions <= 64:
        ap.error("--plays and --rate must be > 0, --partitions 1..64")
    # the workers inherit this environment (load_tests.common.spawn): a signing key for
    # the run's signals and a quality window covering every play
    os.environ["STREAM_WORKER_KEYS"] = f"scaleout:{secrets.token_hex(24)}"
    os.environ["STREAM_QUALITY_WINDOW"] = str(args.plays + 1000)
    if args.ranker:
        os.environ["STREAM_RANKER"] = args.ranker
    report = Report("scaleout", run_id("scaleout"))
    log(f"{source_label(args.source)}, workers {counts}, {args.plays:,} plays at "
        f"{args.rate:g}/s over {args.partitions} partitions")
    rows = [run_one(args, n, report) for n in counts]
    checks = verdict(rows)
    report.data = {
        "scenario": "live scale-out parity (issue #17 item 6)",
        "command": "python -m load_tests.scaleout " + " ".join(argv or sys.argv[1:]),
        "source": source_label(args.source), "plays": args.plays, "rate": args.rate,
        "partitions": args.partitions, "ranker": os.environ.get("STREAM_RANKER", "default"),
        "rows": rows, "targets": checks,
    }
    path = report.write()
    png = report.dir / "scaleout.png"
    plot(png, rows, f"{source_label(args.source)}: {args.plays:,} plays at {args.rate:g}/s, "
                    f"{args.partitions} partitions")
    print(table(
        [[r["workers"], r["hr@10"], r["hr_vs_1"], r["evaluated"], r["lost"],
          r["double_applied"], r["signals_sent"], r["signals_not_applied"],
          r["freshness_ms"].get("p50"), r["freshness_ms"].get("p99"), r["processed_rate"]]
         for r in rows],
        ["workers", "HR@10", "vs 1", "evaluated", "lost", "double", "signals sent",
         "not applied", "fresh p50 ms", "fresh p99 ms", "plays/s"]))
    print("targets: " + ", ".join(f"{n}: " + "/".join(k for k, v in c.items() if not v)
                                  if not all(c.values()) else f"{n}: PASS"
                                  for n, c in checks.items()))
    print(f"report: {path}\nplot:   {png}")
    return 0 if all(all(c.values()) for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
