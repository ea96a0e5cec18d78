"""What a drill's listeners saw, second by second, and its plot (load_tests.cluster_faults).

A drill produces plays with :class:`TimedProducer` (it notes when each play went to the
producer) while a :class:`NotificationListener` collects the list-update notifications the
worker publishes. :class:`DrillTimeline` ties the two to the drill's clock: per second the
list updates and their freshness p50/p99 (notification's ``generated_at`` minus the time
the play went to the producer), the drill's events (a kill, a broker back, a promotion) as
marks, and :func:`plot_timeline` draws them as a PNG beside the report.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from load_tests.faults import BackgroundProducer
from stream.adapters.redis_store import RecoReader
from stream.core.events import PlayEvent

#: colour and line style of a mark on the plot, by event (anything else: grey)
MARK_STYLES: dict[str, tuple[str, str]] = {
    "kill": ("#de2d26", "--"),
    "join": ("#31a354", "--"),
    "joined worker ready": ("#31a354", ":"),
    "broker restarted": ("#31a354", ":"),
    "broker back": ("#31a354", "--"),
    "promotion": ("#31a354", "--"),
}


class TimedProducer(BackgroundProducer):
    """A BackgroundProducer that notes when each event id was handed to the producer."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent_at_ms: dict[str, int] = {}

    def _source(self) -> Iterator[PlayEvent]:
        for ev in super()._source():
            self.sent_at_ms[ev.event_id] = int(time.time() * 1000)
            yield ev


class NotificationListener(threading.Thread):
    """Collects every list-update notification as (monotonic arrival time, notification)
    until :meth:`halt`. ``connect`` opens a reader; a failed connection (its Redis node
    died) is counted in ``reconnects`` and a fresh reader is opened half a second later."""

    def __init__(self, connect: Callable[[], RecoReader]) -> None:
        super().__init__(name="drill-notifications", daemon=True)
        self.connect = connect
        self.notes: list[tuple[float, dict[str, Any]]] = []
        self.reconnects = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                reader = self.connect()
                try:
                    for note in reader.updates(timeout_s=2):
                        self.notes.append((time.monotonic(), note))
                        if self._halt.is_set():
                            return
                finally:
                    reader.close()
            except (redis.RedisError, OSError):
                self.reconnects += 1
                self._halt.wait(0.5)

    def halt(self, timeout: float = 10.0) -> None:
        self._halt.set()
        self.join(timeout)

    def between(self, start: float, end: float) -> list[tuple[float, dict[str, Any]]]:
        return [(t, n) for t, n in self.notes if start <= t <= end]


def per_second(
    during: Sequence[tuple[float, dict[str, Any]]], sent_at_ms: dict[str, int],
    start: float, end: float,
) -> dict[str, list[Any]]:
    """Per second from ``start``: notifications, and their freshness p50/p99 (ms; None in a
    second without any)."""
    seconds = int(end - start) + 1
    fresh: list[list[int]] = [[] for _ in range(seconds)]
    for t, note in during:
        sent = sent_at_ms.get(note.get("event_id", ""))
        if sent is not None:
            fresh[min(seconds - 1, int(t - start))].append(note["generated_at"] - sent)
    return {
        "second": list(range(seconds)),
        "notifications": [len(f) for f in fresh],
        "freshness_p50_ms": [_pct(sorted(f), 0.5) for f in fresh],
        "freshness_p99_ms": [_pct(sorted(f), 0.99) for f in fresh],
    }


def _pct(ordered: list[int], q: float) -> int | None:
    return ordered[int(len(ordered) * q)] if ordered else None


def freshness(
    listener: NotificationListener, sent_at_ms: dict[str, int], start: float, end: float
) -> dict[str, Any]:
    """The notifications between ``start`` and ``end``: how many, their freshness p50/p99/max
    (ms), the longest gap without any (s) and the per-second ``timeline``."""
    during = listener.between(start, end)
    fresh = sorted(
        n["generated_at"] - sent_at_ms[n["event_id"]]
        for _, n in during
        if n.get("event_id") in sent_at_ms
    )
    times = [start] + [t for t, _ in during] + [end]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "notifications": len(during),
        "freshness_p50_ms": _pct(fresh, 0.5),
        "freshness_p99_ms": _pct(fresh, 0.99),
        "freshness_max_ms": fresh[-1] if fresh else None,
        "longest_gap_without_updates_s": round(max(gaps), 2) if gaps else None,
        "listener_reconnects": listener.reconnects,
        "timeline": per_second(during, sent_at_ms, start, end),
    }


class DrillTimeline:
    """A drill's clock: :meth:`begin` starts the producer (second 0), :meth:`mark` notes an
    event (``kill``, ``broker back``, ``promotion`` ...), :meth:`finish` stops the listener
    and returns the report's freshness fields, ``timeline`` and ``marks``."""

    def __init__(self, listener: NotificationListener, producer: TimedProducer) -> None:
        self.listener = listener
        self.producer = producer
        self.start = time.monotonic()
        self.marks: list[dict[str, Any]] = []

    def begin(self) -> None:
        self.start = time.monotonic()
        self.producer.start()

    def mark(self, event: str, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        self.marks.append({"at_s": round(at - self.start, 1), "event": event})

    def finish(self) -> dict[str, Any]:
        end = time.monotonic()
        self.listener.halt()
        fields = freshness(self.listener, self.producer.sent_at_ms, self.start, end)
        return {**fields, "marks": self.marks}


def plot_timeline(report: dict[str, Any], path: Path, *, title: str, xlabel: str) -> None:
    """Updates per second and freshness per second, with a vertical line at each of the
    report's ``marks`` (styles: MARK_STYLES)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(tl["second"], tl["notifications"], color="#3182bd", lw=1)
    ax1.set_ylabel("list updates / s")
    for key, colour in (("freshness_p50_ms", "#31a354"), ("freshness_p99_ms", "#de2d26")):
        # a second without notifications breaks the line (NaN) rather than bridging the gap
        ys = [math.nan if v is None else max(1, v) for v in tl[key]]
        ax2.plot(tl["second"], ys, color=colour, lw=1, marker=".", ms=2,
                 label=key.replace("freshness_", "").replace("_ms", ""))
    ax2.set_yscale("log")
    ax2.set_ylabel("freshness (ms, per second)")
    ax2.set_xlabel(xlabel)
    ax2.legend(loc="upper right")
    for mark in report["marks"]:
        colour, style = MARK_STYLES.get(mark["event"], ("#636363", "--"))
        for ax in (ax1, ax2):
            ax.axvline(mark["at_s"], color=colour, ls=style, lw=0.8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
