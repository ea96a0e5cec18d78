"""Consumer lag of the plays partitions this worker owns: the broker's end offsets against
the last offset applied (``stream_consumer_lag_messages``); the total feeds the stall watch.

End offsets come from the broker through a small client of our own: the fetcher's highwater
lags behind under a backlog, and Faust's consumer is not asked (with kafka_consumer_thread
it lives in another thread, where a cancelled cross-thread call could wedge it; on the event
loop, a slow answer would hold up its fetches).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust

from stream.config import Settings
from stream.worker.telemetry import Telemetry

logger = logging.getLogger(__name__)


class ConsumerLag:
    """Measures and reports the lag (see the module docstring)."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        processed_offsets: dict[Any, int],
        telemetry: Telemetry,
    ) -> None:
        self.app = app
        self.settings = settings
        self.topic = settings.plays_topic
        self.processed_offsets = processed_offsets
        self.telemetry = telemetry
        self._offsets_client: Any = None

    async def measure(self) -> int:
        """Report the lag per assigned partition; returns the plays waiting in all of them
        (0 while tables are being recovered: not a stall)."""
        consumer = self.app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic == self.topic]
        ends: dict[Any, Any] = {tp: consumer.highwater(tp) for tp in assigned}
        if assigned:
            ends.update(await self._broker_ends(assigned))
        lag: dict[str, int] = {}
        for tp in assigned:
            end = ends.get(tp)
            if end is None:
                continue
            done = self.processed_offsets.get(tp)
            lag[str(tp.partition)] = max(0, end - (done + 1 if done is not None else 0))
        self.telemetry.consumer_lag(len(assigned), lag)
        if getattr(self.app, "in_recovery", False):
            return 0  # restoring tables: not a stall (the clock restarts afterwards)
        return sum(lag.values())

    async def _broker_ends(self, assigned: list[Any]) -> dict[Any, Any]:
        try:
            if self._offsets_client is None:
                from aiokafka import AIOKafkaConsumer

                from stream.adapters.kafka import client_kwargs

                client = AIOKafkaConsumer(**client_kwargs(self.settings),
                                          enable_auto_commit=False)
                await asyncio.wait_for(client.start(), 5.0)
                self._offsets_client = client
            ends: dict[Any, Any] = await asyncio.wait_for(
                self._offsets_client.end_offsets(assigned), 2.0)
            return ends
        except Exception as exc:  # noqa: BLE001 - keep the fetch view; retry next tick
            logger.debug("end offsets for lag unavailable: %r", exc)
            return {}

    async def close(self) -> None:
        if self._offsets_client is not None:
            await self._offsets_client.stop()
