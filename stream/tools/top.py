"""``stream top``: a terminal live view of one worker, read from its /metrics endpoint.

For people without Grafana: throughput, per-stage latency percentiles, freshness, Kafka lag,
Redis, state size and live model quality, refreshed every ``--interval`` seconds. Rates and
percentiles are computed over the last refresh interval (the difference of two scrapes), the
way Prometheus' ``rate()`` and ``histogram_quantile()`` would; the first frame, with no
previous scrape, shows totals since the worker started.

    stream top                                   # http://127.0.0.1:$STREAM_METRICS_PORT/metrics
    stream top --url http://worker:8000/metrics --interval 2
    stream top --iterations 5                    # five frames, then exit (scripts, tests)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from stream.adapters.metrics import parse_exposition

Labels = tuple[tuple[str, str], ...]

STAGES_ORDER = ("decode", "session", "learn", "rank", "enqueue")


@dataclass
class Scrape:
    """One parsed exposition: ``values[name][labels] = value`` and when it was taken."""

    at: float
    values: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        values: dict[str, dict[Labels, float]] = defaultdict(dict)
        for name, labels, value in parse_exposition(text):
            values[name][tuple(sorted(labels.items()))] = value
        return cls(at, dict(values))

    def total(self, name: str, **match: str) -> float:
        """Sum of ``name`` over the series whose labels include ``match``."""
        return sum(v for labels, v in self.series(name, **match).items())

    def series(self, name: str, **match: str) -> dict[Labels, float]:
        return {
            labels: v
            for labels, v in self.values.get(name, {}).items()
            if all(dict(labels).get(k) == want for k, want in match.items())
        }

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """``name`` summed by one label's values."""
        out: dict[str, float] = defaultdict(float)
        for labels, v in self.series(name, **match).items():
            out[dict(labels).get(label, "")] += v
        return dict(out)

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` of histogram ``name`` summed over matching series."""
        acc: dict[float, float] = defaultdict(float)
        for labels, v in self.series(f"{name}_bucket", **match).items():
            acc[float(dict(labels)["le"])] += v
        return sorted(acc.items())


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative ``(le, count)`` buckets, sorted by le.

    Linear interpolation inside the bucket holding the rank; the lowest bucket starts at 0;
    a rank in the +Inf bucket returns the highest finite bound. None when there is no data.

    >>> histogram_quantile(0.5, [(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)])
    0.1
    >>> histogram_quantile(0.75, [(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)])
    0.55
    >>> histogram_quantile(0.99, [(1.0, 0.0), (math.inf, 0.0)]) is None
    True
    """
    if not buckets or not 0 <= q <= 1:
        return None
    total = buckets[-1][1]
    if total <= 0 or math.isnan(total):
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def bucket_delta(
    now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]] | None
) -> list[tuple[float, float]]:
    """Bucket counts observed between two scrapes (a counter reset falls back to ``now``)."""
    if not before:
        return list(now)
    prev = dict(before)
    delta = [(le, c - prev.get(le, 0.0)) for le, c in now]
    if any(c < 0 for _, c in delta):
        return list(now)
    return delta


@dataclass
class View:
    """What one frame shows, computed from the current and the previous scrape."""

    now: Scrape
    before: Scrape | None

    @property
    def seconds(self) -> float:
        return self.now.at - self.before.at if self.before else 0.0

    def rate(self, name: str, **match: str) -> float | None:
        if self.before is None or self.seconds <= 0:
            return None
        delta = self.now.total(name, **match) - self.before.total(name, **match)
        return max(delta, 0.0) / self.seconds

    def rate_by(self, name: str, label: str, **match: str) -> dict[str, float | None]:
        now = self.now.by(name, label, **match)
        if self.before is None or self.seconds <= 0:
            return {k: None for k in now}
        prev = self.before.by(name, label, **match)
        return {k: max(v - prev.get(k, 0.0), 0.0) / self.seconds for k, v in now.items()}

    def quantiles(self, name: str, qs: Iterable[float], **match: str) -> list[float | None]:
        before = self.before.buckets(name, **match) if self.before else None
        window = bucket_delta(self.now.buckets(name, **match), before)
        if window and window[-1][1] <= 0:  # nothing new in this interval: show all-time
            window = self.now.buckets(name, **match)
        return [histogram_quantile(q, window) for q in qs]


# --------------------------------------------------------------------------- rendering


def fmt_seconds(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f}µs"
    if v < 1:
        return f"{v * 1e3:.2f}ms"
    if v < 120:
        return f"{v:.2f}s"
    return f"{v / 60:.1f}min"


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}/s"


def fmt_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}GiB"  # pragma: no cover


def fmt_share(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v * 100:.1f}%"


def _latency_lines(view: View) -> list[str]:
    """p50/p95/p99 of each stage, a whole event, a Redis flush and the freshness."""
    qs = (0.5, 0.95, 0.99)
    lines = [f"{'latency':<20}{'p50':>10}{'p95':>10}{'p99':>10}"]
    stages = sorted(
        view.now.by("stream_stage_seconds_count", "stage"),
        key=lambda st: (STAGES_ORDER.index(st) if st in STAGES_ORDER else 99, st),
    )
    rows: list[tuple[str, str, dict[str, str]]] = [
        (stage, "stream_stage_seconds", {"stage": stage}) for stage in stages
    ]
    rows += [
        ("per event", "stream_processing_seconds", {}),
        ("redis flush", "stream_redis_flush_seconds", {}),
        ("freshness", "stream_freshness_seconds", {}),
        ("  from produce", "stream_ingest_freshness_seconds", {}),
    ]
    for label, metric, labels in rows:
        row = view.quantiles(metric, qs, **labels)
        lines.append(f"  {label:<18}" + "".join(f"{fmt_seconds(v):>10}" for v in row))
    return lines


def render(view: View, url: str) -> str:
    """The text of one frame."""
    s = view.now
    lines: list[str] = []
    info = next(iter(s.series("stream_build_info")), ())
    build = dict(info)
    lines.append(
        f"stream top  {url}  {time.strftime('%H:%M:%S', time.localtime(s.at))}"
        + (f"  (last {view.seconds:.1f}s)" if view.before else "  (totals since start)")
    )
    if build:
        lines.append(
            f"worker {build.get('app_id', '?')}  version {build.get('version', '?')}  "
            f"model {build.get('model_version', '?')}"
        )
    lines.append("")

    outcomes = s.by("stream_events_total", "outcome")
    rates = view.rate_by("stream_events_total", "outcome")
    parts = [
        f"{o} {fmt_rate(rates.get(o))} ({outcomes.get(o, 0):,.0f})"
        for o in ("processed", "rejected", "duplicate")
    ]
    lines.append("events     " + "   ".join(parts))
    lines.append(
        f"dlq        {fmt_rate(view.rate('stream_dlq_writes_total'))} "
        f"({s.total('stream_dlq_writes_total'):,.0f})"
    )
    lines.append("")

    lines += _latency_lines(view)
    lines.append("")

    lag = s.series("stream_consumer_lag_messages")
    worst = max(lag.items(), key=lambda kv: kv[1], default=None)
    worst_txt = ""
    if worst is not None:
        lbl = dict(worst[0])
        worst_txt = f", max {worst[1]:,.0f} on {lbl.get('topic')}[{lbl.get('partition')}]"
    lines.append(
        f"kafka      lag {sum(lag.values()):,.0f} messages{worst_txt}   "
        f"partitions {s.total('stream_assigned_partitions'):.0f}   "
        f"rebalances {s.total('stream_rebalances_total'):.0f}"
    )
    lines.append(
        f"redis      writes {fmt_rate(view.rate('stream_redis_writes_total', result='written'))}"
        f"   errors {s.total('stream_redis_errors_total'):.0f}"
        f"   retries {s.total('stream_redis_retries_total'):.0f}"
        f"   pending {s.total('stream_redis_pending_writes'):.0f}"
    )
    memory = s.by("stream_model_memory_bytes", "model")
    mem_txt = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(memory.items())) or "-"
    lines.append(
        f"state      listeners {s.total('stream_session_table_users'):,.0f}   "
        f"tracks {s.total('stream_catalogue_tracks'):,.0f}   memory {mem_txt}"
    )
    lines.append("")

    hr = s.by("stream_quality_hr_at_10", "variant")
    if hr:
        ndcg = s.by("stream_quality_ndcg_at_10", "variant")
        window = s.by("stream_quality_window_events", "variant")
        lines.append(f"{'live quality':<20}{'HR@10':>10}{'NDCG@10':>10}{'window':>10}")
        for variant in sorted(hr, key=lambda v: -hr[v]):
            lines.append(
                f"  {variant:<18}{hr[variant]:>10.3f}{ndcg.get(variant, math.nan):>10.3f}"
                f"{window.get(variant, 0):>10,.0f}"
            )
    else:
        lines.append("live quality        - (no evaluator output yet)")
    skip_acc = s.by("stream_skip_model_accuracy", "model")
    drift = s.total("stream_drift_detections_total")
    acc_txt = ", ".join(f"{k} {fmt_share(v)}" for k, v in sorted(skip_acc.items())) or "-"
    lines.append(f"skip model accuracy {acc_txt}   drift detections {drift:.0f}")

    plays = s.by("stream_plays_total", "context")
    skips = s.by("stream_skips_total", "context")
    shares = [
        f"{c} {fmt_share(skips.get(c, 0.0) / n)}"
        for c, n in sorted(plays.items(), key=lambda kv: -kv[1])
        if n > 0
    ]
    lines.append("skip rate  " + ("   ".join(shares) if shares else "-"))
    sessions = s.by("stream_sessions_started_total", "listener")
    lines.append(
        f"sessions   new {sessions.get('new', 0):,.0f}   returning "
        f"{sessions.get('returning', 0):,.0f}   plays/session p50 "
        f"{_num(histogram_quantile(0.5, s.buckets('stream_session_plays')))}"
    )
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# --------------------------------------------------------------------------- loop


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode("utf-8"))


def run(
    url: str,
    interval: float,
    iterations: int | None,
    out: TextIO = sys.stdout,
    clear: bool = True,
    get: Callable[[str], str] = fetch,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> int:
    """Print a frame per interval; 0 if at least one scrape succeeded, else 1."""
    before: Scrape | None = None
    ok = False
    n = 0
    while iterations is None or n < iterations:
        if n:
            sleep(interval)
        n += 1
        try:
            now = Scrape.parse(get(url), clock())
        except (OSError, ValueError) as exc:
            frame = f"stream top  {url}: cannot read metrics ({exc}); retrying"
        else:
            ok = True
            frame = render(View(now, before), url)
            before = now
        if clear:
            out.write("\x1b[H\x1b[2J")
        out.write(frame + "\n" + ("" if clear else "\n"))
        out.flush()
    return 0 if ok else 1


def cmd_top(args: argparse.Namespace) -> int:
    clear = sys.stdout.isatty() and not args.no_clear
    try:
        return run(args.url, args.interval, args.iterations, clear=clear)
    except KeyboardInterrupt:
        return 0


def default_url() -> str:
    port = os.environ.get("STREAM_METRICS_PORT", "8000")
    return f"http://127.0.0.1:{port}/metrics"


def register(subparsers: Any) -> None:
    """Add the ``top`` subcommand to the ``stream`` CLI."""
    p = subparsers.add_parser("top", help="live terminal view of a worker's metrics")
    p.add_argument(
        "--url", default=default_url(), help="the worker's metrics endpoint (default: %(default)s)"
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument(
        "--iterations", type=int, default=None, help="stop after N frames (default: until Ctrl-C)"
    )
    p.add_argument(
        "--no-clear", action="store_true", help="append frames instead of redrawing the screen"
    )
    p.set_defaults(func=cmd_top)
