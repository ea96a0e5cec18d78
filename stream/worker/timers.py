"""The worker's periodic work, each a Faust timer (:meth:`Timers.install`):

- ``refresh_similar`` (10 Hz): a few "more like this" lists, and the pending track signals;
- ``flush_catalog_counts`` (``catalog_flush_s``) and ``resolve_names`` (1 s): the catalogue;
- ``refresh_short_lists`` (``short_refresh_s``): re-rank lists that came out short;
- ``report_state`` (2 s): lag, the stall watch, gauges, rate-limited logs, the GC freeze;
- ``checkpoint_models`` (``checkpoint_interval_s``, when checkpoints are on).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import faust

from stream.config import Settings
from stream.processing.pipeline import Processor
from stream.processing.ratelog import RateLimitedLog
from stream.worker.catalog_sync import CatalogSync
from stream.worker.checkpointer import Checkpointer
from stream.worker.eviction import ModelGuard
from stream.worker.heap import freeze_survivors
from stream.worker.lag import ConsumerLag
from stream.worker.ranker import Ranker
from stream.worker.signals import SignalPublisher
from stream.worker.telemetry import Telemetry
from stream.worker.watchdog import StallWatch
from stream.worker.writer import WriterPart

#: how often the "more like this" refresh runs while plays wait in the stream buffer
SIMILAR_BACKLOG_S: Final = 1.0


class Timers:
    """The timers' callbacks, over the parts they drive (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        processor: Processor,
        writer: WriterPart,
        ranker: Ranker,
        models: ModelGuard,
        signals: SignalPublisher,
        catalog: CatalogSync,
        checkpointer: Checkpointer,
        lag: ConsumerLag,
        stall_watch: StallWatch,
        telemetry: Telemetry,
        sessions: Any,
        evaluator: Any,
        nothing_buffered: Callable[[], bool],
        logs: Sequence[RateLimitedLog],
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.writer = writer
        self.ranker = ranker
        self.models = models
        self.signals = signals
        self.catalog = catalog
        self.checkpointer = checkpointer
        self.lag = lag
        self.stall_watch = stall_watch
        self.telemetry = telemetry
        self.sessions = sessions
        self.evaluator = evaluator
        self.nothing_buffered = nothing_buffered
        self.logs = logs
        self._similar_refreshed = 0.0
        self._gc_frozen_at = time.monotonic()

    def install(self, app: faust.App) -> None:
        s = self.settings
        timers: list[tuple[float, Callable[[], Any]]] = [
            (0.1, self.refresh_similar),
            (s.catalog_flush_s, self.catalog.write_counts),
            (1.0, self.catalog.resolve_names),
            (2.0, self.report_state),
        ]
        if s.short_refresh_s:
            timers.append((s.short_refresh_s, self.refresh_short_lists))
        if self.checkpointer.enabled:
            timers.append((s.checkpoint_interval_s, self.checkpointer.write_periodic))
        for interval, fun in timers:
            app.timer(interval=interval, name=fun.__name__)(fun)

    async def refresh_similar(self) -> None:
        """Ten times a second, refresh a few "more like this" lists of recently played
        tracks (each at most every similar_refresh_s), whether or not plays are arriving.
        At most 2.5 ms per tick (2.5 % of a core; a list costs ~0.3 ms at 12k tracks now
        that the factor norms are computed once per tick, ~0.8 ms before), so the event
        loop is never held long enough to show in the freshness p99."""
        self.signals.flush()
        if self.writer.client is None or not self.processor.touched_tracks or self.models.busy():
            return
        now = time.time()
        # plays waiting in the stream buffer come first: then refresh once a second only
        if not self.nothing_buffered() and now - self._similar_refreshed < SIMILAR_BACKLOG_S:
            return
        self._similar_refreshed = now
        for key, doc in self.processor.similar_due(now, limit=20, budget_s=0.0025):
            self.writer.submit_plain(key, doc)

    async def refresh_short_lists(self) -> None:
        """Re-rank (bounded) the listeners whose list came out short, once the catalogue
        has grown since (their next play would otherwise be the next time)."""
        if self.processor.refresh_short_lists():
            self.ranker.wake()

    async def report_state(self) -> None:
        """Every 2 s: lag and the stall watch, state gauges, quality, rate-limited logs, and
        the periodic GC freeze."""
        waiting = await self.lag.measure()
        if self.stall_watch.check(time.monotonic(), waiting):
            self.telemetry.stalled()
        recommender = self.processor.recommender
        self.telemetry.state(recommender, self.sessions.approx_len(), not self.models.busy())
        self.telemetry.quality(recommender, self.evaluator)
        self.telemetry.rankings_shed(self.processor.rank_shed)
        for log in self.logs:
            log.flush()
        interval = self.settings.gc_freeze_interval_s
        if interval and time.monotonic() - self._gc_frozen_at >= interval:
            self._gc_frozen_at = time.monotonic()
            self.telemetry.gc_frozen(freeze_survivors())
