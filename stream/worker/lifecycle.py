"""Start-up and shutdown order of the worker's own parts, written in one place.

Faust starts this service once the app is fully started (tables recovered, agents running)
and stops it first when the worker stops, before the agents, the consumer and the
producer (so the agents may still apply plays while it stops: whatever they submit after
the final ranking waits for their next start, as Redis holds derived data).

Start-up: the Redis writer (everything below writes through it), then the ranker that
feeds it, the loop-lag probe, and the signal reader. Each runs as a task this service
supervises (``add_future``; the writer's flusher through :meth:`WriterPart.watch`): one that
raises crashes the worker (mode crashes the whole service tree, the worker logs the
exception and exits non-zero), never leaving a worker that consumes and commits plays
without a part it needs.

Shutdown, each step relying on the ones before it:

1. the loop-lag probe stops (nothing to measure);
2. the final model checkpoint (in-process: nothing to hide from the event loop now, and no
   child to outlive the worker), while Redis is still connected;
3. the catalogue's play counts not written yet are queued;
4. the listeners still waiting for a ranking are ranked (their lists queued);
5. the Redis writer flushes everything queued (bounded) and stops;
6. the pending track signals go out (what the last plays taught, for the others);
7. the Redis connection closes;
8. the signal reader and the lag client stop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import mode

from stream.worker.catalog_sync import CatalogSync
from stream.worker.checkpointer import Checkpointer
from stream.worker.eviction import ModelGuard
from stream.worker.lag import ConsumerLag
from stream.worker.ranker import Ranker
from stream.worker.signals import SignalPublisher, SignalReader
from stream.worker.watchdog import LoopLagProbe
from stream.worker.writer import WriterPart


@dataclass
class Parts:
    """The parts whose start and stop the lifecycle orders."""

    writer: WriterPart
    ranker: Ranker
    loop_lag: LoopLagProbe
    signal_reader: SignalReader
    signals: SignalPublisher
    checkpointer: Checkpointer
    catalog: CatalogSync
    models: ModelGuard
    lag: ConsumerLag


class Lifecycle(mode.Service):
    """Starts and stops the parts in the order the module docstring gives."""

    def __init__(self, parts: Parts, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parts = parts
        self._loop_lag: asyncio.Future[Any] | None = None
        self._reader: asyncio.Future[Any] | None = None

    async def on_start(self) -> None:
        p = self.parts
        await p.writer.start()
        # supervised (mode crashes the worker if one of these raises): the writer's flusher,
        # the ranker, the loop-lag probe and the signal reader
        self.add_future(p.writer.watch())
        self.add_future(p.ranker.run())
        self._loop_lag = self.add_future(p.loop_lag.run())
        await p.signal_reader.start()
        self._reader = self.add_future(p.signal_reader.run())

    async def on_stop(self) -> None:
        p = self.parts
        if self._loop_lag is not None:
            self._loop_lag.cancel()
        await p.checkpointer.write_final()
        p.catalog.write(counts=True)
        await p.models.free()
        p.ranker.rank_due()
        await p.writer.stop()
        p.signals.flush(force=True)
        await p.writer.close()
        if self._reader is not None:
            self._reader.cancel()
        await p.signal_reader.stop()
        await p.lag.close()
