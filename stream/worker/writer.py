"""The Redis writer part: owns the Redis connection and the batched
:class:`stream.adapters.redis_store.RecoWriter`. It only writes -- what to rank and when is
the ranker's business (:mod:`stream.worker.ranker`) -- and it holds what other parts hand
it before it has started (the first plays can be applied while it connects).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from stream.adapters.redis_store import RecoWriter, connect_async
from stream.config import Settings, redis_auth
from stream.processing.documents import PendingWrite
from stream.worker.telemetry import Telemetry


class WriterPart:
    """Writes lists, similar lists, deletions and catalogue commands to Redis (see the
    module docstring). :meth:`start` and :meth:`stop` are called by the worker's lifecycle."""

    def __init__(self, settings: Settings, telemetry: Telemetry) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.writer: RecoWriter | None = None
        #: handed over before start: forgets first, then writes (as they were queued)
        self._early_forgets: deque[str] = deque()
        self._early_writes: deque[PendingWrite] = deque()
        telemetry.pending_writes = self.pending

    @property
    def client(self) -> Any:
        """The async Redis client (for the checkpointer, tombstones and name look-ups)."""
        return None if self.writer is None else self.writer.client

    def pending(self) -> int:
        return len(self.writer.pending) if self.writer is not None else 0

    async def start(self) -> None:
        s, t = self.settings, self.telemetry
        client = connect_async(s.redis_url, **redis_auth(s))
        self.writer = RecoWriter(
            client,
            ttl_s=s.reco_ttl_s,
            channel=s.notify_channel,
            flush_interval_ms=s.redis_flush_interval_ms,
            max_batch=s.redis_max_batch,
            retry_max_s=s.redis_retry_max_s,
            on_flush=t.on_flush,
            on_error=t.on_flush_error,
            on_key_error=t.on_key_error,
        )
        self.writer.start()
        while self._early_forgets:
            self.writer.forget(self._early_forgets.popleft())
        while self._early_writes:
            self.writer.submit(self._early_writes.popleft())

    async def watch(self) -> None:
        """Raise if the writer's flusher dies (see RecoWriter.watch); the lifecycle runs
        this as a supervised task, so a dead flusher crashes the worker instead of leaving
        it consuming and committing plays whose lists are never written."""
        if self.writer is None:
            raise RuntimeError("the Redis writer part was not started")
        await self.writer.watch()

    async def stop(self) -> None:
        """Flush what is pending (bounded), then stop the flusher (the connection stays
        open for the parts stopped after it: see :meth:`close`)."""
        if self.writer is not None:
            await self.writer.stop()

    async def close(self) -> None:
        if self.writer is not None:
            client: Any = self.writer.client  # types-redis predates aclose()
            await client.aclose()

    def submit(self, write: PendingWrite) -> None:
        """A listener's list (the newest ``seq`` per key wins)."""
        if self.writer is not None:
            self.writer.submit(write)
        else:  # not started yet (first events during start-up)
            self._early_writes.append(write)

    def forget(self, key: str) -> None:
        """Delete a forgotten listener's list (and drop any pending write for it)."""
        if self.writer is not None:
            self.writer.forget(key)
        else:
            self._early_forgets.append(key)

    def submit_plain(self, key: str, doc: bytes) -> None:
        if self.writer is not None:
            self.writer.submit_plain(key, doc)

    def submit_commands(self, commands: Sequence[bytes]) -> None:
        if self.writer is not None:
            self.writer.submit_commands(commands)

    async def ready(self) -> None:
        """Return once no flush round trip is in flight (see RecoWriter.ready)."""
        if self.writer is not None:
            await self.writer.ready()
