"""The catalogue eviction, run off the event loop, and the guard that keeps every other user
of the models away while it runs.

At the 500k-track cap an eviction takes ~0.1-0.4 s of CPU, mostly a compiled pass that
releases the GIL and dictionary work in ~1 ms slices, so in a thread the event loop keeps
heartbeats, fetches and Redis flushes going (docs/benchmarks.md, "Eviction at the track
cap"). While it runs, nothing on the event loop touches the models: the plays agent awaits
it, and the ranker, the "more like this" refresh, the signal reader, the checkpointer and
the memory gauge wait (:meth:`ModelGuard.free`) or skip their turn (:meth:`ModelGuard.busy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from stream.processing.pipeline import Processor
from stream.worker.telemetry import Telemetry


class ModelGuard:
    """Runs the eviction the pipeline asks for in a thread; says whether one is running."""

    def __init__(
        self, processor: Processor, telemetry: Telemetry, on_evicted: Callable[[], None]
    ) -> None:
        self.processor = processor
        self.telemetry = telemetry
        #: called once an eviction has finished (the ranker: listeners may wait)
        self.on_evicted = on_evicted
        self._running: asyncio.Future[None] | None = None

    def busy(self) -> bool:
        return self._running is not None

    async def free(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for a running eviction to finish."""
        deadline = time.monotonic() + timeout_s
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def evict_due(self) -> None:
        """Run the eviction the last batch asked for (a catalogue above max_tracks) in a
        thread. If this task is cancelled (a stop), the thread still finishes, and
        :meth:`busy` stays true until it has."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.processor.evict_due)
        self._running = fut
        fut.add_done_callback(self._finished)
        with contextlib.suppress(Exception):  # reported by _finished
            await asyncio.shield(fut)

    def _finished(self, fut: asyncio.Future[None]) -> None:
        self._running = None
        processor = self.processor
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, Exception):
            self.telemetry.model_error()
            processor.report_model_error(exc, None)
        self.telemetry.evictions_took(processor.eviction_seconds)
        processor.eviction_seconds.clear()
        if processor.pending_rank:
            self.on_evicted()
