"""The control agent: operator commands from the control topic (co-partitioned with plays, so
this worker owns the listener a command names). Only authentic, fresh commands keyed by
their user, on their user's partition, are applied
(:class:`stream.processing.control.ControlGate`), and only once: each command's nonce is
claimed in Redis, shared by every worker (:class:`stream.processing.control.NonceLedger`;
fails closed while Redis cannot answer). The rest go to the dead-letter topic.

A forget (``stream forget USER``) drops the listener's session state and user-side model
parameters (:meth:`stream.processing.pipeline.Processor.forget_user`), leaves a tombstone in
Redis before the command is acknowledged (so no restore brings the listener back), tells the
other workers to drop the listener's model state (on the signals topic), and deletes their
list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import faust

from stream.adapters.redis_store import add_tombstone, claim_nonce, tombstones_key
from stream.config import Settings
from stream.core.events import Rejection, escape_text
from stream.processing.auth import KeyRing
from stream.processing.control import ControlGate, NonceLedger
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
        *,
        partitions: int | None = None,
        broadcast_forget: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.writer = writer
        self.dead_letters = dead_letters
        self.telemetry = telemetry
        self.gate = ControlGate(
            ring, insecure=settings.worker_insecure,
            max_age_ms=settings.control_max_age_s * 1000, partitions=partitions,
        )
        self.log = RateLimitedLog(logging.getLogger("stream.control"), level=logging.WARNING)
        self.tombstones = tombstones_key(settings.app_id)
        #: tells the other workers of a forget (SignalPublisher.broadcast_forget)
        self.broadcast_forget = broadcast_forget
        # replay protection shared by every worker, in Redis; fails closed
        self.nonces = NonceLedger(self._claim_nonce, settings.app_id,
                                  2 * self.gate.max_age_ms, on_error=self._on_nonce_error)

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            cmd = self.gate.admit(
                msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.headers,
                _timestamp_ms(msg), msg.timestamp_type == LOG_APPEND_TIME,
                int(time.time() * 1000),
            )
            if not isinstance(cmd, Rejection):
                cmd = await self.nonces.check(cmd, msg.topic, msg.partition, msg.offset) or cmd
            if isinstance(cmd, Rejection):
                await self.refuse(msg, cmd)
            else:
                await self.forget(cmd.user_id, cmd.request_id)

    async def _claim_nonce(self, key: str, marker: str, ttl_ms: int) -> bytes | None:
        client = self.writer.client
        if client is None:
            raise ConnectionError("the Redis writer has not started yet")
        return await claim_nonce(client, key, marker, ttl_ms)

    def _on_nonce_error(self, exc: BaseException) -> None:
        self.telemetry.redis_error("nonce")
        self.log.log("nonce_error", "could not check a control nonce in Redis (%s: %s); "
                     "retrying", type(exc).__name__, escape_text(str(exc), 200))

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
        forget_ms = int(time.time() * 1000)
        await self.record_tombstone(user_id, forget_ms)
        if self.broadcast_forget is not None:
            self.broadcast_forget(user_id, forget_ms)
        self.writer.forget(self.processor.redis_key(user_id))
        self.telemetry.control("forgotten" if existed else "forgotten_unknown")
        # the request id identifies the deletion; the user id is not logged (privacy)
        logger.info("forgot user (request %s, state existed: %s)",
                    escape_text(request_id, 128), existed)

    async def record_tombstone(self, user_id: str, forget_ms: int) -> None:
        """Leave a forget tombstone in Redis before the command is acknowledged, so that no
        restore (of an older checkpoint, or one another worker wrote) brings the listener
        back. Retried while Redis is unreachable (the control agent waits; plays do not)."""
        s = self.settings
        delay = 0.1
        while True:
            client = self.writer.client
            if client is not None:
                try:
                    await add_tombstone(client, self.tombstones, user_id, forget_ms,
                                        s.forget_tombstone_ttl_s)
                    return
                except Exception as exc:  # noqa: BLE001 - Redis down: retry, bounded delay
                    self.telemetry.redis_error("tombstone")
                    logger.warning("could not record a forget tombstone (%s: %s); retrying",
                                   type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.redis_retry_max_s)
