"""The session table's changelog, written in batches straight to the Kafka producer.

Faust writes one changelog record per table assignment through its own machinery: a
``FutureMessage``, its producer buffer, a hand-over task, ``Topic.publish_message`` and
per-record sensor and delivery callbacks. In the worker that cost ~260 us per play, more
than the recommendation core (P1 drain 1,005 -> 1,366 events/s with the table replaced by
a dict, docs/benchmarks.md). :class:`BatchedChangelogTable` keeps Faust's table (store,
recovery, standbys, the changelog topic and its serialisers) and only replaces that send
path:

- an assignment marks the key dirty with the partition of the event being processed;
- :meth:`BatchedChangelogTable.send_dirty` serialises every dirty key's *latest* value and
  hands it to the aiokafka producer; the worker calls it every few milliseconds from the
  agent, and the commit flush (:func:`stream.app.make_commit_wait_for_changelog`) calls it
  before it waits for the producer, so no offset is committed ahead of the state it led to;
- a delivery that failed puts its key back (unless a newer value is waiting) and fails the
  commit, so the offsets stay where they were and the state is sent again.

Deletes (``del table[key]``, the tombstones of forgotten listeners) keep Faust's path; a
delete drops the key's pending value, so a tombstone is never followed by an older state.
This is the only module besides :mod:`stream.app` that imports Faust.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

logger = logging.getLogger(__name__)


class ChangelogSendError(RuntimeError):
    """A batched changelog record could not be delivered: do not commit past it."""


class BatchedChangelogTable(faust.Table):  # type: ignore[type-arg]
    """A Faust table whose changelog records are coalesced per key and sent in batches."""

    def __post_init__(self) -> None:
        super().__post_init__()
        #: key -> (changelog partition, latest value): assigned, not yet sent
        self._dirty: dict[Any, tuple[int, Any]] = {}
        #: sent, not yet known to be delivered: (future, key, partition, value)
        self._in_flight: list[tuple[asyncio.Future[Any], Any, int, Any]] = []
        self._send_lock = asyncio.Lock()
        self.records_sent = 0

    # -- Faust hooks ----------------------------------------------------------------------

    def on_key_set(self, key: Any, value: Any) -> None:
        """Called by ``table[key] = value`` inside stream iteration (after the store set)."""
        partition = self.partition_for_key(key)  # the current event's partition
        if partition is None:  # use_partitioner tables are not batched
            super().on_key_set(key, value)
            return
        self._dirty[key] = (partition, value)

    def on_key_del(self, key: Any) -> None:
        # the tombstone goes through Faust's buffer now; a pending older value must not
        # follow it onto the changelog
        self._dirty.pop(key, None)
        super().on_key_del(key)

    # -- sending --------------------------------------------------------------------------

    @property
    def dirty(self) -> int:
        """Keys assigned since their last changelog record was handed to the producer."""
        return len(self._dirty)

    async def send_dirty(self) -> int:
        """Hand every dirty key's latest value to the producer (in assignment order).
        Returns how many records were handed over. On a producer error the keys not yet
        handed over stay dirty and the error propagates."""
        if not self._dirty:
            return 0
        async with self._send_lock:  # snapshots are sent in order, never interleaved
            batch, self._dirty = self._dirty, {}
            topic: Any = self.changelog_topic  # a faust Topic (prepare_* are not on TopicT)
            name = topic.get_topic_name()
            producer = self.app.producer
            key_serializer, value_serializer = self.key_serializer, self.value_serializer
            sent = 0
            items = list(batch.items())
            try:
                for key, (partition, value) in items:
                    headers = topic.prepare_headers(None)
                    key_bytes, headers = topic.prepare_key(key, key_serializer, None, headers)
                    value_bytes, headers = topic.prepare_value(
                        value, value_serializer, None, headers
                    )
                    fut: Any = await producer.send(
                        name, key_bytes, value_bytes, partition, time.time(), headers or None
                    )
                    self._in_flight.append((fut, key, partition, value))
                    sent += 1
            except BaseException:
                for key, (partition, value) in items[sent:]:
                    self._dirty.setdefault(key, (partition, value))
                raise
            self.records_sent += sent
            if len(self._in_flight) > 4096:  # no commit for a while: prune what is done
                self.check_delivered(raise_on_failure=False)
            return sent

    async def wait_delivered(self) -> None:
        """Wait for every record handed over so far to be acknowledged (or to fail), then
        :meth:`check_delivered`: raises :class:`ChangelogSendError` if any failed."""
        pending = [fut for fut, *_ in self._in_flight if not fut.done()]
        if pending:
            await asyncio.wait(pending)
        self.check_delivered()

    def check_delivered(self, *, raise_on_failure: bool = True) -> int:
        """After the producer's flush: drop delivered records from the in-flight list; put
        failed ones back as dirty (unless a newer value is waiting) and raise
        :class:`ChangelogSendError`. Returns how many are still in flight."""
        failed: list[BaseException] = []
        still: list[tuple[asyncio.Future[Any], Any, int, Any]] = []
        for entry in self._in_flight:
            fut, key, partition, value = entry
            if not fut.done():
                still.append(entry)
                continue
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                failed.append(exc)
                self._dirty.setdefault(key, (partition, value))
        self._in_flight = still
        if failed and not raise_on_failure:
            logger.warning("%d session changelog record(s) not delivered (%r); resending",
                           len(failed), failed[-1])
        if failed and raise_on_failure:
            raise ChangelogSendError(
                f"{len(failed)} session changelog record(s) not delivered ({failed[-1]!r}); "
                "not committing offsets past them (they are sent again)"
            )
        return len(still)


def batched_table(app: faust.App, name: str, **kwargs: Any) -> BatchedChangelogTable:
    """``app.Table(name, **kwargs)``, as a :class:`BatchedChangelogTable`."""
    table = BatchedChangelogTable(
        app, name=name, beacon=app.tables.beacon, **kwargs
    )
    app.tables.add(table)
    return table
