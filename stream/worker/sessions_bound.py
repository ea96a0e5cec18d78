"""The session-table bound (``max_sessions``): after each batch the plays agent asks
:class:`SessionBound` to evict the least recently active listeners above the cap (bounded per
batch), deleted through the session table (a changelog tombstone on the listener's
partition, when this worker owns it) and from Redis
(:meth:`stream.processing.pipeline.Processor.evict_sessions`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Final

from stream.config import Settings
from stream.faustx.app import SeamApp
from stream.processing.pipeline import Processor
from stream.worker.telemetry import Telemetry
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)

#: most listeners evicted from the session table per batch
SESSION_EVICT_BATCH: Final = 1024
#: listeners restored from the changelog put in the eviction order per batch (the memory
#: store: one of its 64 shards per batch instead; ChangelogTable.keys_chunks)
SESSION_SEED_CHUNK: Final = 8_192


class SessionBound:
    """Keeps the session table within ``max_sessions`` (see the module docstring)."""

    def __init__(
        self,
        app: SeamApp,
        settings: Settings,
        processor: Processor,
        sessions: Any,
        writer: WriterPart,
        telemetry: Telemetry,
    ) -> None:
        self.app = app
        self.topic = settings.plays_topic
        self.processor = processor
        self.sessions = sessions
        self.writer = writer
        self.telemetry = telemetry
        #: the consumer generation whose restored listeners are in the eviction order
        self._seeded: int | None = None
        self._seed: Iterator[Any] | None = None

    def after_batch(self) -> int:
        """Evict what is above the cap; returns how many listeners were evicted."""
        processor = self.processor
        if not processor.max_sessions:
            return 0
        self._seed_restored()
        if not processor.sessions_over():
            return 0
        owned = self.app.assigned_partitions(self.topic)
        sessions = self.sessions
        evicted = processor.evict_sessions(
            SESSION_EVICT_BATCH,
            delete=lambda user, partition, mine: sessions.delete_on(user, partition,
                                                                    changelog=mine),
            owned=owned.__contains__,
        )
        for user in evicted:
            self.writer.forget(processor.redis_key(user))
        if evicted:
            self.telemetry.sessions_evicted(len(evicted))
        return len(evicted)

    def _seed_restored(self) -> None:
        """Listeners restored from the changelog enter the order as the least recent,
        SESSION_SEED_CHUNK per batch, once per consumer generation."""
        generation = self.app.consumer_generation_id
        if self._seeded == generation:
            return
        if self.sessions.approx_len() <= self.processor.max_sessions:
            return
        if self._seed is None:
            self._seed = self.sessions.keys_chunks(SESSION_SEED_CHUNK)
        chunk = next(self._seed, None)
        if chunk is None:
            self._seeded, self._seed = generation, None
            return
        self.processor.track_sessions(chunk)
