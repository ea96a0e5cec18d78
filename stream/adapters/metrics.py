"""Prometheus metric definitions -- the only module that imports prometheus_client.

Conventions: base units (seconds, bytes), ``_total`` on counters, and no per-user or
per-track labels. Every label has a small, closed value set: ``topic``, ``outcome``,
``reason`` (the validator's fixed reasons), ``stage``, ``variant`` / ``model`` (names from the
code, not from data), ``context`` (folded into :data:`CONTEXTS` by :func:`context_label`),
``listener`` (new / returning).

The full list with meanings lives in ``docs/observability.md``; the dashboards, alert rules
and ``stream top`` read these names, and ``tests/integration/test_observability.py`` fails if
one of them is renamed here without updating the configs.

>>> from prometheus_client import CollectorRegistry
>>> m = Metrics(CollectorRegistry())
>>> m.set_quality("cooc-pop", hr_at_10=0.21, ndcg_at_10=0.12, window_events=5000)
>>> m.registry.get_sample_value("stream_quality_hr_at_10", {"variant": "cooc-pop"})
0.21
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from stream.core.checkpoint import REJECT_REASONS
from stream.core.contexts import CONTEXTS, fold_context

if TYPE_CHECKING:  # only for type hints: metrics never reaches into the core at runtime
    from stream.core.session import SessionUpdate

#: Event-loop lag: the drill target is 50 ms, the eviction target 20 ms.
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Resolve from ~50 us to several seconds (processing stages, Redis writes).
LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: Freshness: a few ms when live, up to minutes while catching up after an outage.
FRESHNESS_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Session length (first to last play of a session, event time): a minute to a day.
SESSION_LENGTH_BUCKETS: Final = (
    0.0,
    60.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)
#: Plays per session: roughly Fibonacci, 1 to a few hundred.
SESSION_PLAYS_BUCKETS: Final = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377)

NAMESPACE: Final = "stream"

# Prometheus 2.x ingests the ``*_created`` samples as separate series: one more series per
# counter/histogram child for a value no dashboard or alert uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

LISTENER_KINDS: Final = ("new", "returning")
#: Signals watched by drift detectors (``signal`` label of the drift counter).
DRIFT_SIGNALS: Final = ("skip_rate",)


# ------------------------------------------------------------------ single-writer families
#
# prometheus_client's Counter.inc and Histogram.observe take a lock and go through a value
# object on every call: ~1 and ~2.2 us here, and the worker makes about ten such calls per
# play (py-spy: 6.5 % of the worker's samples in prometheus_client), and a paired P2 run
# at 400 events/s fell ~1 s behind with them where this tree keeps p50 ~10 ms (only
# metrics.py swapped back, docs/benchmarks.md "Session 5"). Every series the event loop
# writes (per play, per flush, per session) is written only by that thread, so it keeps
# plain Python numbers (an observe is a bisect and two additions, ~0.5 us) read by a
# collector at scrape time; series the timers set stay prometheus_client types. Names,
# labels, buckets and exposition are exactly those of the types they replace. The scrape
# thread may read a histogram between a bucket increment and its sum update; every sample
# stays monotonic, and _count is derived from the same bucket snapshot as the +Inf bucket,
# so they always agree.


class _Family:
    """Shared parts: the name, help, label names and the children by label values."""

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        namespace: str = "",
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)  # type: ignore[arg-type]

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: object) -> Any:
        """The child for these label values (created at 0 on first use)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _unlabelled(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels()")
        return self._children[()]

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _ValueFamily(_Family):
    """A family whose children hold one number each (counters and gauges)."""

    family_type: Any = CounterMetricFamily

    def _family(self) -> Metric:
        family: Metric = self.family_type(self.name, self.documentation, labels=self.labelnames)
        return family

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            family.add_metric(list(key), child.value)  # type: ignore[attr-defined]
        yield family


class FastCounter(_ValueFamily):
    """A counter for the event-loop thread's hot path (see the section comment)."""

    family_type = CounterMetricFamily

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)


