"""The dead-letter topic: rejected records go there with their original key and bytes and
``dlq.*`` headers (:meth:`stream.processing.pipeline.DeadLetter.headers`), and are counted."""

from __future__ import annotations

from collections import deque
from typing import Any

from stream.processing.pipeline import DeadLetter
from stream.worker.telemetry import Telemetry


class DeadLetters:
    """Queues the pipeline's dead letters (it runs synchronously) and sends them."""

    def __init__(self, topic: Any, telemetry: Telemetry) -> None:
        self.topic = topic
        self.telemetry = telemetry
        self.queued: deque[DeadLetter] = deque()

    def queue(self, letter: DeadLetter) -> None:
        self.queued.append(letter)

    async def send_queued(self) -> None:
        while self.queued:
            await self.send(self.queued.popleft())

    async def send(self, letter: DeadLetter) -> None:
        record = letter.record
        await self.topic.send(key=record.key, value=record.value or b"",
                              headers=letter.headers())
        self.telemetry.dead_lettered(record.topic, letter.rejection.reason)
