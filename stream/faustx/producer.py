"""Faust's aiokafka producer whose pre-commit ``flush()`` really waits for the buffered
records: :class:`CommitFlushProducer` (the seam transport's ``Producer``).

With ``at_least_once`` Faust fixes the offsets to commit, flushes its producer (table
changelog records included) and then commits. But ``ProducerBuffer.flush`` gives up as soon
as no record has been handed to aiokafka for 0.1 s (``flush_atmost`` returns on its
``wait_for`` timeout), and ``buffer.size`` does not count the record that
``_handle_pending`` is handing over at that moment. On a loaded machine, or while the
producer is still fetching metadata after a restart, offsets were committed ahead of
changelog records that had not reached Kafka; a SIGKILL then lost those plays from the
listener's state (the likely cause of one CI crash-loop run reporting ``lost 161``).

:meth:`CommitFlushProducer.flush` waits until every record *enqueued before it started* has
been handed to aiokafka (the buffer is FIFO: a count of hand-overs is enough,
:class:`CountingProducerBuffer`), then waits for aiokafka's batches. Records enqueued later
belong to events after the commit point and are not waited for: waiting for an empty buffer
instead stalled the agent (Faust commits inline every ``broker_commit_every`` events) for
~1.3 s at 200 events/s. If a record cannot be handed over, or the buffer stops or crashes
with records pending, the flush raises, so Faust does not commit: those events are
redelivered. (A record aiokafka accepted but then failed to deliver, e.g. too large, is only
logged by Faust, as before; aiokafka's flush does not report it.)

Before counting, the flush calls the app's ``before_commit`` hooks (:class:`stream.faustx.
app.SeamApp`): the worker's signal publisher enqueues the track signals of the plays it
learned but has not sent yet (it batches them for up to 50 ms), so an offset is never
committed ahead of its play's signal (a SIGKILL in that window used to lose the signal:
the other workers never learned the play on the item side).

The app's batched changelog tables (:class:`stream.faustx.changelog_table.
BatchedChangelogTable`) send their pending changelog records after that hand-over and before
the producer flush, and a record of theirs that failed to deliver fails the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer
from faust.transport.producer import ProducerBuffer

from stream.faustx.changelog_table import BatchedChangelogTable

logger = logging.getLogger(__name__)

#: how long the commit flush waits for a changelog hand-over that makes no progress
STALLED_HANDOVER_S = 10.0


class CountingProducerBuffer(ProducerBuffer):
    """Faust's producer buffer, counting the records put and the records handed over."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.enqueued = 0
        self.handed_over = 0
        #: hand-overs that raised: a commit waiting for them must fail, not go ahead
        self.failures: list[BaseException] = []
        self.progress = asyncio.Event()

    def put(self, fut: Any) -> None:
        super().put(fut)
        self.enqueued += 1

    async def _send_pending(self, fut: Any) -> None:
        # Faust's hand-over (its buffer task looks it up when the buffer starts)
        try:
            await super()._send_pending(fut)
        except BaseException as exc:
            # not handed over (Faust's _handle_pending task dies with this exception, so
            # nothing more is sent)
            self.failures.append(exc)
            self.progress.set()
            raise
        self.handed_over += 1
        self.progress.set()

    async def wait_handed_over(self, target: int) -> None:
        """Wait until ``target`` records have been handed over in all; raise if one could
        not be or the buffer is not running. Gives up (loudly) after STALLED_HANDOVER_S
        without progress."""
        progress, last_change = self.handed_over, time.monotonic()
        while self.handed_over < target:
            if self.handed_over != progress:
                progress, last_change = self.handed_over, time.monotonic()
            elif time.monotonic() - last_change > STALLED_HANDOVER_S:
                # aiokafka has accepted nothing for that long (a send stuck on metadata or
                # a full accumulator): stop holding the commit -- and with it the agent,
                # which commits inline -- and fall back to Faust's own behaviour, loudly
                logger.warning(
                    "changelog producer accepted nothing for %.0f s with %d record(s) "
                    "pending; committing without waiting for them",
                    STALLED_HANDOVER_S, target - self.handed_over,
                )
                return
            if self.failures:
                raise RuntimeError(
                    f"a changelog record could not be handed to Kafka ({self.failures[-1]!r}); "
                    "not committing offsets past it"
                )
            if self.crashed or self.state != "running":
                raise RuntimeError(
                    f"producer buffer is {self.state}, "
                    f"{target - self.handed_over} record(s) not handed to Kafka; "
                    "not committing offsets past them"
                )
            self.progress.clear()
            if self.handed_over >= target:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.progress.wait(), 1.0)


class CommitFlushProducer(AIOKafkaProducer):
    """Faust's aiokafka producer with the commit flush of the module doc."""

    buffer: CountingProducerBuffer

    def __init__(self, transport: Any, loop: Any = None, **kwargs: Any) -> None:
        super().__init__(transport, loop=loop, **kwargs)
        if self.app.conf.producer_threaded:  # put() would bypass _send_pending
            raise ValueError("the seam's commit flush needs producer_threaded=False")
        # Faust's Producer.__init__ builds a ProducerBuffer with no setting for its class:
        # swap in the counting one before anything starts or uses it
        self.buffer = CountingProducerBuffer(loop=self.loop, beacon=self.beacon)
        self.buffer.app = self.app

    def batched_tables(self) -> list[BatchedChangelogTable]:
        return [t for t in self.app.tables.values() if isinstance(t, BatchedChangelogTable)]

    async def flush(self) -> None:
        """Wait for the records enqueued so far and the batched tables' pending changelog,
        then for aiokafka's batches (see the module doc)."""
        buffer = self.buffer
        for hook in getattr(self.app, "before_commit", ()):
            hook()  # records of applied events buffered elsewhere: enqueued, waited for
        await buffer.wait_handed_over(buffer.enqueued)
        # then what Faust's Producer.flush does after its buffer flush (which itself waits
        # for an empty buffer, i.e. stalls under steady load): aiokafka's flush, which waits
        # for the batches accumulated so far to be acknowledged
        tables = self.batched_tables()
        for table in tables:
            await table.send_dirty()  # waits for an agent hand-over in progress, too
        commit_futures = [table.handed_over() for table in tables]
        if self._producer is not None:
            # close the batches still lingering (producer_linger) so they go out now instead
            # of after the linger: the agent commits inline and waits here
            await self._producer._message_accumulator.flush_for_commit()
        for transactional in self._transaction_producers.values():
            await transactional.flush()
        for table, futures in zip(tables, commit_futures, strict=True):
            await table.wait_delivered(futures)