class _GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class FastGauge(_ValueFamily):
    """A gauge for the event-loop thread's hot path (see the section comment)."""

    family_type = GaugeMetricFamily

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bucket i counts bounds[i-1] < v <= bounds[i], as prometheus_client's "le" does
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def observe_many(self, amount: float, n: int) -> None:
        """``n`` observations of the same ``amount`` (a batch's per-play share) at once."""
        self.counts[bisect_left(self.bounds, amount)] += n
        self.sum += amount * n


class FastHistogram(_Family):
    """A histogram for the event-loop thread's hot path (see the section comment)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        namespace: str = "",
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("buckets must be a non-empty increasing sequence")
        if bounds[-1] == float("inf"):
            bounds = bounds[:-1]
        self.bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(
            name, documentation, labelnames, namespace=namespace, registry=registry
        )

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def observe(self, amount: float) -> None:
        self._unlabelled().observe(amount)

    def observe_many(self, amount: float, n: int) -> None:
        self._unlabelled().observe_many(amount, n)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            counts = list(child.counts)  # one snapshot for the buckets and the count
            total = child.sum
            cumulative, buckets = 0, []
            for le, n in zip(self._les, counts, strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, total)
        yield family


def context_label(context: str | None) -> str:
    """Fold a free-text play context into the bounded :data:`CONTEXTS` label set
    (:func:`stream.core.contexts.fold_context`, which the skip model's features use too).

    >>> [context_label(c) for c in ("Album", "editorial_playlist", None, "my-own-thing")]
    ['album', 'playlist', 'none', 'other']
    """
    return fold_context(context)


_M = TypeVar("_M")


class Metrics:
    """All worker metrics, registered on one registry (a fresh one per test if wanted)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        # ---------------------------------------------------------------- events
        self.events = self._declare(
            FastCounter, "events",
            "Play events consumed, by outcome (processed, rejected, duplicate).",
            ["topic", "outcome"],
        )
        self.rejected = self._declare(
            FastCounter, "events_rejected",
            "Events rejected by validation, by reason.",
            ["topic", "reason"],
        )
        self.dlq_writes = self._declare(
            FastCounter, "dlq_writes",
            "Messages written to the dead-letter topic.",
            ["topic"],
        )
        # ---------------------------------------------------------------- latency
        self.processing = self._declare(
            FastHistogram, "processing_seconds",
            "Per-event processing time in the worker, decode to enqueue.",
            buckets=LATENCY_BUCKETS,
        )
        self.stage = self._declare(
            FastHistogram, "stage_seconds",
            "Per-event time spent in each pipeline stage.",
            ["stage"], buckets=LATENCY_BUCKETS,
        )
        self.freshness = self._declare(
            FastHistogram, "freshness_seconds",
            "Event time (the play's ts) to recommendations visible in Redis.",
            buckets=FRESHNESS_BUCKETS,
        )
        self.ingest_freshness = self._declare(
            FastHistogram, "ingest_freshness_seconds",
            "Kafka record timestamp (produce time) to recommendations visible in Redis.",
            buckets=FRESHNESS_BUCKETS,
        )
        # ---------------------------------------------------------------- Redis
        self.redis_errors = self._declare(
            FastCounter, "redis_errors",
            "Failed Redis operations (each failed flush attempt).",
            ["operation"],
        )
        self.redis_retries = self._declare(
            FastCounter, "redis_retries",
            "Redis flush retries after an error.",
        )
        self.redis_write_errors = self._declare(
            FastCounter, "redis_write_errors",
            "Failed writes of one Redis key (the rest of the batch is written), by reason "
            "(stream.adapters.redis_store.WRITE_ERROR_REASONS); a key is dropped after a few "
            "attempts.",
            ["reason"],
        )
        self.redis_writes = self._declare(
            FastCounter, "redis_writes",
            "Recommendation documents written to Redis, by result (written, stale_skipped, "
            "dropped after failed attempts).",
            ["result"],
        )
        self.redis_pending = self._declare(
            FastGauge, "redis_pending_writes",
            "Recommendation documents waiting to be flushed to Redis.",
        )
        self.redis_flush = self._declare(
            FastHistogram, "redis_flush_seconds",
            "Duration of one pipelined Redis flush.",
            buckets=LATENCY_BUCKETS,
        )
        # ---------------------------------------------------------------- Kafka consumer
        self.lag = self._declare(
            Gauge, "consumer_lag_messages",
            "End offset minus next offset to process, per partition.",
            ["topic", "partition"],
        )
        self.assigned = self._declare(
            Gauge, "assigned_partitions",
            "Partitions of the plays topic assigned to this worker.",
            ["topic"],
        )
        self.stalls = self._declare(
            Counter, "stalls",
            "Episodes of messages waiting with none applied for stall_warning_s (each one "
            "logs every asyncio task's stack).",
        )
        self.rebalances = self._declare(
            Counter, "rebalances",
            "Consumer group rebalances completed by this worker.",
        )
        self.stale_dropped = self._declare(
            Counter, "stale_generation_dropped",
            "Plays dropped unapplied because the consumer generation they were fetched under "
            "had ended when the plays agent reached them (a rebalance while they were "
            "buffered: the partition's new owner reads them again from the committed offset).",
        )
        self.last_event_ts = self._declare(
            FastGauge, "last_event_timestamp_seconds",
            "Event time of the newest processed play.",
        )
        # ---------------------------------------------------------------- state and models
        self.active_users = self._declare(
            Gauge, "session_table_users",
            "Listeners with state in this worker's session table.",
        )
        self.catalogue = self._declare(
            Gauge, "catalogue_tracks",
            "Tracks known to the recommender models.",
        )
        self.model_memory = self._declare(
            Gauge, "model_memory_bytes",
            "Approximate memory held by each online model (sampled deep size estimate).",
            ["model"],
        )
        # ---------------------------------------------------------------- live quality
        self.quality_hr = self._declare(
            Gauge, "quality_hr_at_10",
            "Prequential hit rate at 10 over the evaluator's sliding window, per variant.",
            ["variant"],
        )
        self.quality_mrr = self._declare(
            Gauge, "quality_mrr_at_10",
            "Prequential mean reciprocal rank at 10 over the evaluator's sliding window, "
            "per variant.",
            ["variant"],
        )
        self.quality_ndcg = self._declare(
            Gauge, "quality_ndcg_at_10",
            "Prequential NDCG at 10 over the evaluator's sliding window, per variant.",
            ["variant"],
        )
        self.quality_window = self._declare(
            Gauge, "quality_window_events",
            "Events in the evaluator's sliding window (how much the quality gauges rest on).",
            ["variant"],
        )
        self.skip_accuracy = self._declare(
            Gauge, "skip_model_accuracy",
            "Accuracy of the skip classifier (predicted before learning) over a sliding window.",
            ["model"],
        )
        self.drift = self._declare(
            FastCounter, "drift_detections",
            "Concept-drift detections, by monitored signal.",
            ["signal"],
        )
        # ---------------------------------------------------------------- listening behaviour
        self.plays = self._declare(
            FastCounter, "plays",
            "Applied plays (not duplicates), by play context (bounded set).",
            ["context"],
        )
        self.skips = self._declare(
            FastCounter, "skips",
            "Applied plays that were skips, by play context (bounded set).",
            ["context"],
        )
        self.sessions_started = self._declare(
            FastCounter, "sessions_started",
            "Listening sessions started, by whether the listener was new to this worker.",
            ["listener"],
        )
        self.session_length = self._declare(
            FastHistogram, "session_length_seconds",
            "Length of finished sessions, first to last play (event time).",
            buckets=SESSION_LENGTH_BUCKETS,
        )
        self.session_plays = self._declare(
            FastHistogram, "session_plays",
            "Plays per finished session.",
            buckets=SESSION_PLAYS_BUCKETS,
        )
        self.control = self._declare(
            FastCounter, "control_commands",
            "Control-topic commands handled, by result.",
            ["result"],
        )
        self.checkpoints = self._declare(
            Counter, "checkpoints",
            "Model checkpoints to Redis, by result (written, error).",
            ["result"],
        )
        self.checkpoint_seconds = self._declare(
            Histogram, "checkpoint_seconds",
            "Time to snapshot the models and store the checkpoint.",
            buckets=LATENCY_BUCKETS,
        )
        self.checkpoint_pause_seconds = self._declare(
            Histogram, "checkpoint_pause_seconds",
            "Event-loop time a model checkpoint held the worker: the fork() of the child "
            "that builds the snapshot (or the whole snapshot when built in-process).",
            buckets=LATENCY_BUCKETS,
        )
        self.checkpoint_bytes = self._declare(
            Gauge, "checkpoint_bytes",
            "Size of the last model checkpoint.",
        )
        self.checkpoints_rejected = self._declare(
            Counter, "checkpoints_rejected",
            "Model checkpoints refused at start-up (the worker started fresh), by reason: "
            "oversized, malformed, truncated, version, unsigned, unknown_key, "
            "bad_signature, foreign_app, too_old, future, invalid_state, unreadable.",
            ["reason"],
        )
        self.checkpoint_restored = self._declare(
            Gauge, "checkpoint_restored",
            "1 if this worker started from a model checkpoint, else 0.",
        )
        self.model_errors = self._declare(
            FastCounter, "model_errors",
            "Events whose state was applied but learning/ranking raised.",
        )
        self.signals = self._declare(
            FastCounter, "track_signals",
            "Item-side learning signals shared between workers (sent, applied, error).",
            ["direction"],
        )
        self.signal_delay = self._declare(
            FastHistogram, "signal_delay_seconds",
            "Item-state replication delay: another worker sent a signals message -> its "
            "signals applied here (the sender batches plays for up to 50 ms before that).",
            buckets=FRESHNESS_BUCKETS,
        )
        self.signals_rejected = self._declare(
            FastCounter, "signals_rejected",
            "Track signals (or whole signals messages) dropped: failed authentication "
            "(unsigned, unknown_key, bad_signature) or validation, by reason.",
            ["reason"],
        )
        self.tracks_evicted = self._declare(
            FastCounter, "tracks_evicted",
            "Tracks evicted from the models to keep the catalogue bounded.",
        )
        self.eviction_seconds = self._declare(
            Histogram, "eviction_seconds",
            "Duration of one catalogue eviction (runs in a thread beside the event loop).",
            buckets=LATENCY_BUCKETS,
        )
        self.mf_users_evicted = self._declare(
            Counter, "mf_users_evicted",
            "Listeners whose MF factors were dropped to stay under max_users.",
        )
        self.sessions_evicted = self._declare(
            Counter, "sessions_evicted",
            "Listeners evicted from the session table (least recently active) to stay under "
            "max_sessions; their state and Redis list are deleted.",
        )
        self.rankings_shed = self._declare(
            Counter, "rankings_shed",
            "First-play rankings dropped because too many waited (a flood of new ids); "
            "that listener is ranked at their next play.",
        )
        self.loop_lag = self._declare(
            Histogram, "event_loop_lag_seconds",
            "How late the event loop ran a timer due every 10 ms: the time it was held by "
            "something else (stream.worker.watchdog.LoopLagProbe).",
            buckets=LOOP_LAG_BUCKETS,
        )
        self.loop_busy = self._declare(
            Histogram, "event_loop_busy_seconds",
            "CPU time the event loop's thread used between two turns of the 10 ms lag "
            "probe: the worker's own work that held the loop (a lag beyond it is time the "
            "thread did not run: other processes, or another thread holding the GIL).",
            buckets=LOOP_LAG_BUCKETS,
        )
        self.loop_busy_max = self._declare(
            Gauge, "event_loop_busy_max_seconds",
            "The longest CPU stretch of the event loop's thread between two probe turns "
            "since the worker started.",
        )
        self.gc_freeze_seconds = self._declare(
            Histogram, "gc_freeze_seconds",
            "Duration of one young collection + gc.freeze (every gc_freeze_interval_s).",
            buckets=LOOP_LAG_BUCKETS,
        )
        self.loop_lag_max = self._declare(
            Gauge, "event_loop_lag_max_seconds",
            "The longest event-loop lag since the worker started.",
        )
        self.catch_up_batches = self._declare(
            FastCounter, "catch_up_batches",
            "Play batches applied while draining a backlog (a partition 256+ plays behind; "
            "rankings are then coalesced over catch_up_rank_ms).",
        )
        self.build = self._declare(Info, "build", "Version information.")

        # Pre-create the bounded label children so every series exists (at 0) from the
        # first scrape: rate() panels and alerts then see data instead of "no series".
        for context in CONTEXTS:
            self.plays.labels(context)
            self.skips.labels(context)
        for kind in LISTENER_KINDS:
            self.sessions_started.labels(kind)
        for signal in DRIFT_SIGNALS:
            self.drift.labels(signal)
        self.redis_errors.labels("flush")
        for reason in REJECT_REASONS:
            self.checkpoints_rejected.labels(reason)
        self.redis_writes.labels("written")
        self.redis_writes.labels("stale_skipped")
        self.redis_writes.labels("dropped")
        #: play context -> its (plays, skips) children, resolved once (bounded, see below)
        self._context_children: dict[str | None, tuple[Any, Any]] = {}

    def _declare(
        self,
        kind: Callable[..., _M],
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        **options: Any,
    ) -> _M:
        """A metric of ``kind`` (``Counter``, ``FastHistogram``, ...) in the ``stream``
        namespace, on this registry; ``options``: the kind's own (``buckets``)."""
        return kind(
            name, documentation, labelnames, namespace=NAMESPACE, registry=self.registry,
            **options,
        )

    def init_topic(self, topic: str, outcomes: tuple[str, ...]) -> None:
        """Create the per-topic series at 0 (so the DLQ ratio is 0, not absent, when clean)."""
        for outcome in outcomes:
            self.events.labels(topic, outcome)
        self.dlq_writes.labels(topic)

    def observe_session(self, update: SessionUpdate, context: str | None) -> None:
        """Listening-behaviour metrics for one applied (non-duplicate) play."""
        if update.duplicate:
            return
        children = self._context_children.get(context)
        if children is None:  # labels() costs a lock and a dict per call: resolve once
            label = context_label(context)
            children = (self.plays.labels(label), self.skips.labels(label))
            if len(self._context_children) < 1024:  # contexts are free text: bounded
                self._context_children[context] = children
        children[0].inc()
        if update.is_skip:
            children[1].inc()
        if update.new_session:
            self.sessions_started.labels("new" if update.first_event else "returning").inc()
            before = update.before
            if not update.first_event and before.session_plays > 0:
                # the listener's previous session just ended
                length_ms = max(0, before.last_ts_ms - before.session_start_ms)
                self.session_length.observe(length_ms / 1000.0)
                self.session_plays.observe(before.session_plays)

    def set_quality(
        self,
        variant: str,
        *,
        hr_at_10: float,
        ndcg_at_10: float,
        window_events: int,
        mrr_at_10: float | None = None,
    ) -> None:
        """Export one variant's windowed prequential quality (called by the report timer)."""
        self.quality_hr.labels(variant).set(hr_at_10)
        if mrr_at_10 is not None:
            self.quality_mrr.labels(variant).set(mrr_at_10)
        self.quality_ndcg.labels(variant).set(ndcg_at_10)
        self.quality_window.labels(variant).set(window_events)

    def set_model_memory(self, sizes: Mapping[str, int]) -> None:
        for model, size in sizes.items():
            self.model_memory.labels(model).set(size)


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text exposition (``stream top``).

    >>> parse_exposition('# TYPE x_total counter\\nx_total{a="1"} 2.0\\n')
    [('x_total', {'a': '1'}, 2.0)]
    """
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def serve(metrics: Metrics, host: str, port: int) -> None:
    """Serve /metrics over HTTP in a background thread."""
    start_http_server(port, addr=host, registry=metrics.registry)
