"""The control agent: operator commands from the control topic (co-partitioned with plays, so
this worker owns the listener a command names). Only authentic, fresh, first-seen commands
keyed by their user are applied (:class:`stream.processing.control.ControlGate`); the rest go
to the dead-letter topic.

A forget (``stream forget USER``) drops the listener's session state and user-side model
parameters (:meth:`stream.processing.pipeline.Processor.forget_user`), leaves a tombstone in
Redis before the command is acknowledged (so no restore brings the listener back), and
deletes their list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import faust

from stream.adapters.redis_store import add_tombstone, tombstones_key
from stream.config import Settings
from stream.core.events import Rejection, escape_text
from stream.processing.auth import KeyRing
from stream.processing.control import ControlGate
from stream.processing.pipeline import DeadLetter, Processor, Record
from stream.processing.ratelog import RateLimitedLog
from stream.worker.deadletters import DeadLetters
from stream.worker.telemetry import Telemetry
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)

#: Kafka's timestamp type of a record whose timestamp the broker set at append time
LOG_APPEND_TIME: Final = 1


def _timestamp_ms(msg: Any) -> int | None:
    return int(msg.timestamp * 1000) if msg.timestamp else None


class ControlAgent:
    """The ``control`` agent (see the module docstring); :meth:`run` is the agent."""

    def __init__(
        self,
        settings: Settings,
        ring: KeyRing,
        processor: Processor,
        writer: WriterPart,
        dead_letters: DeadLetters,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.writer = writer
        self.dead_letters = dead_letters
        self.telemetry = telemetry
        self.gate = ControlGate(
            ring, insecure=settings.worker_insecure, max_age_ms=settings.control_max_age_s * 1000
        )
        self.log = RateLimitedLog(logging.getLogger("stream.control"), level=logging.WARNING)
        self.tombstones = tombstones_key(settings.app_id)
        #: (partition, consumer generation) whose recent nonces the gate has read back
        self.nonces_loaded: set[tuple[int, int]] = set()

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            if (msg.partition, msg.generation_id) not in self.nonces_loaded:
                await self.load_recent_nonces(msg)
            cmd = self.gate.admit(
                msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.headers,
                _timestamp_ms(msg), msg.timestamp_type == LOG_APPEND_TIME,
                int(time.time() * 1000),
            )
            if isinstance(cmd, Rejection):
                await self.refuse(msg, cmd)
            else:
                await self.forget(cmd.user_id, cmd.request_id)

    async def load_recent_nonces(self, msg: Any) -> None:
        """Before the first command of a partition this process (re)took, read that
        partition's last two windows back and remember their nonces: a replay right after
        a restart or a rebalance is refused as well (stream.processing.control.ControlGate)."""
        from stream.adapters.kafka import read_partition_since

        self.nonces_loaded.add((msg.partition, msg.generation_id))
        now = int(time.time() * 1000)
        try:
            records = await read_partition_since(
                self.settings, msg.topic, msg.partition, now - 2 * self.gate.max_age_ms,
                msg.offset,
            )
        except Exception as exc:  # noqa: BLE001 - Kafka trouble: admit on memory alone
            logger.warning("could not read back %s[%d] for control nonces: %r",
                           msg.topic, msg.partition, exc)
            return
        learned = sum(
            self.gate.learn(r.topic, r.partition, r.offset, r.key, r.value, r.headers, now)
            for r in records
        )
        logger.info("control %s[%d]: %d recent nonce(s) read back", msg.topic, msg.partition,
                    learned)

    async def refuse(self, msg: Any, rejection: Rejection) -> None:
        self.log.log(
            rejection.reason,
            "refused control message at %s[%d]@%d: %s: %s",
            msg.topic, msg.partition, msg.offset, rejection.reason,
            escape_text(rejection.detail, 300),
        )
        self.telemetry.control("rejected")
        record = Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                        _timestamp_ms(msg))
        await self.dead_letters.send(DeadLetter(record, rejection))

    async def forget(self, user_id: str, request_id: str) -> None:
        existed = self.processor.forget_user(user_id)
        await self.record_tombstone(user_id)
        self.writer.forget(self.processor.redis_key(user_id))
        self.telemetry.control("forgotten" if existed else "forgotten_unknown")
        # the request id identifies the deletion; the user id is not logged (privacy)
        logger.info("forgot user (request %s, state existed: %s)",
                    escape_text(request_id, 128), existed)

    async def record_tombstone(self, user_id: str) -> None:
        """Leave a forget tombstone in Redis before the command is acknowledged, so that no
        restore (of an older checkpoint, or one another worker wrote) brings the listener
        back. Retried while Redis is unreachable (the control agent waits; plays do not)."""
        s = self.settings
        delay = 0.1
        while True:
            client = self.writer.client
            if client is not None:
                try:
                    await add_tombstone(client, self.tombstones, user_id,
                                        int(time.time() * 1000), s.forget_tombstone_ttl_s)
                    return
                except Exception as exc:  # noqa: BLE001 - Redis down: retry, bounded delay
                    self.telemetry.redis_error("tombstone")
                    logger.warning("could not record a forget tombstone (%s: %s); retrying",
                                   type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.redis_retry_max_s)
