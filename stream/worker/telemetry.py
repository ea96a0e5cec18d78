"""All of the worker's metrics glue: the other parts report what happened in their own
terms (a batch's outcomes, a Redis flush, a checkpoint written, a signal applied) and
this module turns it into :class:`stream.adapters.metrics.Metrics` updates. Metric names
and labels are defined in the adapter; nothing here changes them.

Per-event paths resolve their labelled children once (``labels()`` takes a lock and builds
a key on every call).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from stream import __version__
from stream.adapters.metrics import Metrics
from stream.adapters.redis_store import WRITE_ERROR_REASONS
from stream.config import Settings
from stream.core.evaluation import Prequential
from stream.core.sizing import model_memory_bytes
from stream.processing.documents import PendingWrite
from stream.processing.pipeline import OUTCOMES, Outcome


class Telemetry:
    """Metrics updates for one worker (see the module docstring)."""

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        m = self.metrics = metrics
        self.topic = settings.plays_topic
        m.init_topic(self.topic, OUTCOMES)
        m.init_topic(settings.control_topic, ())
        self._outcomes = {o: m.events.labels(self.topic, o) for o in OUTCOMES}
        self._stages: dict[str, Any] = {}
        self._written = m.redis_writes.labels("written")
        self._stale = m.redis_writes.labels("stale_skipped")
        self._dropped = m.redis_writes.labels("dropped")
        self._write_errors = {r: m.redis_write_errors.labels(r) for r in WRITE_ERROR_REASONS}
        #: each listener's share of a ranking pass (Processor.rank_pending's on_ranked)
        self.observe_ranking: Callable[[float], None] = m.stage.labels("rank").observe
        #: how many writes wait in the Redis writer (set by the writer service)
        self.pending_writes: Callable[[], int] = lambda: 0
        self._drift_seen = 0
        self._users_evicted_seen = 0
        self._rank_shed_seen = 0
        self._lag_partitions: set[str] = set()
        self._report_ticks = 0

    def build_info(self, model_version: str, app_id: str) -> None:
        self.metrics.build.info(
            {"version": __version__, "model_version": model_version, "app_id": app_id}
        )

    # ------------------------------------------------------------------ plays

    def _stage(self, stage: str) -> Any:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.metrics.stage.labels(stage)
        return child

    def observe_batch(
        self, outcomes: Sequence[Outcome], stage_totals: dict[str, float], per_event_s: float
    ) -> None:
        """One applied batch of plays: stage and processing histograms (each play observes
        its share of the batch's time), outcome counters and listening-behaviour metrics."""
        m, n = self.metrics, len(outcomes)
        if not n:
            return
        for stage, seconds in stage_totals.items():
            self._stage(stage).observe_many(seconds / n, n)
        m.processing.observe_many(per_event_s, n)
        counters, observe_session = self._outcomes, m.observe_session
        last_event = None
        for outcome in outcomes:
            counters[outcome.outcome].inc()
            if outcome.model_error is not None:
                m.model_errors.inc()
            event = outcome.event
            if event is not None:
                last_event = event
                if outcome.update is not None:
                    observe_session(outcome.update, event.context)
        if last_event is not None:  # the batch's last play's time, set once (was: per play)
            m.last_event_ts.set(last_event.ts_ms / 1000.0)

    def catch_up_batch(self) -> None:
        self.metrics.catch_up_batches.inc()

    def dead_lettered(self, topic: str, reason: str) -> None:
        self.metrics.dlq_writes.labels(topic).inc()
        self.metrics.rejected.labels(topic, reason).inc()

    def model_error(self) -> None:
        self.metrics.model_errors.inc()

    def tracks_evicted(self, tracks: int) -> None:
        self.metrics.tracks_evicted.inc(tracks)

    def evictions_took(self, seconds: Sequence[float]) -> None:
        for s in seconds:
            self.metrics.eviction_seconds.observe(s)

    # ------------------------------------------------------------------ Redis writer

    def on_flush(self, batch: list[PendingWrite], results: list[int], seconds: float) -> None:
        """A Redis flush went through: freshness of each fresh list that was written."""
        m = self.metrics
        now = time.time()
        m.redis_flush.observe(seconds)
        written = 0
        for write, result in zip(batch, results, strict=True):
            if result:
                written += 1
                if not write.fresh:
                    continue
                m.freshness.observe(max(0.0, now - write.event_ts_ms / 1000.0))
                if write.ingest_ts_ms:
                    m.ingest_freshness.observe(max(0.0, now - write.ingest_ts_ms / 1000.0))
        self._written.inc(written)
        if len(batch) > written:
            self._stale.inc(len(batch) - written)
        m.redis_pending.set(self.pending_writes())

    def on_flush_error(self, exc: Exception, seconds: float) -> None:
        self.metrics.redis_errors.labels("flush").inc()
        self.metrics.redis_retries.inc()

    def on_key_error(self, kind: str, reason: str, dropped: bool) -> None:
        self._write_errors[reason].inc()
        if dropped and kind == "doc":
            self._dropped.inc()

    def redis_error(self, what: str) -> None:
        self.metrics.redis_errors.labels(what).inc()

    # ------------------------------------------------------------------ other parts

    def signals(self, what: str, n: int = 1) -> None:
        """Track signals ``sent``, ``applied`` or failed to apply (``error``)."""
        self.metrics.signals.labels(what).inc(n)

    def signal_delay(self, seconds: float) -> None:
        """One signals message applied, ``seconds`` after its sender sent it."""
        self.metrics.signal_delay.observe(max(0.0, seconds))

    def signal_rejected(self, reason: str) -> None:
        self.metrics.signals_rejected.labels(reason).inc()

    def control(self, what: str) -> None:
        self.metrics.control.labels(what).inc()

    def sessions_evicted(self, n: int) -> None:
        """Listeners evicted from the session table (``max_sessions``)."""
        self.metrics.sessions_evicted.inc(n)

    def rankings_shed(self, total: int) -> None:
        """The pipeline's running count of first-play rankings shed (``rank_shed``)."""
        if total > self._rank_shed_seen:
            self.metrics.rankings_shed.inc(total - self._rank_shed_seen)
            self._rank_shed_seen = total

    def checkpoint_written(self, seconds: float, nbytes: int) -> None:
        self.metrics.checkpoints.labels("written").inc()
        self.metrics.checkpoint_seconds.observe(seconds)
        self.metrics.checkpoint_bytes.set(nbytes)

    def checkpoint_paused(self, seconds: float) -> None:
        self.metrics.checkpoint_pause_seconds.observe(seconds)

    def checkpoint_rejected(self, reason: str) -> None:
        self.metrics.checkpoints_rejected.labels(reason).inc()

    def checkpoint_restored(self, restored: bool) -> None:
        self.metrics.checkpoint_restored.set(1 if restored else 0)

    def checkpoint_failed(self) -> None:
        self.metrics.checkpoints.labels("error").inc()

    def loop_lag(self, seconds: float, max_lag: float) -> None:
        self.metrics.loop_lag.observe(seconds)
        if seconds >= max_lag:
            self.metrics.loop_lag_max.set(seconds)

    def loop_busy(self, cpu_s: float, max_busy: float) -> None:
        self.metrics.loop_busy.observe(cpu_s)
        if cpu_s >= max_busy:
            self.metrics.loop_busy_max.set(cpu_s)

    def rebalanced(self) -> None:
        self.metrics.rebalances.inc()

    def stale_dropped(self, plays: int) -> None:
        self.metrics.stale_dropped.inc(plays)

    def stalled(self) -> None:
        self.metrics.stalls.inc()

    def gc_frozen(self, seconds: float) -> None:
        self.metrics.gc_freeze_seconds.observe(seconds)

    # ------------------------------------------------------------------ the report timer

    def consumer_lag(self, assigned: int, lag: dict[str, int]) -> None:
        """Lag per assigned partition; partitions no longer reported are removed (their
        new owner reports them now)."""
        m = self.metrics
        m.assigned.labels(self.topic).set(assigned)
        for partition, value in lag.items():
            m.lag.labels(self.topic, partition).set(value)
        for stale in self._lag_partitions - lag.keys():
            m.lag.remove(self.topic, stale)
        self._lag_partitions = set(lag)

    def state(self, recommender: Any, active_users: int, models_free: bool) -> None:
        """Gauges of the worker's state, every report tick (the deep model size sampled)."""
        m = self.metrics
        self._report_ticks += 1
        m.active_users.set(active_users)
        m.catalogue.set(
            recommender.catalogue_size() if hasattr(recommender, "catalogue_size") else 0
        )
        m.redis_pending.set(self.pending_writes())
        mf = getattr(recommender, "mf", None)
        users_evicted = getattr(mf, "users_evicted", 0)
        if users_evicted > self._users_evicted_seen:
            m.mf_users_evicted.inc(users_evicted - self._users_evicted_seen)
        self._users_evicted_seen = users_evicted
        if self._report_ticks % 8 == 1 and models_free:  # sampled deep size
            m.set_model_memory(model_memory_bytes(recommender))

    def quality(self, recommender: Any, evaluator: Prequential | None) -> None:
        """Export the evaluator's windowed summary (HR@10 / MRR@10 / NDCG@10 per variant, skip
        accuracy) and the recommender's drift detections. Until something feeds the
        evaluator (test-then-train), the quality gauges stay absent."""
        m = self.metrics
        detector = getattr(recommender, "drift", None)
        detections = getattr(detector, "n_detections", None)
        if isinstance(detections, int):
            m.drift.labels("skip_rate").inc(max(0, detections - self._drift_seen))
            self._drift_seen = detections
        if evaluator is None or getattr(evaluator, "k", None) != 10:
            return
        for variant, stats in evaluator.summary().items():
            if variant == "skip":
                m.skip_accuracy.labels("skip").set(stats["accuracy"])
            else:
                m.set_quality(
                    variant,
                    hr_at_10=stats["hr@10"],
                    mrr_at_10=stats["mrr@10"],
                    ndcg_at_10=stats["ndcg@10"],
                    window_events=int(stats["events"]),
                )
